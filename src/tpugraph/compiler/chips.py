"""The chips a compile may target, declared once: cores, device memory, quantization modes, cmodel library."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError

GIB = 1 << 30
ALL_MODES = ("f16", "bf16", "w8bf16", "w4bf16", "w8f16", "w4f16")


@dataclass(frozen=True)
class ChipSpec:
    """One chip as tpu-mlir targets it and the cmodel simulates it."""

    name: str  # model_deploy --chip
    # TPU cores of one chip (tpu-mlir's utils/tpu_info.py max_core_num): model_deploy --num_core, as llm_convert
    # passes it. A bmodel built for more cores than the chip has computes garbage (tpu-mlir #261, #281).
    cores: int
    # device memory a bmodel may take (weights, KV cache, activations): the DDR of the chip's common board; the
    # memory plan refuses a model above it (compile --device-memory gives another board's)
    memory_bytes: int
    quantize_modes: tuple[str, ...]
    # the cmodel library in tpu_mlir/lib that simulates the chip (tools/model_runner.py get_cmodel_so), the
    # runtime binding that drives it, and the chip name model_runner's helpers take
    cmodel_library: str
    runtime: str = "pyruntime_bm"
    max_devices: int = 1  # chips per card a --num-device compile may split over (SoCs: 1)
    single_device_reason: str = "is a single-chip SoC"  # why max_devices is 1, as the refusal says it
    note: str = ""


CHIP_TABLE: dict[str, ChipSpec] = {spec.name: spec for spec in (
    ChipSpec("bm1684x", cores=1, memory_bytes=16 * GIB, quantize_modes=ALL_MODES,
             cmodel_library="libcmodel_bm1684x.so", max_devices=8,
             note="PCIe cards and SE7 boxes; 16 GB DDR in the largest configuration"),
    ChipSpec("bm1688", cores=2, memory_bytes=8 * GIB, quantize_modes=ALL_MODES,
             cmodel_library="libcmodel_bm1688.so", note="SoC, 2 TPU cores; 8 GB boards"),
    ChipSpec("cv186x", cores=1, memory_bytes=4 * GIB, quantize_modes=ALL_MODES,
             cmodel_library="libcmodel_bm1688.so",
             note="SoC, 1 TPU core (BM1688's core; the same cmodel); 4 GB boards"),
    # BM1690 (SG2260): 8 cores is tpu_info.py's max_core_num; its memory is an UNVERIFIED GUESS (no Sophgo document
    # for its boards' memory was found): give the real board's with --device-memory
    ChipSpec("bm1690", cores=8, memory_bytes=64 * GIB, quantize_modes=ALL_MODES,
             cmodel_library="libtpuv7_emulator.so", runtime="pyruntime_tpuv7",
             single_device_reason="has no multi-device compile proven in tpugraph yet",
             note="8 TPU cores; the 64 GB memory is an unverified guess; simulated by tpuv7's emulator"),
)}
CHIPS = tuple(CHIP_TABLE)


def chip_spec(name: str) -> ChipSpec:
    """The table's entry for a chip name (any case); raises UsageError naming the known chips."""
    spec = CHIP_TABLE.get(str(name).lower())
    if spec is None:
        raise UsageError(f"chip must be one of {', '.join(CHIPS)} (got '{name}')")
    return spec
