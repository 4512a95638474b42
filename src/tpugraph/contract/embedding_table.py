"""--embedding-disk: the vocabulary matrix as a row-major file the host gathers rows from, instead of embedding nets.

The export writes OUT/embedding.f32.bin: row t is what the embedding net would output for token t (the family's
embedding scale included), float32. Compile writes embedding.bin beside the bmodel: the same rows in the
compile's float type (F16 or BF16, LLM-TPU's --embedding_disk layout [V, H]); a run on that bmodel gathers
from it, an onnxruntime run from the float32 file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import VerificationError
from .manifest_records import EmbeddingTableRecord

TABLE_NAME = "embedding.f32.bin"  # in OUT, written by the export
COMPILED_NAME = "embedding.bin"  # beside the bmodel, written by compile
ROWS_PER_CHUNK = 4096


def write_table(parts, out_dir: Path) -> EmbeddingTableRecord:
    """Write OUT/embedding.f32.bin from the model's embedding (in the export dtype, as the net computes it);
    returns the manifest's record of it."""
    import torch

    from ..export.wrappers import EmbeddingSegment
    from .manifest import sha256_file

    fam = parts.family
    path = Path(out_dir) / TABLE_NAME
    tmp = path.with_name(path.name + ".tmp")
    with parts.materialized(fam.embed_path) as embed, open(tmp, "wb") as f, torch.no_grad():
        segment = EmbeddingSegment(embed, parts.embed_scale(embed))
        vocab = int(embed.weight.shape[0])
        for start in range(0, vocab, ROWS_PER_CHUNK):
            ids = torch.arange(start, min(start + ROWS_PER_CHUNK, vocab))[None]
            f.write(segment(ids)[0].to(torch.float32).contiguous().numpy().tobytes())
        hidden = int(embed.weight.shape[1])
    tmp.replace(path)
    return EmbeddingTableRecord(file=TABLE_NAME, shape=[vocab, hidden], dtype="float32", size=path.stat().st_size,
                                sha256=sha256_file(path))


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounded to nearest even (NaN stays NaN)."""
    bits = x.astype(np.float32).view(np.uint32)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    return np.where(np.isnan(x), 0x7FC0, rounded).astype(np.uint16)


def _cast(rows: np.ndarray, float_type: str) -> np.ndarray:
    if float_type == "f16":
        return rows.astype(np.float16)
    if float_type == "bf16":
        return _to_bf16_bits(rows)
    raise ValueError(f"embedding table float type must be f16 or bf16 (got {float_type})")


def write_compiled(out_dir: Path, float_type: str, dest: Path) -> Path:
    """embedding.bin: OUT's float32 rows in ``float_type`` (f16 or bf16), row-major [V, H]."""
    table = EmbeddingTable.of_output(out_dir)
    tmp = dest.with_name(dest.name + ".tmp")
    with open(tmp, "wb") as f:
        for start in range(0, table.vocab, ROWS_PER_CHUNK):
            f.write(_cast(np.asarray(table.rows[start:start + ROWS_PER_CHUNK]), float_type).tobytes())
    tmp.replace(dest)
    return dest


class EmbeddingTable:
    """A [V, H] row-major table on disk (float32, f16 or bf16), gathered into float32 rows."""

    def __init__(self, path: Path, vocab: int, hidden: int, float_type: str):
        self.path = Path(path)
        self.vocab, self.hidden, self.float_type = vocab, hidden, float_type
        itemsize = 4 if float_type == "f32" else 2
        want = vocab * hidden * itemsize
        if not self.path.is_file():
            raise VerificationError(f"{self.path} is missing: an --embedding-disk output needs it "
                                    f"({'re-export' if float_type == 'f32' else 'compile again'})")
        if self.path.stat().st_size != want:
            raise VerificationError(f"{self.path} has {self.path.stat().st_size} bytes; a [{vocab}, {hidden}] "
                                    f"{float_type} table has {want}")
        dtype = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}[float_type]
        self.rows = np.memmap(self.path, dtype=dtype, mode="r", shape=(vocab, hidden))

    @classmethod
    def of_output(cls, out_dir: Path, manifest=None) -> "EmbeddingTable":
        from .manifest import read_manifest

        manifest = manifest or read_manifest(out_dir)
        record = manifest.conventions.embedding_disk
        if not record:
            raise VerificationError(f"'{out_dir}' was not exported with --embedding-disk: it has no embedding table")
        vocab, hidden = record.shape
        return cls(Path(out_dir) / record.file, int(vocab), int(hidden), "f32")

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """Rows of ``ids`` ([1, n] ints) as float32 [1, n, H]."""
        flat = np.asarray(ids).reshape(-1).astype(np.int64)
        rows = np.asarray(self.rows[flat])
        if self.float_type == "bf16":
            rows = (rows.astype(np.uint32) << 16).view(np.float32)
        return rows.astype(np.float32).reshape(1, flat.size, self.hidden)

    def check_matches(self, reference: "EmbeddingTable", rows: int = 8) -> None:
        """This (compiled) table holds ``reference``'s rows in its float type: else it was written for another
        compile of the output (an F16 embedding.bin beside a BF16 bmodel, say)."""
        picks = np.unique(np.linspace(0, self.vocab - 1, num=min(rows, self.vocab)).astype(np.int64))
        want = _cast(np.asarray(reference.rows[picks]), self.float_type)
        if not np.array_equal(np.asarray(self.rows[picks]).view(want.dtype), want):
            raise VerificationError(f"{self.path} does not hold this output's embedding in {self.float_type}: "
                                    "it was written by another compile (another float type?); compile again")
