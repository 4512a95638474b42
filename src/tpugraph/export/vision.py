"""A vision tower (transformers' module, its own weights) -> the ``vit`` segment: static shapes for a fixed
number of patches (or one fixed-size image or tile: Gemma 3, InternVL), the window bookkeeping (Qwen2.5-VL) and
the position-table interpolation (Qwen3-VL) left to the host (runtime/vision.py).

transformers' Qwen2.5-VL vision forward computes the rotary positions, the window order and the attention
splits (``cu_seqlens``) from ``grid_thw`` with data-dependent loops and splits. The segment takes them as
inputs instead, as tpu-mlir's llm_convert ``vit`` net does: the pixels already in window order, each patch's
(h, w) position, a full and a window attention mask (0 inside a sequence or window, -10000 elsewhere, which
is the split attention exactly) and the reverse index of the window order. docs/guides/vision-language.md.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelError
from .wrappers import clamp_mask


class QwenVitSegment(nn.Module):
    """(pixel_values [P, C*T*p*p], position_ids [P, 2], full_attn_mask [1,1,P,P], window_attn_mask [1,1,P,P],
    reverse_index [P/4]) -> vit_embeds [P/4, H]: Qwen2.5-VL's patch embedding, vision blocks and merger."""

    def __init__(self, visual: nn.Module, patches: int):
        super().__init__()
        self._take(visual, patches, "Qwen2.5-VL", ("patch_embed", "rotary_pos_emb", "blocks", "merger",
                                                    "fullatt_block_indexes"))
        self.full_blocks = {int(i) for i in visual.fullatt_block_indexes}

    def _take(self, visual: nn.Module, patches: int, family: str, parts: tuple[str, ...]) -> None:
        """The vision tower, its rotary tables for P patches and its patch embedding's weight as one matrix."""
        for part in parts:
            if not hasattr(visual, part):
                raise ModelError(f"{type(visual).__name__}: the {family} vit wrapper expects a vision tower with "
                                 f"{part}; this one has none")
        self.visual = visual
        self.patches = patches
        rotary = visual.rotary_pos_emb
        # cos/sin of every coordinate 0..P-1 for each frequency (the coordinates of P patches are below P),
        # computed as transformers computes them per patch.
        freqs = torch.arange(patches, dtype=torch.float32)[:, None] * rotary.inv_freq.float()[None]
        scale = float(getattr(rotary, "attention_scaling", 1.0))
        self.register_buffer("cos", freqs.cos() * scale, persistent=False)
        self.register_buffer("sin", freqs.sin() * scale, persistent=False)
        # The patch embedding (a Conv3d whose kernel is the patch) as one MatMul over the flat patch, its weight stored
        # already flat and transposed [C, hidden] as llm_convert stores it: a Reshape of a weight kept in external data
        # is not folded (fold_constants never duplicates a weight) and tpu-mlir's front end cannot read one
        # ("operand visual.patch_embed.proj.weight not found", a 3B-sized vit).
        conv = visual.patch_embed.proj.weight.detach()
        self.register_buffer("patch_weight", conv.reshape(conv.shape[0], -1).t().contiguous(), persistent=False)

    def _rotary(self, table: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        # [P, 2, F] -> the h lanes then the w lanes [P, 2F], twice over the head dim (transformers' layout), as
        # [1, P, 1, d]: computed once for every block, broadcast over the heads
        pair = table[position_ids].reshape(self.patches, -1)
        return torch.cat([pair, pair], dim=-1).reshape(1, self.patches, 1, -1)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    def _attention(self, attn: nn.Module, x: torch.Tensor, cos, sin, mask: torch.Tensor) -> torch.Tensor:
        # The language model's layout [1, P, heads, d] -> [1, heads, P, d] (permutes tpu-mlir folds into its
        # head-batched MatMul), not transformers' [P, heads, d] transposes, which it keeps as Permute ops.
        p, heads = self.patches, attn.num_heads
        q, k, v = attn.qkv(x).reshape(1, p, 3 * heads, -1).split(heads, dim=2)
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [1, heads, P, d]
        scores = torch.matmul(q, k.transpose(2, 3)) * attn.scaling + mask
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(p, -1)
        return attn.proj(out)

    def forward(self, pixel_values, position_ids, full_attn_mask, window_attn_mask, reverse_index):
        visual = self.visual
        x = torch.matmul(pixel_values.to(self.patch_weight.dtype), self.patch_weight)
        cos, sin = self._rotary(self.cos, position_ids), self._rotary(self.sin, position_ids)
        full, window = clamp_mask(full_attn_mask), clamp_mask(window_attn_mask)
        for index, block in enumerate(visual.blocks):
            mask = full if index in self.full_blocks else window
            x = x + self._attention(block.attn, block.norm1(x), cos, sin, mask)
            x = x + block.mlp(block.norm2(x))
        merged = visual.merger(x)  # [P / merge_unit, H], in window order
        return merged[reverse_index]


class Qwen3VitSegment(QwenVitSegment):
    """(pixel_values [P, C*T*p*p], position_ids [P, 2], pos_idx [P, 4], pos_weight [P, 4, 1],
    attention_mask [1,1,P,P]) -> vit_embeds [P/4, H], deepstack_0.. [P/4, H]: Qwen3-VL's patch embedding (with
    bias), its learned position table interpolated to the image's grid (the host computes each patch's 4 rows and
    weights, as transformers' ``get_vision_interpolation_indices_and_weights``), full-attention vision blocks, the
    merger and the deepstack mergers of the blocks in ``deepstack_visual_indexes``. No window order: the merged rows
    come out in the processor's (image) order."""

    def __init__(self, visual: nn.Module, patches: int):
        nn.Module.__init__(self)
        self._take(visual, patches, "Qwen3-VL", ("patch_embed", "pos_embed", "rotary_pos_emb", "blocks", "merger",
                                                  "deepstack_merger_list", "deepstack_visual_indexes"))
        self.deepstack = {int(block): k for k, block in enumerate(visual.deepstack_visual_indexes)}

    def forward(self, pixel_values, position_ids, pos_idx, pos_weight, attention_mask):
        visual = self.visual
        x = torch.matmul(pixel_values.to(self.patch_weight.dtype), self.patch_weight) + visual.patch_embed.proj.bias
        x = x + (visual.pos_embed(pos_idx) * pos_weight.to(x.dtype)).sum(dim=1)
        cos, sin = self._rotary(self.cos, position_ids), self._rotary(self.sin, position_ids)
        mask = clamp_mask(attention_mask)
        features = [None] * len(self.deepstack)
        for index, block in enumerate(visual.blocks):
            x = x + self._attention(block.attn, block.norm1(x), cos, sin, mask)
            x = x + block.mlp(block.norm2(x))
            if index in self.deepstack:
                k = self.deepstack[index]
                features[k] = visual.deepstack_merger_list[k](x)
        return (visual.merger(x), *features)


class Gemma3VitSegment(nn.Module):
    """(pixel_values [1, 3, S, S]) -> vit_embeds [mm_tokens_per_image, H]: Gemma 3's SigLIP tower (static at its
    fixed image size: nothing for the host to compute) and the multimodal projector (average pooling, RMSNorm,
    projection), as transformers' ``get_image_features``."""

    def __init__(self, visual: nn.Module, projector: nn.Module):
        super().__init__()
        if projector is None:
            raise ModelError("the Gemma 3 vit wrapper needs the multimodal projector beside the vision tower")
        self.visual = visual
        self.projector = projector

    def forward(self, pixel_values):
        hidden = self.visual(pixel_values=pixel_values).last_hidden_state
        return self.projector(hidden)[0]


class InternVitSegment(nn.Module):
    """(pixel_values [1, 3, S, S]) -> vit_embeds [(S/patch)^2 / k^2, H]: one InternVL tile (llm_convert's InternVL3
    vit): InternViT's patch embedding, class token and position table (at the config's image size, so never
    interpolated), its layers, the class token dropped, the pixel shuffle (k x k neighbours into one row of k^2
    channels, k = 1 / downsample_ratio, as transformers' ``InternVLModel.pixel_shuffle``) and the MLP projector."""

    def __init__(self, visual: nn.Module, projector: nn.Module):
        super().__init__()
        if projector is None:
            raise ModelError("the InternVL vit wrapper needs the multimodal projector beside the vision tower")
        self.visual = visual
        self.projector = projector
        width = int(visual.config.hidden_size)
        # the projector's input is k^2 vision channels: k from its weights, not from the top-level config
        self.k = int(round((projector.linear_1.in_features // width) ** 0.5))
        self.side = square_size(visual.config.image_size) // square_size(visual.config.patch_size)

    def forward(self, pixel_values):
        embeddings = self.visual.embeddings
        x = embeddings.patch_embeddings(pixel_values)  # [1, P, C]
        x = torch.cat([embeddings.cls_token, x], dim=1)
        if embeddings.position_embeddings is not None:
            x = x + embeddings.position_embeddings
        for layer in self.visual.encoder.layer:
            x = self._layer(layer, x)
        x = self.visual.layernorm(x)[:, 1:]
        g, k, c = self.side, self.k, x.shape[-1]
        x = x.reshape(1, g, g // k, k * c).transpose(1, 2).reshape(1, g // k, g // k, k * k * c).transpose(1, 2)
        return self.projector(x.reshape(-1, k * k * c))

    @staticmethod
    def _layer(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """transformers' InternVLVisionLayer with its attention written out, the queries scaled before Q @ K^T: the
        eager form (scores scaled after, no mask) is what onnxsim fuses into com.microsoft::Attention, which
        tpu-mlir cannot convert."""
        attn = layer.attention
        p, heads = x.shape[1], attn.num_heads
        h = layer.layernorm_before(x)
        q, k, v = attn.q_norm(attn.q_proj(h)), attn.k_norm(attn.k_proj(h)), attn.v_proj(h)
        q, k, v = (t.reshape(1, p, heads, -1).transpose(1, 2) for t in (q, k, v))  # [1, heads, P, d]
        probs = torch.softmax(torch.matmul(q * attn.scale, k.transpose(2, 3)), dim=-1)
        x = x + layer.lambda_1 * attn.projection_layer(torch.matmul(probs, v).transpose(1, 2).reshape(1, p, -1))
        return x + layer.lambda_2 * layer.mlp(layer.layernorm_after(x))


VIT_WRAPPERS = {"qwen2_5_vl": QwenVitSegment, "qwen3_vl": Qwen3VitSegment}


def vit_segment(kind: str, visual: nn.Module, patches: int, projector: nn.Module | None = None) -> nn.Module:
    if kind == "gemma3":
        return Gemma3VitSegment(visual, projector)
    if kind == "internvl":
        return InternVitSegment(visual, projector)
    return VIT_WRAPPERS[kind](visual, patches)


def square_size(value) -> int:
    """A size given as n or as (n, n) (InternViT's image_size and patch_size)."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ModelError(f"a non-square vision size {list(value)} is not supported")
        value = value[0]
    return int(value)


def vision_dims(config, family, max_pixels: int | None):
    """The vit segment's VisionDims for ``max_pixels`` (the family's default when None), or a UsageError saying
    what a valid value is."""
    from ..contract.segments import VisionDims
    from ..errors import UsageError

    v = config.vision_config
    if family.vision.kind in ("gemma3", "internvl"):
        return fixed_vision_dims(config, family, max_pixels)
    patch, merge = int(v.patch_size), int(v.spatial_merge_size)
    max_pixels = family.vision.default_max_pixels if max_pixels is None else int(max_pixels)
    unit = (patch * merge) ** 2
    if max_pixels < unit or max_pixels % unit:
        raise UsageError(f"must be a positive multiple of (patch_size x spatial_merge_size)^2 = {unit} "
                         f"(got {max_pixels}; e.g. {unit * 16} for a {patch * merge * 4}x{patch * merge * 4} image)",
                         option="max_pixels")
    patches = max_pixels // (patch * patch)
    in_channels = int(getattr(v, "in_channels", None) or getattr(v, "in_chans", 3))
    return VisionDims(patches=patches, patch_dim=in_channels * int(v.temporal_patch_size) * patch * patch,
                      merge_unit=merge * merge, max_pixels=max_pixels, kind=family.vision.kind,
                      deepstack=len(getattr(v, "deepstack_visual_indexes", None) or ()))


def fixed_vision_dims(config, family, max_pixels: int | None):
    """A vit at one fixed image size (Gemma 3's SigLIP; InternViT's tile): --max-pixels is that size or nothing."""
    from ..contract.segments import VisionDims
    from ..errors import UsageError

    v = config.vision_config
    size, patch = square_size(v.image_size), square_size(v.patch_size)
    if max_pixels is not None and int(max_pixels) != size * size:
        raise UsageError(f"this vit takes images of {size}x{size} only (the processor resizes every image to it): "
                         f"leave it out or give {size * size}", option="max_pixels")
    patches = (size // patch) ** 2
    if family.vision.kind == "internvl":  # the pixel shuffle: k x k patches -> one row
        merge_unit = internvl_merge(config, size // patch) ** 2
    else:
        merge_unit = patches // int(config.mm_tokens_per_image)
    return VisionDims(patches=patches, patch_dim=int(getattr(v, "num_channels", 3)) * patch * patch,
                      merge_unit=merge_unit, max_pixels=size * size, kind=family.vision.kind)


def internvl_merge(config, side: int) -> int:
    """k = 1 / downsample_ratio, the pixel shuffle's side, refusing what the InternVL vit does not export: a
    feature layer other than the last, a feature strategy that keeps the class token, a grid k does not divide."""
    from ..errors import UnsupportedModelError

    layer, strategy = config.vision_feature_layer, config.vision_feature_select_strategy
    if layer != -1 or strategy != "default":
        raise UnsupportedModelError(f"InternVL with vision_feature_layer={layer}, vision_feature_select_strategy="
                                    f"{strategy!r} is not supported yet: its vit exports the last layer's patch "
                                    "rows (-1, 'default')")
    k = int(round(1 / float(config.downsample_ratio)))
    if abs(k * float(config.downsample_ratio) - 1) > 1e-6 or side % k:
        raise UnsupportedModelError(f"InternVL with downsample_ratio={config.downsample_ratio} on a {side}x{side} "
                                    "patch grid is not supported: the pixel shuffle needs 1/ratio, an integer "
                                    "dividing the grid")
    return k
