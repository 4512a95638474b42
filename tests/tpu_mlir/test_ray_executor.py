"""compile --executor ray: the same compile plan's tool runs as Ray tasks on a local cluster (2 CPUs, started by
the test) write a bmodel byte-identical to the local executor's (but for the creation time the tools stamp in)."""

from __future__ import annotations

import shutil

import pytest

from tpugraph.compiler import CompileOptions, compile_segments
from tpugraph.compiler.bmodel_bytes import same_bmodel, timeless_bytes
from tpugraph.errors import UsageError
from tpugraph.export.pipeline import ExportOptions, export_and_optimize

pytestmark = pytest.mark.slow


def test_ray_compile_is_byte_identical(tmp_path, toolchain):
    ray = pytest.importorskip("ray", reason="the ray extra (tpugraph[ray]) is not installed")
    local = tmp_path / "local"
    export_and_optimize("tiny-llama", local, ExportOptions(seq_length=8))
    remote = tmp_path / "remote"
    shutil.copytree(local, remote)
    options = CompileOptions(quantize="bf16", check="none")
    expected = compile_segments(local, toolchain, options, jobs=2)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        report = compile_segments(remote, toolchain, options, jobs=0, executor="ray")
        assert ray.is_initialized()  # the compile joined the test's cluster and left it running
        # every tool ran as a Ray task: no fork server of this process served any
        assert not (remote / report.plan.work_dir / "worker.log").exists()
    finally:
        ray.shutdown()
    assert report.plan.steps == [s for s in expected.plan.steps]
    assert report.bmodel.name == expected.bmodel.name
    # byte-identical but for the creation time model_tool stamps in (two local compiles differ by it as well)
    ours, stamps = timeless_bytes(report.bmodel)
    assert stamps >= 1 and ours == timeless_bytes(expected.bmodel)[0]
    assert same_bmodel(report.bmodel, expected.bmodel)
    with pytest.raises(UsageError, match="executor must be one of local, ray"):
        compile_segments(remote, toolchain, options, executor="dask")
