"""The host side of a vision-language output (docs/guides/vision-language.md): an image's patches -> the vit
net's inputs (Qwen2.5-VL: window order, rotary positions, masks, reverse index; Qwen3-VL: rotary positions,
position-table taps and weights, mask; InternVL: one run per tile), the prompt's 3-D rotary positions (mrope), the
vit rows merged into the embedding of the image placeholder tokens and (Qwen3-VL) the deepstack rows added after the
first blocks.

numpy re-implementations of what transformers' Qwen2.5-VL computes from ``grid_thw`` (``get_vision_position_ids``,
``get_vision_window_index``, ``get_rope_index``), so the runtime needs neither torch nor transformers' models.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..contract.segments import MASK_VALUE
from ..errors import UsageError


@dataclass(frozen=True)
class VisionConfig:
    """What the host needs of the vit (the manifest's model.vision record)."""

    patches: int  # P, the vit's compiled number of patches
    patch_dim: int
    tokens: int  # P / merge_unit
    max_pixels: int
    patch_size: int
    spatial_merge_size: int
    window_size: int
    token_ids: dict  # image, start, end
    kind: str = "qwen2_5_vl"
    position_embeddings: int = 0  # Qwen3-VL: rows of the learned position table (a square grid)
    deepstack: int = 0  # Qwen3-VL: the vit's deepstack outputs, added after language-model blocks 0..deepstack-1
    placeholder: str = "image"  # the token role the image goes at (VisionSpec.placeholder)
    bidirectional: bool = False  # the image tokens attend to each other both ways in the prefill (Gemma 3)
    mrope: bool = True  # 3-D rotary positions (Qwen); else the plain 1-D ones
    bracketed: bool = False  # the image placeholder becomes start + image tokens + end (VisionSpec.bracketed)

    @classmethod
    def of(cls, manifest) -> "VisionConfig | None":
        from ..source.families import family_by_name

        v = manifest.model.vision
        if v is None:
            return None
        spec = family_by_name(manifest.model.family).vision
        return cls(patches=v.patches, patch_dim=v.patch_dim, tokens=v.tokens, max_pixels=v.max_pixels,
                   patch_size=v.patch_size, spatial_merge_size=v.spatial_merge_size, window_size=v.window_size,
                   token_ids={k: int(x) for k, x in v.token_ids.items()}, kind=v.kind,
                   position_embeddings=int(v.num_position_embeddings or 0),
                   deepstack=len(v.deepstack_visual_indexes or ()), placeholder=spec.placeholder,
                   bidirectional=spec.bidirectional_image, mrope=bool(manifest.model.mrope_section),
                   bracketed=spec.bracketed)

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size ** 2


def vision_position_ids(grid: tuple[int, int, int], merge: int) -> np.ndarray:
    """[t*h*w, 2] (h, w) of each patch, in the processor's order: merge x merge blocks, row-major."""
    t, h, w = grid
    hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    hpos = hpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    wpos = wpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    return np.tile(np.stack([hpos, wpos], axis=-1), (t, 1))


def window_index(grid: tuple[int, int, int], merge: int, window_size: int, patch_size: int):
    """(the merged units in window order [t*h*w / merge^2], window lengths in patches): transformers'
    ``get_vision_window_index`` for one image."""
    t, h, w = grid
    side = window_size // merge // patch_size
    gh, gw = h // merge, w // merge
    index = np.arange(t * gh * gw).reshape(t, gh, gw)
    pad_h, pad_w = side - gh % side, side - gw % side
    nh, nw = (gh + pad_h) // side, (gw + pad_w) // side
    padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-100)
    padded = padded.reshape(t, nh, side, nw, side).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, side, side)
    lengths = (padded != -100).sum(axis=(2, 3)).reshape(-1) * merge * merge
    flat = padded.reshape(-1)
    return flat[flat != -100], [int(n) for n in lengths if n > 0]


@dataclass
class VitInputs:
    """The vit net's five inputs (in its order) and how many of its output rows are the image's."""

    arrays: tuple[np.ndarray, ...]
    rows: int


def _check_patches(pixel_values: np.ndarray, grid: tuple[int, int, int], vision: VisionConfig) -> int:
    n = int(np.prod(grid))
    if pixel_values.shape != (n, vision.patch_dim):
        raise UsageError(f"the image processor gave pixel_values {list(pixel_values.shape)}; the vit takes "
                         f"[{n}, {vision.patch_dim}] for grid {list(grid)}: is OUT's preprocessor_config.json "
                         "the model's own?")
    if n > vision.patches:
        raise UsageError(f"the image has {n} patches, more than the {vision.patches} the vit was exported for "
                         f"(--max-pixels {vision.max_pixels})")
    return n


def vit_inputs(pixel_values: np.ndarray, grid: tuple[int, int, int], vision: VisionConfig,
               mask_value: float = MASK_VALUE) -> VitInputs:
    """pixel_values [n, patch_dim] of one image (the processor's output) -> the vit's inputs padded to P patches."""
    if vision.kind == "qwen3_vl":
        return qwen3_vit_inputs(pixel_values, grid, vision, mask_value)
    if vision.kind == "gemma3":  # the processor's image as it is: [1, 3, S, S]
        side = int(round(vision.max_pixels ** 0.5))
        if pixel_values.shape != (1, 3, side, side):
            raise UsageError(f"the image processor gave pixel_values {list(pixel_values.shape)}; the vit takes "
                             f"[1, 3, {side}, {side}]: is OUT's preprocessor_config.json the model's own?")
        return VitInputs((np.asarray(pixel_values, dtype=np.float32),), vision.tokens)
    n = _check_patches(pixel_values, grid, vision)
    unit = vision.merge_unit
    order, lengths = window_index(grid, vision.spatial_merge_size, vision.window_size, vision.patch_size)
    p = vision.patches

    def windowed(rows: np.ndarray) -> np.ndarray:
        return rows.reshape(n // unit, unit, -1)[order].reshape(n, -1)

    pixels = np.zeros((p, vision.patch_dim), dtype=np.float32)
    pixels[:n] = windowed(np.asarray(pixel_values, dtype=np.float32))
    positions = np.zeros((p, 2), dtype=np.int64)
    positions[:n] = windowed(vision_position_ids(grid, vision.spatial_merge_size))
    full = np.full((1, 1, p, p), mask_value, dtype=np.float32)
    window = np.full((1, 1, p, p), mask_value, dtype=np.float32)
    frame = grid[1] * grid[2]  # full attention is per frame (one frame for an image)
    for start in range(0, n, frame):
        full[0, 0, start:start + frame, start:start + frame] = 0.0
    start = 0
    for length in lengths:
        window[0, 0, start:start + length, start:start + length] = 0.0
        start += length
    for pad in range(n, p):  # padding rows see themselves only: finite, and never read
        full[0, 0, pad, pad] = window[0, 0, pad, pad] = 0.0
    reverse = np.arange(p // unit, dtype=np.int64)
    reverse[: n // unit] = np.argsort(order)
    return VitInputs((pixels, positions, full, window, reverse), n // unit)


def interpolation_taps(grid: tuple[int, int, int], merge: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """([t*h*w, 4] rows of a side x side learned position table, [t*h*w, 4] their weights) per patch in the
    processor's order: bilinear with aligned corners, transformers' ``get_vision_interpolation_indices_and_weights``
    for one image."""
    hw = vision_position_ids(grid, merge)  # (row, col) of each patch

    def axis(index: np.ndarray, size: int):
        src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
        floor = np.floor(src)
        taps = np.clip(floor.astype(np.int64)[:, None] + np.arange(2), 0, side - 1)
        weights = np.clip(1 - np.abs(src[:, None] - floor[:, None] - np.arange(2, dtype=np.float32)), 0, None)
        return taps, weights

    h_taps, h_weights = axis(hw[:, 0], grid[1])
    w_taps, w_weights = axis(hw[:, 1], grid[2])
    indices = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weights = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
    return indices, weights


def qwen3_vit_inputs(pixel_values: np.ndarray, grid: tuple[int, int, int], vision: VisionConfig,
                     mask_value: float = MASK_VALUE) -> VitInputs:
    """Qwen3-VL's vit inputs padded to P patches: the pixels and (h, w) positions in the processor's order, each
    patch's 4 position-table rows and weights, and full attention within each frame."""
    n = _check_patches(pixel_values, grid, vision)
    p = vision.patches
    pixels = np.zeros((p, vision.patch_dim), dtype=np.float32)
    pixels[:n] = pixel_values
    positions = np.zeros((p, 2), dtype=np.int64)
    positions[:n] = vision_position_ids(grid, vision.spatial_merge_size)
    side = int(round(vision.position_embeddings ** 0.5))
    taps, weights = interpolation_taps(grid, vision.spatial_merge_size, side)
    pos_idx = np.zeros((p, 4), dtype=np.int64)
    pos_idx[:n] = taps
    pos_weight = np.zeros((p, 4, 1), dtype=np.float32)
    pos_weight[:n, :, 0] = weights
    mask = np.full((1, 1, p, p), mask_value, dtype=np.float32)
    frame = grid[1] * grid[2]
    for start in range(0, n, frame):
        mask[0, 0, start:start + frame, start:start + frame] = 0.0
    for pad in range(n, p):  # padding rows see themselves only: finite, and never read
        mask[0, 0, pad, pad] = 0.0
    return VitInputs((pixels, positions, pos_idx, pos_weight, mask), n // vision.merge_unit)


def expand_image_tokens(ids: list[int], vision: VisionConfig, grids) -> list[int]:
    """The prompt with each image placeholder repeated once per vit row of its image (as the processor does), the
    images taken in order; a prompt without a placeholder gets the images' bracketed blocks in front. ``grids``:
    one (t, h, w) per image (one grid alone: one image). A prompt with placeholders for more or fewer images than
    given is one clear line."""
    grids = [grids] if grids and isinstance(grids[0], (int, np.integer)) else list(grids)
    image, start, end = (vision.token_ids[k] for k in ("image", "start", "end"))
    counts = [int(np.prod(grid)) // vision.merge_unit for grid in grids]
    marker = start if vision.placeholder == "start" else image
    places = [i for i, t in enumerate(ids) if t == marker]
    # Gemma 3's <start_of_image> and InternVL's <IMG_CONTEXT> stand alone for the image; Qwen's sits in brackets
    alone = marker == start or vision.bracketed
    if not places:  # the images' blocks in front, each with its placeholder
        ids = [t for _ in counts for t in ([marker] if alone else [start, image, end])] + list(ids)
        places = [i for i, t in enumerate(ids) if t == marker]
    if len(places) != len(counts):
        raise UsageError(f"the prompt holds {len(places)} image placeholder(s) for {len(counts)} image(s): give "
                         "one image per placeholder, in order")
    out, at = [], 0
    for place, count in zip(places, counts):
        out += ids[at:place]
        # Gemma 3 / InternVL: the placeholder -> start, image x count, end; Qwen: the placeholder x count
        out += [start] + [image] * count + [end] if alone else [image] * count
        at = place + 1
    return out + list(ids[at:])


def rope_index(ids: list[int], image_token: int, grids, merge: int) -> tuple[np.ndarray, int]:
    """([3, n] mrope positions of the prompt, rope delta): transformers' ``get_rope_index``, the images in order
    (``grids``: one (t, h, w) per image; one grid alone: one image; None: text only).

    Text tokens count on one by one on all three rows; an image's tokens take (t, h, w) grid positions from
    where the text stopped, and the text after it goes on from the largest of them + 1. A decode step's three
    rows are all ``index + delta``."""
    if grids is not None and grids and isinstance(grids[0], (int, np.integer)):
        grids = [grids]
    pending = list(grids or ())
    n = len(ids)
    positions = np.zeros((3, n), dtype=np.int64)
    at, current = 0, 0
    while at < n:
        if ids[at] != image_token or not pending:
            positions[:, at] = current
            at += 1
            current += 1
            continue
        grid = pending.pop(0)
        t, h, w = grid[0], grid[1] // merge, grid[2] // merge
        count = t * h * w
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
        positions[:, at:at + count] = np.stack([tt, hh, ww]).reshape(3, -1) + current
        at += count
        current += max(t, h, w)
    delta = int(positions.max()) + 1 - n if n else 0
    return positions, delta


@dataclass
class PromptImage:
    """An image merged into a prompt: its vit rows, where they go, and the prompt's rotary positions."""

    embeds: np.ndarray  # [k, H]
    rows: np.ndarray  # the k prompt indices of the image placeholder
    positions: np.ndarray  # [3, n]
    delta: int  # decode positions: index + delta
    # Qwen3-VL's deepstack features, [k, H] each: the i-th is added to the image rows of block i's output (prefill).
    deepstack: tuple = ()
    bidirectional: bool = False  # Gemma 3: each image block's rows attend to each other both ways in the prefill

    @property
    def blocks(self) -> list[np.ndarray]:
        """The image rows in runs of consecutive prompt indices: one per image block (transformers' Gemma 3
        ``get_block_sequence_ids_for_mask``: a new block starts at an image token after a non-image one)."""
        return np.split(self.rows, np.flatnonzero(np.diff(self.rows) != 1) + 1) if len(self.rows) else []

    def attend(self, mask: np.ndarray, column: int = 0) -> np.ndarray:
        """The prefill mask [1, 1, L, L] with the rows of each image block seeing each other, never a later block
        (itself when not bidirectional). ``column``: where the prompt's own columns start (a history prefill's
        [1, 1, L, SEQ + L] mask: SEQ)."""
        if not self.bidirectional:
            return mask
        mask = np.array(mask, copy=True)
        for block in self.blocks:
            mask[0, 0, block[:, None], column + block[None, :]] = 0.0
        return mask

    def window(self, start: int, n: int) -> "PromptImage":
        """What tokens ``start .. start+n-1`` of the prompt hold (a history prefill's chunk), in the chunk's own
        indices: its image rows, positions and deepstack rows."""
        inside = (self.rows >= start) & (self.rows < start + n)
        return PromptImage(self.embeds[inside], self.rows[inside] - start, self.positions[:, start:start + n],
                           self.delta, tuple(d[inside] for d in self.deepstack), self.bidirectional)

    def add_deepstack(self, hidden: np.ndarray, layer: int) -> np.ndarray:
        """Block ``layer``'s output [1, L, H] with its deepstack rows added at the image tokens (itself when the
        layer has none)."""
        if layer >= len(self.deepstack):
            return hidden
        hidden = np.array(hidden, copy=True)
        hidden[0, self.rows] += self.deepstack[layer].astype(hidden.dtype)
        return hidden

    def merge(self, hidden: np.ndarray) -> np.ndarray:
        """The embedding net's [1, L, H] with the image rows in place of the placeholder tokens' embeddings."""
        hidden = np.array(hidden, copy=True)
        hidden[0, self.rows] = self.embeds
        return hidden


def vit_runs(pixel_values: np.ndarray, grid: tuple[int, int, int], vision: VisionConfig,
             mask_value: float = MASK_VALUE) -> list[VitInputs]:
    """The vit runs of one image: InternVL's tiles [n, 3, S, S] (the processor's, thumbnail last) one run each,
    [1, 3, S, S], their rows one after the other; Gemma 3 with pan-and-scan, the image then each crop
    (``vit_tiles``); any other vit, one run (``vit_inputs``)."""
    if vision.kind != "internvl":
        return [vit_inputs(tile, grid, vision, mask_value) for tile in vit_tiles(pixel_values, vision)]
    side = int(round(vision.max_pixels ** 0.5))
    if pixel_values.ndim != 4 or pixel_values.shape[1:] != (3, side, side):
        raise UsageError(f"the image processor gave pixel_values {list(pixel_values.shape)}; the vit takes tiles "
                         f"[n, 3, {side}, {side}]: is OUT's preprocessor_config.json the model's own?")
    return [VitInputs((np.ascontiguousarray(tile[None], dtype=np.float32),), vision.tokens) for tile in pixel_values]


def encode_image(runtime, ids: list[int], pixel_values: np.ndarray, grid: tuple[int, int, int],
                 vision: VisionConfig) -> PromptImage:
    """Run the vit on one image (``runtime.run``) and place its rows at the placeholder tokens of ``ids`` (already
    expanded: ``expand_image_tokens``)."""
    return encode_images(runtime, ids, [(pixel_values, grid)], vision)


def vit_tiles(pixel_values: np.ndarray, vision: VisionConfig) -> list[np.ndarray]:
    """What goes through the vit for one processed image: itself, or (Gemma 3 with pan-and-scan) the image and
    each of its crops, [1, 3, S, S] each, in the prompt's order."""
    if vision.kind == "gemma3" and np.ndim(pixel_values) == 4:
        return [pixel_values[i:i + 1] for i in range(len(pixel_values))]
    return [pixel_values]


def encode_images(runtime, ids: list[int], images, vision: VisionConfig) -> PromptImage:
    """Run the vit on each image in turn (``images``: (pixel_values, grid) pairs, or objects with those
    attributes, in the prompt's order) and place their rows at the placeholder tokens of ``ids`` (already
    expanded: ``expand_image_tokens``), the 3-D positions computed over all of them."""
    pairs = [(x.pixel_values, x.grid) if hasattr(x, "pixel_values") else x for x in images]
    embeds, deepstack = [], []
    for pixel_values, grid in pairs:
        for inputs in vit_runs(pixel_values, grid, vision, runtime.mask_value):
            rows, *stack = runtime.run("vit", *inputs.arrays)
            embeds.append(np.asarray(rows)[: inputs.rows])
            deepstack.append([np.asarray(d)[: inputs.rows] for d in stack])
    rows = np.flatnonzero(np.asarray(ids) == vision.token_ids["image"])
    total = sum(len(e) for e in embeds)
    if len(rows) != total:
        raise UsageError(f"the prompt has {len(rows)} image tokens for {len(pairs)} image(s) of {total} vit rows")
    if vision.mrope:
        positions, delta = rope_index(ids, vision.token_ids["image"], [grid for _, grid in pairs],
                                      vision.spatial_merge_size)
    else:
        positions, delta = np.arange(len(ids), dtype=np.int64)[None], 0
    layers = len(deepstack[0]) if deepstack else 0
    return PromptImage(np.concatenate(embeds), rows, positions, delta,
                       tuple(np.concatenate([d[i] for d in deepstack]) for i in range(layers)), vision.bidirectional)
