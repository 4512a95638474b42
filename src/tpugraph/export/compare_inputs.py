"""Per-segment .npz of realistic inputs (a real prompt driven through the segments) for tpu-mlir's own compares."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ..contract.manifest import Manifest, SegmentEntry, read_manifest
from ..contract.manifest_records import TestDataRecord
from ..contract.segments import SegmentKind, prefill_inputs
from ..errors import OutputError, UsageError
from ..runtime.loop import KvCache, SegmentRuntime

log = logging.getLogger(__name__)

TEST_DATA_DIR = "test_data"
DEFAULT_SEED = 0
# Typical sampling parameters of a chat demo, in the contract's input order (top_p, temperature, penalty).
SAMPLE_PARAMS = {"top_p": 0.8, "temperature": 0.7, "penalty": 1.1}
SAMPLE_TOP_K = 40


def segment_npz(segment: str) -> str:
    """Where a segment's test inputs go, relative to OUT."""
    return f"{TEST_DATA_DIR}/{segment}_input.npz"


def default_decode_position(seq: int) -> int:
    """Where the decode step happens: half the window, so the history has real rows and garbage rows."""
    return max(1, seq // 2)


def make_prompt(vocab_size: int, length: int, seed: int = DEFAULT_SEED, bos_token_id: int | None = None) -> list[int]:
    """A deterministic prompt; the presets have random weights and no tokenizer, so the ids are drawn too."""
    rng = np.random.default_rng(seed)
    ids = [int(t) for t in rng.integers(0, vocab_size, size=length)]
    if bos_token_id is not None and 0 <= int(bos_token_id) < vocab_size:
        ids[0] = int(bos_token_id)
    return ids


class _RecordingRuntime(SegmentRuntime):
    """The runtime driver, noting the first inputs each segment is run with (copied: decode writes history in place)."""

    def __init__(self, out_dir: Path, manifest: Manifest):
        super().__init__(out_dir, manifest)
        self.recorded: dict[str, tuple[np.ndarray, ...]] = {}

    def run(self, name: str, *arrays: np.ndarray) -> list[np.ndarray]:
        if name not in self.recorded:
            # with a block's LoRA inputs (zeros: the base model), which SegmentRuntime.run adds
            self.recorded[name] = tuple(np.array(a, copy=True) for a in (*arrays, *self._lora_inputs(name)))
        return super().run(name, *arrays)


def realistic_inputs(out_dir: Path, manifest: Manifest, decode_position: int | None = None,
                     seed: int = DEFAULT_SEED) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, int]]:
    """Each segment's inputs, by graph input name, as the runtime feeds them.

    Prefill segments (embedding, block_i, lm_head, greedy_head): a prompt that fills the window. Rows of a
    prefill past the prompt are garbage by contract, and in F16 they really differ from f32 (all-masked
    softmax rows: -10000 + score rounds to -10000), so a shorter prompt would fail the compiler's
    whole-tensor compares for no real reason.
    Decode segments (embedding_cache, block_cache_i): the first ``decode_position`` tokens of that prompt
    prefilled, its greedy next token decoded at index ``decode_position`` with the prefill's KV as history
    (garbage rows included, masked as the runtime masks them).
    The sampling head gets the prefill's logits, the prompt as ids and typical sampling parameters.
    The vit (a vision-language output): the built-in synthetic picture through OUT's image processor.
    """
    seq = int(manifest.options.seq_length)
    if seq < 2:
        raise UsageError(f"test data needs --seq-length >= 2 (a prefill and a decode step); got {seq}")
    n = default_decode_position(seq) if decode_position is None else int(decode_position)
    if not 1 <= n < seq:
        raise UsageError(f"test-data decode position must be within 1..{seq - 1} "
                         f"(SEQ - 1 leaves room to decode); got {n}")
    prompt = make_prompt(int(manifest.model.vocab_size), seq, seed, manifest.model.bos_token_id)

    rt = _RecordingRuntime(out_dir, manifest)
    kinds = manifest.kinds()
    # next_token: lm_head and greedy_head, or an lm_head that takes the top-1 itself
    heads = SegmentKind.LM_HEAD in kinds and (SegmentKind.GREEDY_HEAD in kinds or rt.greedy_in_lm_head
                                              or rt.token_lm_head)
    length = rt.input_length  # L: the prefill nets' tokens (SEQ unless --max-input-length)
    hidden, _ = rt.prefill(prompt[:length])  # records embedding, block_i
    logits = rt.next_token(hidden)[1] if heads else None  # records lm_head, greedy_head
    if rt.history_kv:
        # block_kv_i: a chunk of (up to) L new tokens on a history of L tokens (SEQ / 2 when L = SEQ).
        h = length if length < seq else seq // 2
        _, history = rt.prefill(prompt[:h])
        rt.prefill_on_history(prompt[h: h + length], h, history)  # records block_kv_i
    if SegmentKind.EMBEDDING_CACHE in kinds or rt.table is not None:  # (--embedding-disk: rows gathered on the host)
        if decode_position is None and not rt.history_kv:
            n = min(n, length)  # the prompt must fit one prefill
        cache = KvCache()
        hidden = rt.feed(cache, prompt[:n])  # the same segments again: already recorded
        token = rt.next_token(hidden)[0] if heads else prompt[n]
        rt.decode(token, n, cache.layers)  # records embedding_cache, block_cache_i
    if manifest.model.vision is not None:
        _record_vit(rt, out_dir, manifest)

    inputs: dict[str, dict[str, np.ndarray]] = {}
    for entry in manifest.segments:
        if entry.name in rt.recorded:
            arrays = rt.recorded[entry.name]
        elif entry.kind == SegmentKind.PENALTY_SAMPLE_HEAD and logits is not None:
            ids = prefill_inputs(prompt, seq)[0]
            arrays = (logits.reshape(1, -1), ids, *(np.array([v], np.float32) for v in SAMPLE_PARAMS.values()))
        elif entry.kind == SegmentKind.SAMPLE_HEAD and logits is not None:
            ids = prefill_inputs(prompt, seq)[0]
            p = SAMPLE_PARAMS
            arrays = (logits.reshape(1, -1), ids, np.array([p["penalty"]], np.float32),
                      np.array([p["temperature"]], np.float32), np.array([SAMPLE_TOP_K], np.int32),
                      np.array([p["top_p"]], np.float32))
        else:
            raise UsageError(f"no realistic inputs for segment '{entry.name}' (kind {entry.kind}): "
                             "the runtime driver does not run it")
        inputs[entry.name] = _named(entry, arrays)
    return inputs, {"prefill_tokens": length, "decode_position": n, "seed": seed}


def _record_vit(rt: SegmentRuntime, out_dir: Path, manifest: Manifest) -> None:
    """The vit's inputs for the built-in synthetic picture through OUT's own image processor, as run/verify make
    them (window order, positions, masks, reverse index; rows past the image are padding)."""
    from ..runtime.images import load_image
    from ..runtime.vision import VisionConfig, vit_runs

    image = load_image(out_dir, manifest, None)  # the first run (InternVL: the first tile)
    rt.run("vit", *vit_runs(image.pixel_values, image.grid, VisionConfig.of(manifest), rt.mask_value)[0].arrays)


def _named(entry: SegmentEntry, arrays: tuple[np.ndarray, ...]) -> dict[str, np.ndarray]:
    """Key by graph input name in the declared shapes; integers as int32, which is what tpu-mlir feeds."""
    if len(arrays) != len(entry.inputs):
        raise UsageError(f"segment '{entry.name}' has {len(entry.inputs)} inputs, the driver fed {len(arrays)}")
    named = {}
    for spec, arr in zip(entry.inputs, arrays):
        dtype = np.int32 if np.dtype(spec.dtype).kind in "iu" else np.dtype(spec.dtype)
        named[spec.name] = np.asarray(arr).reshape(spec.shape).astype(dtype)
    return named


def write_test_data(out_dir: str | Path, manifest: Manifest | None = None, decode_position: int | None = None,
                    seed: int = DEFAULT_SEED) -> list[str]:
    """Write OUT/test_data/<segment>_input.npz for every segment, note each in the manifest, return the files.

    The npz keys are the graph's input names, so the files go straight to model_transform's --test_input.
    """
    out_dir = Path(out_dir)
    manifest = manifest or read_manifest(out_dir)
    inputs, how = realistic_inputs(out_dir, manifest, decode_position, seed)
    (out_dir / TEST_DATA_DIR).mkdir(exist_ok=True)
    written = []
    for entry in manifest.segments:
        rel = segment_npz(entry.name)
        target = out_dir / rel
        tmp = target.with_name(f".{target.stem}.tmp{os.getpid()}.npz")
        try:
            np.savez(tmp, **inputs[entry.name])
            os.replace(tmp, target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None
        entry.test_data = TestDataRecord(file=rel, **how)
        written.append(rel)
    manifest.write(out_dir)
    log.info("wrote test inputs of %d segments to %s", len(written), out_dir / TEST_DATA_DIR)
    return written
