"""The documentation stays true to the code: the generated reference pages equal what scripts/gen_reference_docs.py
writes now, and every relative link in README.md and docs/ points at a file (and heading) that exists."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "reference"
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_generated_reference_pages_match_the_code(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_reference_docs.py"), "--out", str(tmp_path)],
                   check=True, env=env, capture_output=True, text=True)
    generated = sorted(p.name for p in tmp_path.iterdir())
    assert {"cli.md", "families.md", "passes.md", "exit-codes.md"} <= set(generated)
    stale = [name for name in generated if not (REFERENCE / name).is_file()
             or (REFERENCE / name).read_text(encoding="utf-8") != (tmp_path / name).read_text(encoding="utf-8")]
    assert not stale, (f"docs/reference/{', '.join(stale)} differ from the code: "
                       "run `python scripts/gen_reference_docs.py` and commit the result")


def test_generated_pages_cover_every_command_family_and_pass():
    from typer.main import get_command

    from tpugraph.cli import app
    from tpugraph.passes import PASSES
    from tpugraph.source.families import FAMILIES

    cli = (REFERENCE / "cli.md").read_text(encoding="utf-8")
    for name in get_command(app).list_commands(None):
        assert f"## `tpugraph {name}`" in cli, name
    families = (REFERENCE / "families.md").read_text(encoding="utf-8")
    assert all(f"| `{fam.name}` |" in families for fam in FAMILIES)
    passes = (REFERENCE / "passes.md").read_text(encoding="utf-8")
    assert all(f"| `{name}` |" in passes for name in PASSES)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped (but - and _), spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.MULTILINE)}


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_point_at_existing_files(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_docs_folder_has_the_four_kinds():
    kinds = {p.name for p in (ROOT / "docs").iterdir() if p.is_dir()}
    assert {"tutorials", "guides", "reference", "explanation"} <= kinds
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 160, "README.md is the front page: details belong in docs/"
