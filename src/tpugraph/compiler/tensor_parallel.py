"""How a block is cut over N chips (tensor parallel): which attention heads, KV heads and MLP columns each device holds.

The cut is the one tpu-mlir's ``--dev-parallel`` pass makes (docs/explanation/tensor-parallel.md): Q/K/V and gate/up by
rows (whole heads, equal column groups), O and down by the same columns, the partial results summed twice per block.
tpugraph takes equal whole-head groups only: the attention heads must divide by N, and the KV heads either divide by N
(each device its own KV heads) or divide N (each KV head copied to the N / KV devices whose query heads read it).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError
from .options import NUM_DEVICES

# What the devices of `compile --num-device N` hold (a line of the compile script and the plan), by how OUT was exported.
NOT_SPLIT_NOTE = ("tpu-mlir 1.30.2's --dev-parallel pass does not recognise tpugraph's block graphs as exported for "
                  "one device, so each of the N devices holds the full weights; `export-and-optimize --num-device N` "
                  "writes the blocks in the form it splits (see docs/explanation/tensor-parallel.md); "
                  "`tpugraph verify OUT --num-device N` proves the split itself on OUT's blocks")
SPLIT_FORM_NOTE = ("OUT's blocks are written in the form tpu-mlir's --dev-parallel pass splits (export-and-optimize "
                   "--num-device): it cuts attention heads and MLP columns over the N devices where its patterns "
                   "match (an MLP whose down projection has at most 4M elements stays whole); the compile report "
                   "measures the split from the bmodel")


@dataclass(frozen=True)
class DeviceShard:
    device: int
    q_heads: range  # the query heads this device computes
    kv_heads: range  # the KV heads it holds (a copy when KV heads < N)
    columns: range  # its columns of the MLP's intermediate dimension


@dataclass(frozen=True)
class TensorSplit:
    num_device: int
    num_heads: int
    num_kv_heads: int
    shards: tuple[DeviceShard, ...]

    @property
    def kv_copies(self) -> int:
        """How many devices hold each KV head (1 unless there are fewer KV heads than devices)."""
        return max(1, self.num_device // self.num_kv_heads)

    @property
    def kv_owners(self) -> list[int]:
        """One device per KV head, in head order: whose KV cache makes up the full cache."""
        return list(range(0, self.num_device, self.kv_copies))


def valid_device_counts(num_heads: int, num_kv_heads: int) -> list[int]:
    return [n for n in NUM_DEVICES if n > 1 and _problem(num_heads, num_kv_heads, n) is None]


def _problem(num_heads: int, num_kv_heads: int, n: int) -> str | None:
    if num_heads % n:
        return f"its {num_heads} attention heads do not split evenly over {n} devices"
    if num_kv_heads % n and n % num_kv_heads:
        return (f"its {num_kv_heads} KV heads neither split evenly over {n} devices nor divide {n} (each KV head "
                f"copied to the same number of devices)")
    return None


def tensor_split(num_heads: int, num_kv_heads: int, num_device: int, intermediate: int | None = None) -> TensorSplit:
    """The split of a block over ``num_device`` devices, or a one-line UsageError saying why it has none."""
    problem = _problem(num_heads, num_kv_heads, num_device)
    if problem:
        others = valid_device_counts(num_heads, num_kv_heads)
        hint = f"; --num-device {' or '.join(map(str, others))} would" if others else ""
        raise UsageError(f"cannot split this model over {num_device} devices: {problem}{hint}", option="num_device")
    q_per = num_heads // num_device
    group = num_heads // num_kv_heads  # query heads per KV head
    shards = []
    for d in range(num_device):
        q = range(d * q_per, (d + 1) * q_per)
        if num_kv_heads >= num_device:
            kv_per = num_kv_heads // num_device
            kv = range(d * kv_per, (d + 1) * kv_per)
        else:  # this device's query heads all read one KV head
            kv = range(q.start // group, q.start // group + 1)
        cols = range(0)
        if intermediate is not None:  # equal groups, the remainder to the first devices (as tpu-mlir does)
            base, extra = divmod(intermediate, num_device)
            start = d * base + min(d, extra)
            cols = range(start, start + base + (d < extra))
        shards.append(DeviceShard(d, q, kv, cols))
    return TensorSplit(num_device, num_heads, num_kv_heads, tuple(shards))


def check_split_form(num_heads: int, num_kv_heads: int, num_device: int) -> None:
    """One-line UsageError for a split tpu-mlir cannot make of the split form (export-and-optimize / compile
    --num-device N): heads with no even split, or fewer KV heads than devices, where tpu-mlir 1.30.2's
    device-parallel pass aborts ("size is 0" in get_splited_size, measured with 2 KV heads over 4 devices)."""
    tensor_split(num_heads, num_kv_heads, num_device)
    if num_kv_heads < num_device:
        fits = [n for n in valid_device_counts(num_heads, num_kv_heads) if n <= num_kv_heads]
        hint = f"; --num-device {' or '.join(map(str, fits))} would" if fits else ""
        raise UsageError(f"cannot split this model over {num_device} devices with tpu-mlir: its {num_kv_heads} KV "
                         f"heads are fewer than the devices, which tpu-mlir 1.30.2's device-parallel pass aborts on "
                         f"(\"size is 0\"){hint}", option="num_device")
