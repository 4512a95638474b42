"""Drive segments exactly as the TPU runtime does (CONTRACT.md, greedy decoding), on any SegmentBackend.

Why this module is long: SegmentRuntime is the one generation loop every backend, command and proof drives
(prefill, decode, history prefill, state layers, shared KV, per-layer inputs, images, LoRA inputs), and each of
those is a few lines of the same loop; split apart they would have to share its state."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..contract.manifest import Manifest, read_manifest
from ..contract.segments import MASK_VALUE, SegmentKind, decode_inputs, history_prefill_inputs, prefill_inputs
from ..errors import UsageError
from .backends import SegmentBackend
from .sampling import SamplingParams, draw, head_inputs, sample_head_of


def prefill_length(manifest: Manifest) -> int:
    """L, the prefill nets' input length, as the LLM-TPU runtime reads it: from embedding's input (block_0's
    with --embedding-disk, which has no embedding net)."""
    first = "embedding" if any(s.name == "embedding" for s in manifest.segments) else "block_0"
    return int(manifest.segment(first).inputs[0].shape[1])


class PrefillUnsupported(ValueError):
    """The output's nets cannot take this prefill (a prompt longer than L, or new tokens on a history,
    without block_kv_i)."""


@dataclass
class KvCache:
    """The runtime's per-layer history buffers ([1, SEQ, KVH, D] each) and the token ids their first
    ``length`` rows hold. Rows past ``length`` are garbage by contract (masked), so dropping tokens from the
    end is just a smaller ``length``: a new turn whose ids share a prefix with ``tokens`` reuses those rows."""

    layers: list = field(default_factory=list)  # [(k, v)] per layer (a state layer: its states)
    tokens: list[int] = field(default_factory=list)
    # The image rows the cached tokens hold: their indices and vit rows (runtime.vision.PromptImage), so a new
    # prompt reuses them only where its images are the same.
    image_rows: np.ndarray | None = None
    image_embeds: np.ndarray | None = None

    @property
    def length(self) -> int:
        return len(self.tokens)

    def reset(self) -> None:
        self.layers = []
        self.tokens = []
        self.image_rows = self.image_embeds = None


def image_prefix(keep: int, cache: KvCache, image) -> int:
    """``keep`` cached tokens shortened to where the cache's image rows and ``image``'s (a PromptImage, or None)
    are the same rows with the same vit rows, and never ending inside one of ``image``'s blocks."""
    none = np.zeros(0, dtype=np.int64)
    cached = none if cache.image_rows is None else cache.image_rows[cache.image_rows < keep]
    new = none if image is None else image.rows[image.rows < keep]
    same = 0
    while (same < min(len(cached), len(new)) and cached[same] == new[same]
           and np.array_equal(cache.image_embeds[same], image.embeds[same])):
        same += 1
    if same < max(len(cached), len(new)):
        keep = min([keep] + [int(rows[same]) for rows in (cached, new) if same < len(rows)])
    for block in image.blocks if image is not None else ():
        if block[0] < keep <= block[-1]:
            keep = int(block[0])
    return keep


@dataclass
class GenerationTrace:
    tokens: list[int] = field(default_factory=list)
    logits: list[np.ndarray | None] = field(default_factory=list)  # one [V] array per token (None: top-k lm_head)
    prefill_seconds: float = 0.0  # prompt in, first token out
    decode_seconds: float = 0.0  # every later token

    @property
    def decode_tokens_per_second(self) -> float | None:
        later = len(self.tokens) - 1
        return later / self.decode_seconds if later > 0 and self.decode_seconds > 0 else None


TokenFn = Callable[[int], None]


class StopGeneration(Exception):
    """Raised by an ``on_token`` callback: that token is the last one, ``generate`` returns its trace (a stop
    string seen, a client gone). The KV cache stays consistent: it holds every token fed back so far."""


class SegmentRuntime:
    """Runs prefill + decode over OUT's nets, feeding inputs by position, on a backend (default: onnxruntime)."""

    def __init__(self, out_dir: Path, manifest: Manifest | None = None, keep_bytes: int | None = None,
                 backend: SegmentBackend | None = None, mask_value: float = MASK_VALUE,
                 sampling: SamplingParams | None = None, lora=None):
        """``keep_bytes``: for the default onnxruntime backend, see OnnxBackend. ``mask_value``: what the
        masks hold where a position is masked (a runtime's raw 16-bit pattern as the net reads it). ``sampling``:
        draw each token from the output's sample head (sample_head or penalty_sample_head) instead of greedy.
        ``lora``: a PEFT adapter (source/lora.LoraAdapter) whose A and B fill the blocks' LoRA inputs of an export
        with --lora-max-rank (None: zeros, the base model); ignored by an export without LoRA inputs."""
        self.out_dir = Path(out_dir)
        self.manifest = manifest or read_manifest(self.out_dir)
        if backend is None:
            from .backends.onnxruntime_backend import OnnxBackend

            backend = OnnxBackend(self.out_dir, self.manifest, keep_bytes)
        self.backend = backend
        self.mask_value = mask_value
        self.seq = int(self.manifest.options.seq_length)
        self.layers = int(self.manifest.model.num_layers)
        # --embedding-disk: no embedding nets, the host gathers rows of the vocabulary table the backend names
        self.table = None
        if SegmentKind.EMBEDDING not in self.manifest.kinds():  # --embedding-disk
            from ..contract.embedding_table import EmbeddingTable

            table_of = getattr(backend, "embedding_table", None)
            self.table = table_of(self.out_dir, self.manifest) if table_of else \
                EmbeddingTable.of_output(self.out_dir, self.manifest)
        # The seed's variant: lm_head takes the top-1 itself, outputs (token, m_logits), no greedy_head.
        self.greedy_in_lm_head = self.manifest.options.greedy_in_lm_head
        # The current runtime's top-k lm_head: the token [1,1] is its only output (no logits at all).
        self.token_lm_head = self.manifest.options.lm_head_topk
        self.sampling = None
        self.sample_net = None
        self.use_sampling(sampling)
        self.input_length = prefill_length(self.manifest)
        # compile --dynamic: the prefill nets run at the prompt's (chunk's) real length, not always L
        self.dynamic_prefill = bool(getattr(backend, "dynamic_prefill", False))
        self.history_kv = SegmentKind.BLOCK_KV in self.manifest.kinds()
        # Hybrid models: these layers carry states instead of KV (README "State segments"): (conv state, recurrent
        # state) for gated DeltaNet, (conv state,) for LFM2's short convolution.
        self.state_layers = set(self.manifest.model.state_layers or ())
        # Gemma 4 (README "Gemma 4"): the layer whose KV each layer reuses, and per-layer embeddings.
        self.kv_from = [r.kv_from for r in self.manifest.model.layers_kv or []] or [None] * self.layers
        self.per_layer = bool(self.manifest.model.per_layer_embedding)
        # Multimodal rotary (mrope): the blocks take position_ids [3, L]; a text token's three rows are equal, and
        # after an image every position is shifted by the prompt's rope delta (runtime/vision.py).
        self.position_rows = 3 if self.manifest.model.mrope_section else 1
        self.rope_delta = 0
        self.lora = lora
        self._lora_arrays: dict[str, list[np.ndarray]] = {}
        if lora is not None:
            self._check_lora(lora)

    def _check_lora(self, adapter) -> None:
        """UsageError unless this output's LoRA inputs can take ``adapter`` (an output with the adapter merged in
        takes it as it is: nothing to feed)."""
        record = self.manifest.model.lora
        if record is not None and record.mode == "merged":
            return
        if record is None or record.mode != "inputs":
            raise UsageError("this output has no LoRA inputs: export with --lora-max-rank R (or merge the adapter "
                             "with export --lora)", option="lora")
        from ..source.families import family_by_name
        from ..source.lora import check_fits_inputs

        block = self.manifest.segment("block_0")
        shapes = {t.name: tuple(t.shape) for t in block.inputs}
        linears = {path: (shapes[f"{path}.lora_A"][1], shapes[f"{path}.lora_B"][1]) for path in record.targets}
        check_fits_inputs(adapter, family_by_name(self.manifest.model.family).layers_path, linears,
                          int(record.max_rank), self.layers)

    def use_sampling(self, sampling: SamplingParams | None) -> None:
        """Draw the next tokens from the output's sample head with ``sampling`` (None: greedy again); a
        UsageError, the runtime unchanged, when the output cannot sample with them."""
        if sampling is None:
            self.sampling = None
            return
        net = sample_head_of({s.name for s in self.manifest.segments}, self.out_dir)
        if self.token_lm_head:
            raise UsageError("this output's lm_head returns the greedy token only (--lm-head-topk): "
                             "nothing to sample from")
        k = self.sample_head_k(net)
        if net == "penalty_sample_head" and sampling.top_k != k:
            raise UsageError(f"penalty_sample_head (--sample-head legacy) has no top_k input, it always keeps "
                             f"{k}: re-export with --sample-head for top-k", option="top_k")
        sampling.check(k)
        self.sampling, self.sample_net = sampling, net

    def sample_head_k(self, net: str) -> int:
        """K, the most tokens the sample head ``net`` keeps (its outputs' last dimension)."""
        return int(self.manifest.segment(net).outputs[0].shape[-1])

    def _positions(self, pos: np.ndarray, shift: int = 0) -> np.ndarray:
        """The contract's [1, L] positions as the blocks take them: one row, or mrope's three (+ ``shift``)."""
        if self.position_rows == 1:
            return pos
        return np.repeat(pos, self.position_rows, axis=0) + shift

    def _extra(self, embedded: list[np.ndarray], layer: int) -> list[np.ndarray]:
        """A block's per-layer embedding inputs: its slice of per_layer_embeds, and the token embedding."""
        if not self.per_layer:
            return []
        return [np.ascontiguousarray(embedded[1][:, :, layer]), embedded[0]]

    def check_prompt(self, n: int, cached: int = 0) -> None:
        """PrefillUnsupported when ``n`` tokens (after ``cached`` ones) cannot be prefilled by these nets."""
        if self.history_kv:
            return
        if cached:
            raise PrefillUnsupported("new tokens on top of a KV history need block_kv_i: export with --history-kv")
        if n > self.input_length:
            raise PrefillUnsupported(f"a prompt of {n} tokens is longer than the prefill nets' "
                                     f"{self.input_length} (--max-input-length): export with --history-kv to feed it "
                                     "in chunks")

    def run(self, name: str, *arrays: np.ndarray) -> list[np.ndarray]:
        """Run segment ``name`` with ``arrays`` in the contract's input order (a block's LoRA inputs added here)."""
        return self.backend.run(name, *arrays, *self._lora_inputs(name))

    def _lora_inputs(self, name: str) -> list[np.ndarray]:
        """A block net's LoRA inputs (--lora-max-rank): the adapter's A and scaled B, zero-padded to R, or zeros."""
        if name not in self._lora_arrays:
            record = self.manifest.model.lora
            arrays: list[np.ndarray] = []
            if record is not None and record.mode == "inputs" and name.startswith("block"):
                from ..source.families import family_by_name
                from ..source.lora import lora_input_arrays

                entry = self.manifest.segment(name)
                shapes = {t.name: tuple(t.shape) for t in entry.inputs}
                prefix = f"{family_by_name(self.manifest.model.family).layers_path}.{entry.layer}."
                arrays = lora_input_arrays(self.lora, prefix, tuple(record.targets), int(record.max_rank), shapes)
            self._lora_arrays[name] = arrays
        return self._lora_arrays[name]

    def embed(self, net: str, ids: np.ndarray) -> list[np.ndarray]:
        """The embedding net's outputs (the token embedding first; Gemma 4's per-layer embeddings second), or
        (--embedding-disk) the same rows gathered from the table."""
        if self.table is not None:
            return [self.table.gather(ids)]
        return list(self.run(net, ids))

    def next_token(self, hidden_last: np.ndarray, context: list[int] | None = None) -> tuple[int, np.ndarray | None]:
        """The next token and the logits it came from (None for a top-k lm_head, which has none).
        ``context``: the tokens so far (prompt and generated), for a sample head's repetition penalty."""
        if self.token_lm_head:
            (token,) = self.run("lm_head", hidden_last.reshape(1, -1))
            return int(np.asarray(token).reshape(-1)[0]), None
        if self.sampling is not None:
            out = self.run("lm_head", hidden_last.reshape(1, -1))
            logits = np.asarray(out[-1], dtype=np.float32)  # (m_logits) or (token, m_logits)
            probs, tokens = self.run(self.sample_net,
                                     *head_inputs(self.sample_net, logits, context or [], self.seq, self.sampling))
            return draw(probs, tokens, self.sampling.rng), logits.reshape(-1)
        if self.greedy_in_lm_head:
            token, logits = self.run("lm_head", hidden_last.reshape(1, -1))
        else:
            (logits,) = self.run("lm_head", hidden_last.reshape(1, -1))
            (token,) = self.run("greedy_head", logits)
        return int(np.asarray(token).reshape(-1)[0]), np.asarray(logits, dtype=np.float32).reshape(-1)

    def prefill(self, prompt: list[int], image=None):
        """The first chunk of a prompt (at most L tokens) through ``block_i``: (hidden of its last token,
        [(k, v)] per layer as SEQ-row history buffers: the block's L rows, garbage past the prompt included).
        ``image``: a runtime.vision.PromptImage whose vit rows replace the placeholder tokens' embeddings and
        whose 3-D positions are the prompt's."""
        hidden, history = self.prefill_states(prompt, image)
        return hidden[0, len(prompt) - 1], history

    def prefill_states(self, prompt: list[int], image=None):
        """``prefill``, with the last block's whole output: (hidden states [1, L, H], the n prompt rows first;
        [1, n, H] with a dynamic prefill), history)."""
        ids, pos, mask = prefill_inputs(prompt, self.input_length, self.mask_value)
        embedded = self.embed("embedding", ids)
        hidden = embedded[0]
        pos = self._positions(pos)
        if image is not None:
            hidden = image.merge(hidden)
            pos[:, : len(prompt)] = image.positions
            mask = image.attend(mask)
        if self.dynamic_prefill:  # the n prompt rows only: [1,n,H], [1,n], [1,1,n,n] (as LLM-TPU's net_launch_dyn)
            n = len(prompt)
            hidden, pos, mask = hidden[:, :n], pos[:, :n], np.ascontiguousarray(mask[:, :, :n, :n])
        history = []
        for i in range(self.layers):
            src = self.kv_from[i]
            if src is not None:  # shared KV: the owner layer's keys/values in, none out, no history of its own
                (hidden,) = self.run(f"block_{i}", hidden, pos, mask, *self._extra(embedded, i), *history[src])
                history.append(None)
            elif i in self.state_layers:  # from a zero state; the mask's diagonal tells the prompt rows
                hidden, *states = self.run(f"block_{i}", hidden, mask)  # (conv, recurrent) or (conv,)
                history.append(tuple(np.array(state, copy=True) for state in states))
            else:
                hidden, k, v = self.run(f"block_{i}", hidden, pos, mask, *self._extra(embedded, i))
                history.append((self._history_buffer(k), self._history_buffer(v)))
            if image is not None:  # Qwen3-VL's deepstack: the image rows of the first blocks' outputs
                hidden = image.add_deepstack(hidden, i)
        return hidden, history

    def _history_buffer(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows)
        if rows.shape[1] == self.seq:
            return np.array(rows, copy=True)
        buffer = np.zeros((rows.shape[0], self.seq, *rows.shape[2:]), dtype=rows.dtype)
        buffer[:, : rows.shape[1]] = rows
        return buffer

    def prefill_on_history(self, chunk: list[int], h: int, history, image=None) -> np.ndarray:
        """Up to L new tokens on top of ``h`` cached ones through ``block_kv_i``; their keys/values are written
        into the history buffers at rows h..h+n-1. Returns the hidden state of the chunk's last token.
        ``image``: the whole prompt's runtime.vision.PromptImage; the chunk takes its rows, 3-D positions,
        bidirectional blocks and deepstack rows at h..h+n-1."""
        ids, pos, mask = history_prefill_inputs(chunk, h, self.input_length, self.seq, self.mask_value)
        hidden = self.embed("embedding", ids)[0]
        pos = self._positions(pos)
        n = len(chunk)
        if image is not None:
            image = image.window(h, n)
            hidden = image.merge(hidden)
            pos[:, :n] = image.positions
            mask = image.attend(mask, column=self.seq)
        if self.dynamic_prefill:  # the n new rows; mask columns: the SEQ history ones, then the n new ones
            hidden, pos = hidden[:, :n], pos[:, :n]
            mask = np.ascontiguousarray(mask[:, :, :n, : self.seq + n])
        for i in range(self.layers):
            hk, hv = history[i]
            hidden, k, v = self.run(f"block_kv_{i}", hidden, pos, mask, hk, hv)
            hk[0, h: h + n] = k[0, :n]
            hv[0, h: h + n] = v[0, :n]
            if image is not None:
                hidden = image.add_deepstack(hidden, i)
        return hidden[0, n - 1]

    def reusable_prefix(self, cache: KvCache, prompt: list[int], image=None) -> int:
        """How many leading tokens of ``prompt`` the cache already holds and ``generate`` reuses: the common
        prefix, short of the prompt's last token (whose hidden state is needed). Without block_kv_i none: a new
        turn re-prefills the whole conversation, as single-turn runtimes do. With ``image`` (the prompt's
        runtime.vision.PromptImage) the prefix also stops at the first image row whose vit row differs from the
        cached one, and never ends inside an image block (its rows attend to each other)."""
        if not self.history_kv:
            return 0
        keep, limit = 0, min(cache.length, len(prompt) - 1)
        while keep < limit and cache.tokens[keep] == prompt[keep]:
            keep += 1
        if image is not None or cache.image_rows is not None:
            keep = image_prefix(keep, cache, image)
        return keep

    def feed(self, cache: KvCache, tokens: list[int], image=None) -> np.ndarray:
        """Prefill ``tokens`` after what ``cache`` holds: an empty cache starts with ``block_i`` on the first L
        tokens, every further chunk of at most L goes through ``block_kv_i``. Returns the last token's hidden."""
        if not tokens:
            raise ValueError("nothing to prefill")
        if cache.length + len(tokens) > self.seq:
            raise ValueError(f"{cache.length} cached + {len(tokens)} new tokens exceed SEQ={self.seq}")
        self.check_prompt(len(tokens), cache.length)
        L = self.input_length
        if image is not None and (len(tokens) > L or (cache.length and not self.history_kv)):
            raise PrefillUnsupported("an image is prefilled with the rest of its prompt in one piece")
        start = 0
        if cache.length == 0:
            hidden, cache.layers = self.prefill(tokens[:L], image)
            cache.tokens = list(tokens[:L])
            start = L
        for at in range(start, len(tokens), L):
            chunk = tokens[at: at + L]
            hidden = self.prefill_on_history(chunk, cache.length, cache.layers, image)
            cache.tokens.extend(chunk)
        # what the cached rows hold, for the next turn's reuse (without an image: none, image_prefix saw to it)
        cache.image_rows, cache.image_embeds = (image.rows, image.embeds) if image is not None else (None, None)
        return hidden

    def decode(self, token: int, n: int, history) -> np.ndarray:
        ids, pos, mask = decode_inputs(token, n, self.seq, self.mask_value)
        pos = self._positions(pos, self.rope_delta)
        embedded = self.embed("embedding_cache", ids)
        hidden = embedded[0]
        new: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for i in range(self.layers):
            src = self.kv_from[i]
            if src is not None:  # shared KV: the owner's history with its new row appended, [1, SEQ+1, KVH, D]
                hk, hv = history[src]
                k, v = new[src]
                shared = (np.concatenate([hk, k], axis=1), np.concatenate([hv, v], axis=1))
                (hidden,) = self.run(f"block_cache_{i}", hidden, pos, mask, *self._extra(embedded, i), *shared)
                continue
            if i in self.state_layers:  # the next states replace the buffers' contents (same addresses)
                hidden, *states = self.run(f"block_cache_{i}", hidden, *history[i])
                for buffer, state in zip(history[i], states):
                    buffer[...] = state
                continue
            hk, hv = history[i]
            hidden, k, v = self.run(f"block_cache_{i}", hidden, pos, mask, *self._extra(embedded, i), hk, hv)
            new[i] = (np.array(k, copy=True), np.array(v, copy=True))
            hk[0, n] = k[0, 0]
            hv[0, n] = v[0, 0]
        return hidden[0, 0]

    def generate(self, prompt: list[int], max_new_tokens: int, eos_ids: set[int] | None = None,
                 forced: list[int] | None = None, on_token: TokenFn | None = None,
                 cache: KvCache | None = None, image=None) -> GenerationTrace:
        """Greedy generation; with ``forced``, step i feeds forced[i] back instead of its own top-1
        (teacher forcing: the logits of every step are then comparable with another run's). ``on_token`` is
        called with each token as soon as it is known (streaming); it may raise StopGeneration to end there.

        ``cache``: a conversation's KV cache, kept across calls (multi-turn). ``prompt`` is then the whole
        conversation so far: the rows of its longest common prefix with what the cache holds are reused and
        only the rest is prefilled (on the history, with block_kv_i); the generated tokens fed back stay in it.

        ``image``: the prompt's image (runtime.vision.PromptImage, its vit rows already computed)."""
        if not 1 <= len(prompt) <= self.seq:
            raise ValueError(f"prompt length {len(prompt)} must be within 1..{self.seq}")
        cache = KvCache() if cache is None else cache
        keep = self.reusable_prefix(cache, prompt, image)
        self.check_prompt(len(prompt) - keep, keep)
        self.rope_delta = image.delta if image is not None else 0
        del cache.tokens[keep:]
        trace = GenerationTrace()
        t0 = time.perf_counter()
        hidden = self.feed(cache, list(prompt[keep:]), image)
        history = cache.layers
        n = len(prompt)
        while True:
            token, logits = self.next_token(hidden, prompt + trace.tokens)
            now = time.perf_counter()
            if trace.tokens:
                trace.decode_seconds += now - t0
            else:
                trace.prefill_seconds = now - t0
            trace.tokens.append(token)
            trace.logits.append(logits)
            if on_token:
                try:
                    on_token(token)
                except StopGeneration:
                    return trace
            fed = token if forced is None else forced[len(trace.tokens) - 1]
            if (len(trace.tokens) >= max_new_tokens or (eos_ids and fed in eos_ids) or n >= self.seq
                    or (forced is not None and len(trace.tokens) >= len(forced))):
                return trace
            t0 = time.perf_counter()
            hidden = self.decode(fed, n, history)
            cache.tokens.append(fed)
            n += 1

    def close(self) -> None:
        self.backend.close()
