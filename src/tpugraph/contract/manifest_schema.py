"""The typed manifest records -> manifest.schema.json (JSON Schema 2020-12), the file shipped for other tools.

tests/test_manifest_schema.py fails when the shipped file differs from what the records generate (regenerate:
``python -m tpugraph.contract.manifest_schema``); contract/json_schema.py checks a manifest against it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .json_schema import SCHEMA_NAME
from .manifest import FORMAT, Manifest
from .records import type_schema


def generate_schema() -> dict[str, Any]:
    defs: dict[str, Any] = {}
    root = type_schema(Manifest, defs)
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema",
              "title": f"{FORMAT}: OUT/manifest.json of tpugraph export-and-optimize", **root,
              "$defs": dict(sorted(defs.items()))}
    schema["$defs"]["Manifest"]["properties"]["format"] = {"const": FORMAT}
    return schema


def schema_text() -> str:
    return json.dumps(generate_schema(), indent=1) + "\n"


if __name__ == "__main__":
    target = Path(__file__).with_name(SCHEMA_NAME)
    target.write_text(schema_text())
    print(f"wrote {target}")
