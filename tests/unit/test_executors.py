"""scheduling's executors: where a task's heavy call runs; the choice by name and its one-line refusals."""

from __future__ import annotations

import sys

import pytest

from tpugraph.errors import UsageError
from tpugraph.scheduling import EXECUTORS, LocalExecutor, make_executor


def _add(a, b):
    return a + b


def test_local_executor_calls_here():
    executor = make_executor("local")
    assert isinstance(executor, LocalExecutor) and executor.call(_add, 2, 3) == 5
    executor.close()
    assert EXECUTORS == ("local", "ray")


def test_bad_choices_are_one_line(monkeypatch):
    with pytest.raises(UsageError, match="executor must be one of local, ray .got 'dask'"):
        make_executor("dask")
    with pytest.raises(UsageError, match="--ray-address applies to --executor ray"):
        make_executor("local", address="ray://head:10001")
    monkeypatch.setitem(sys.modules, "ray", None)  # the extra not installed: `import ray` fails
    with pytest.raises(UsageError, match=r"--executor ray needs Ray: pip install 'tpugraph\[ray\]'"):
        make_executor("ray")
