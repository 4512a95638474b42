"""The house rules that code review alone would not keep: the guest scripts that tpu-mlir's Python 3.10 runs import
nothing of tpugraph, no two modules import each other in a circle (module- or function-level imports alike), and a
module over ~400 lines says at its top why it is that long."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import tpugraph
from tpugraph.tpu_mlir.guest import GUEST_DIR

PACKAGE = Path(tpugraph.__file__).parent
LONG_MODULE_LINES = 400


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, names) of every import in ``path``, at any depth (function-level ones too)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module, [alias.name for alias in node.names]))
    return found


def _host_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py") if GUEST_DIR not in p.parents}


def test_guest_scripts_import_nothing_of_tpugraph():
    guests = [p for p in GUEST_DIR.glob("*.py") if p.name != "__init__.py"]
    assert {p.name for p in guests} >= {"tpu_mlir_transform.py", "tpu_mlir_bmodel_reuse.py", "tpu_mlir_worker.py",
                                         "bmodel_driver.py", "wire.py"}
    for path in guests:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path.name}:{node.lineno}: relative import (a guest runs as a script)"
                assert not (node.module or "").startswith("tpugraph"), f"{path.name}:{node.lineno} imports tpugraph"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("tpugraph"), f"{path.name}:{node.lineno} imports tpugraph"


def test_guest_scripts_compile_for_python_310():
    """They run under tpu-mlir's Python 3.10: no syntax newer than that (ast's feature_version checks it)."""
    for path in GUEST_DIR.glob("*.py"):
        ast.parse(path.read_text(), filename=str(path), feature_version=(3, 10))


def test_the_import_checker_sees_function_level_circles(tmp_path):
    """The circle test below would be worthless if it missed imports inside functions: here it must find one."""
    pkg = tmp_path / "tpugraph"
    pkg.mkdir()
    (pkg / "a.py").write_text("def f():\n    from .b import g\n")
    (pkg / "b.py").write_text("from . import a\n")
    global PACKAGE
    saved = PACKAGE
    PACKAGE = pkg
    try:
        graph = _graph({_module_name(p): p for p in pkg.glob("*.py")})
    finally:
        PACKAGE = saved
    assert _cycle(graph) is not None


def _graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for _, module, names in _imports(path):
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules] or [module]
            for target in targets:
                # An import of a package's face (__init__) counts as an import of that package module.
                if target in modules and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle():
    """Package faces (``__init__`` re-exports of their own submodules) aside, no module reaches itself again."""
    cycle = _cycle(_graph(_host_modules()))
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_long_modules_say_why():
    silent = []
    for path in sorted(PACKAGE.rglob("*.py")):  # the guest scripts too
        text = path.read_text()
        if text.count("\n") > LONG_MODULE_LINES and "Why this module is long" not in (ast.get_docstring(ast.parse(text)) or ""):
            silent.append(f"{path.relative_to(PACKAGE)} ({text.count(chr(10))} lines)")
    assert not silent, "modules over ~400 lines without a 'Why this module is long' note: " + ", ".join(silent)


def test_one_way_in_for_library_users():
    """tpugraph.export_and_optimize / compile / verify / run are the library's doors, and importing tpugraph alone
    loads none of the heavy libraries (each door loads its own on first use)."""
    import subprocess

    code = ("import sys, tpugraph; heavy = [m for m in ('torch', 'transformers', 'onnx') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
    from tpugraph.compiler.runner import compile_segments
    from tpugraph.export.pipeline import export_and_optimize
    from tpugraph.proof.verify import verify
    from tpugraph.runtime.text import run_prompt

    assert (tpugraph.export_and_optimize, tpugraph.compile, tpugraph.verify, tpugraph.run) == (
        export_and_optimize, compile_segments, verify, run_prompt)
    assert set(tpugraph.__all__) >= {"export_and_optimize", "compile", "verify", "run", "ExportOptions",
                                     "CompileOptions"}
    try:
        tpugraph.no_such_door
    except AttributeError as exc:
        assert "no_such_door" in str(exc)
    else:
        raise AssertionError("an unknown attribute must raise AttributeError")
