"""End-to-end parity with an image: OUT's vit + segments driven like the TPU runtime (the host merging the image
rows and computing the 3-D rotary positions) vs transformers' own greedy ``generate`` on the same image and
prompt, and the vit output vs transformers' vision features."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..contract.manifest import Manifest
from ..errors import UsageError
from ..runtime.images import ProcessedImage, image_prompt_ids, load_images, vision_of
from ..runtime.loop import SegmentRuntime
from ..runtime.vision import VisionConfig, encode_images

MIN_VIT_COSINE = 0.9999  # fp32 export vs fp32 reference; float16/bfloat16 exports: their logits' bound


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).reshape(-1), b.astype(np.float64).reshape(-1)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def random_text_ids(vocab: int, length: int, seed: int, vision: VisionConfig) -> list[int]:
    """verify's random prompt, without the image tokens (a stray placeholder would be a second image)."""
    special = set(vision.token_ids.values())
    rng = np.random.default_rng(seed)
    ids: list[int] = []
    while len(ids) < length:
        ids += [int(t) for t in rng.integers(3, vocab, size=length) if int(t) not in special]
    return ids[:length]


def hf_pixels(images: list[ProcessedImage]):
    """transformers' pixel_values for the images in order: their rows (Qwen) or tiles (Gemma 3) concatenated."""
    import torch

    return torch.from_numpy(np.concatenate([image.pixel_values for image in images]))


def hf_image_features(model, images: list[ProcessedImage]) -> list[np.ndarray]:
    """transformers' vision features of the images (one ProcessedImage or a list, in order): the rows it merges
    into the prompt, then (Qwen3-VL) the deepstack features it adds after the first layers."""
    import torch

    images = [images] if isinstance(images, ProcessedImage) else list(images)
    pixels = hf_pixels(images)
    with torch.no_grad():
        if getattr(model.config, "downsample_ratio", None):  # InternVL: the tiles' rows, tile after tile
            features = model.model.get_image_features(pixels).pooler_output
            return [features.reshape(-1, features.shape[-1]).float().numpy()]
        if getattr(model.config, "mm_tokens_per_image", None):  # Gemma 3: fixed-size tiles, no grid
            return [model.model.get_image_features(pixels).pooler_output.flatten(0, 1).float().numpy()]
        out = model.model.get_image_features(pixels, torch.tensor([image.grid for image in images]))
    deepstack = [torch.cat(list(feature), dim=0) for feature in getattr(out, "deepstack_features", None) or ()]
    return [t.float().numpy() for t in (torch.cat(list(out.pooler_output), dim=0), *deepstack)]


def hf_image_generate(model, ids: list[int], images: list[ProcessedImage], image_token: int, new_tokens: int,
                      eos: set[int]):
    """transformers' own greedy generate with the images (one ProcessedImage or a list, in order): tokens and the
    per-step logits."""
    import torch
    from transformers import GenerationConfig

    images = [images] if isinstance(images, ProcessedImage) else list(images)
    gen = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=sorted(eos) or None,
                           pad_token_id=min(eos) if eos else 0, output_logits=True, return_dict_in_generate=True)
    t = torch.tensor([ids], dtype=torch.long)
    extra = {"image_grid_thw": torch.tensor([image.grid for image in images])}
    params = inspect.signature(model.forward).parameters
    if "image_grid_thw" not in params:  # InternVL: tiles of a fixed size, no grid
        del extra["image_grid_thw"]
    # transformers 5.25 computes the 3-D positions from mm_token_type_ids (without it: text positions)
    if "mm_token_type_ids" in params:
        extra["mm_token_type_ids"] = (t == image_token).int()
    if "token_type_ids" in params:  # Gemma 3: the image tokens' bidirectional attention; no grid
        extra = {"token_type_ids": (t == image_token).long()}
    with torch.no_grad():
        out = model.generate(t, attention_mask=torch.ones_like(t), pixel_values=hf_pixels(images),
                             generation_config=gen, **extra)
    return out.sequences[0, len(ids):].tolist(), [step[0].float().numpy() for step in out.logits]


@dataclass
class ImageTurn:
    """One turn of an image verify: the conversation so far as the prompt, both sides' replies."""

    prompt: list[int]
    hf_tokens: list[int]
    hf_logits: list[np.ndarray]
    trace: object  # runtime.loop.GenerationTrace
    forced: list[int] | None  # transformers' tokens fed back (reduced precision), else None
    reused: int = 0  # of the prompt, tokens the runtime took from its KV cache (--history-kv)


@dataclass
class ImageRun:
    """Both sides of an image verify, for ``verify`` to compare step by step (the first turn's fields, then
    every turn in ``turns``)."""

    prompt: list[int]
    hf_tokens: list[int]
    hf_logits: list[np.ndarray]
    trace: object  # runtime.loop.GenerationTrace
    forced: list[int] | None  # transformers' tokens fed back (reduced precision), else None
    backend: str
    vision: dict  # the report's vision record
    turns: list[ImageTurn] = field(default_factory=list)


def run_with_image(out_dir: Path, manifest: Manifest, image: str | Path | None, prompt: list[int] | None,
                   prompt_length: int, new_tokens: int, seed: int, eos: set[int], source: Path,
                   free_running: tuple[str, ...], min_cosine: float, dtype: str, backend=None,
                   turns: int = 1) -> ImageRun:
    """``image`` (None: the built-in synthetic picture; a file; or a list of files, each through the vit in turn)
    in front of the prompt, through OUT's vit and segments (or
    ``backend``: a bmodel on the cmodel, its vit net included) and through transformers. ``dtype``: the thresholds'
    name ("float32", "float16", "bmodel-f16"...); ``free_running``: those compared without teacher forcing;
    ``min_cosine``: the vit's bound for a reduced-precision export or bmodel. ``turns``: a conversation of that
    many turns, each after the first the reference's reply and a new random prompt (``prompt_length`` ids), the
    runtime keeping its KV cache between turns (with block_kv_i, only the new tokens are prefilled)."""
    from ..runtime.loop import KvCache
    from .reference import load_full

    vision = vision_of(out_dir, manifest)
    files = [image] if image is None or isinstance(image, (str, Path)) else list(image)
    processed = load_images(out_dir, manifest, files)
    seq = int(manifest.options.seq_length)
    text = list(prompt) if prompt is not None else random_text_ids(int(manifest.model.vocab_size),
                                                                    prompt_length, seed, vision)
    ids = image_prompt_ids(text, vision, processed, seq)
    if len(ids) + new_tokens - 1 > seq:
        raise UsageError(f"the prompt with its image ({len(ids)} tokens) + {new_tokens} new tokens does not fit "
                         f"SEQ={seq}; use fewer --new-tokens or --prompt-length")
    model = load_full(source)
    reference = hf_image_features(model, processed)
    image_token = vision.token_ids["image"]
    first = hf_image_generate(model, ids, processed, image_token, new_tokens, eos)
    if turns == 1:
        del model  # one turn: the reference is done before the runtime loads
    runtime = SegmentRuntime(out_dir, manifest, backend=backend)
    cache, done, special = KvCache(), [], set(vision.token_ids.values())
    try:
        for turn in range(1, turns + 1):
            if turn > 1:
                if len(ids) + new_tokens - 1 > seq:
                    raise UsageError(f"turn {turn}: the conversation ({len(ids)} tokens) + {new_tokens} new tokens "
                                     f"does not fit SEQ={seq}; use fewer --turns, --new-tokens or --prompt-length")
            hf_tokens, hf_logits = first if turn == 1 else hf_image_generate(model, ids, processed, image_token,
                                                                            new_tokens, eos)
            forced = None if dtype in free_running else hf_tokens  # reduced precision: transformers' tokens fed back
            merged = encode_images(runtime, ids, processed, vision)
            reused = runtime.reusable_prefix(cache, ids, merged)
            trace = runtime.generate(ids, new_tokens, eos, forced=forced, image=merged, cache=cache)
            done.append(ImageTurn(list(ids), hf_tokens, hf_logits, trace, forced, reused))
            if turn < turns:
                if special & set(hf_tokens):
                    raise UsageError(f"turn {turn}: the reference's reply holds an image token, which would be "
                                     "another image in the next turn; use another --seed", option="turns")
                ids = ids + hf_tokens + random_text_ids(int(manifest.model.vocab_size), prompt_length,
                                                        seed + turn, vision)
    finally:
        runtime.close()
    ours = [merged.embeds, *merged.deepstack]
    if len(ours) != len(reference):
        raise UsageError(f"OUT's vit gives {len(ours)} outputs, transformers' vision model {len(reference)}: "
                         "re-export OUT with this tpugraph")
    cosines = [cosine(a, b) for a, b in zip(ours, reference)]
    record = {"image": ", ".join(p.source for p in processed), "images": len(processed),
              "grid_thw": [list(p.grid) for p in processed] if len(processed) > 1 else list(processed[0].grid),
              "crops": [p.crops for p in processed], "image_tokens": len(merged.rows),
              "vit_cosine": min(cosines),
              "vit_max_abs_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(ours, reference)),
              **({"deepstack_cosines": cosines[1:]} if len(cosines) > 1 else {}),
              "min_vit_cosine": MIN_VIT_COSINE if dtype == "float32" else min_cosine, "rope_delta": merged.delta}
    head = done[0]
    return ImageRun(head.prompt, head.hf_tokens, head.hf_logits, head.trace, head.forced, runtime.backend.name,
                    record, done)
