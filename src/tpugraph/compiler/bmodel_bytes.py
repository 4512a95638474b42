"""A bmodel's bytes -> the same bytes with the creation time the tools stamp in blanked: what two compiles of one
plan must agree on byte for byte."""

from __future__ import annotations

import re
from pathlib import Path

# ctime's format, as model_tool --info prints it ("create time: Thu Dec  3 22:19:37 2026")
_CREATE_TIME = re.compile(rb"(Mon|Tue|Wed|Thu|Fri|Sat|Sun) (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
                          rb"[ \d]\d \d\d:\d\d:\d\d \d{4}")


def timeless_bytes(path: Path) -> tuple[bytes, int]:
    """The file's bytes with every creation time replaced by as many zero bytes, and how many there were."""
    data, count = _CREATE_TIME.subn(lambda m: b"\0" * len(m.group()), Path(path).read_bytes())
    return data, count


def same_bmodel(a: Path, b: Path) -> bool:
    """Whether two bmodels are byte-identical but for their creation times."""
    (x, nx), (y, ny) = timeless_bytes(a), timeless_bytes(b)
    return nx == ny and x == y
