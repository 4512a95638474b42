"""A tiny random-weight Qwen2.5-VL built in code: Qwen2_5_VLConfig with small text and vision configs, saved with
save_pretrained beside a word-level tokenizer (with the image tokens and a chat template that places the image)
and the model's own image processor settings (preprocessor_config.json). Shared by the vision-language tests."""

from __future__ import annotations

from pathlib import Path

WORDS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
         "<|video_pad|>"]
TOKEN_IDS = dict(vision_start_token_id=5, vision_end_token_id=6, image_token_id=7, video_token_id=8)
CHAT_TEMPLATE = ("{% for m in messages %}<|user|> {% if m.content is string %}{{ m.content }} {% else %}"
                 "{% for c in m.content %}{% if c.type == 'image' %}<|vision_start|> <|image_pad|> <|vision_end|> "
                 "{% else %}{{ c.text }} {% endif %}{% endfor %}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
MAX_PIXELS = 112 * 112  # 64 patches of 14x14, 16 image tokens: the tests' vit
TEXT = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            initializer_range=0.2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                    "mrope_section": [2, 3, 3]})
# window_size 56: windows of 2x2 merged units (4x4 patches), so window and full attention differ on a 6x8 grid
VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, window_size=56,
              fullatt_block_indexes=[1], patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
              initializer_range=0.2)


def save_vlm_tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = WORDS + [f"w{i}" for i in range(vocab_size - len(WORDS))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)


def build_qwen2_5_vl(folder: Path, seed: int = 0, text: dict | None = None, vision: dict | None = None,
                     tokenizer: bool = True, processor: bool = True) -> Path:
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    text_config = {**TEXT, **(text or {})}
    config = Qwen2_5_VLConfig(text_config=text_config, vision_config={**VISION, **(vision or {})},
                              tie_word_embeddings=text_config.pop("tie_word_embeddings", False), **TOKEN_IDS)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ("norm" in name or "ln_q" in name) and name.endswith("weight"):
                param.add_(torch.randn_like(param) * 0.1)  # trained norms are not all ones
    model.save_pretrained(folder)
    if tokenizer:
        save_vlm_tokenizer(folder, text_config["vocab_size"])
    if processor:
        v = config.vision_config
        Qwen2VLImageProcessorPil(patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                                 merge_size=v.spatial_merge_size).save_pretrained(folder)
    return folder


# Qwen3-VL: a Qwen3 text model (q/k norms, head_dim apart) with interleaved mrope, and a vit of 16x16 patches with
# learned position embeddings (a 4x4 table interpolated to each grid) and deepstack features from blocks 0 and 1.
QWEN3_VL_MAX_PIXELS = 128 * 128  # 64 patches of 16x16, 16 image tokens
QWEN3_VL_TEXT = {**TEXT, "head_dim": 16, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                             "mrope_section": [2, 3, 3], "mrope_interleaved": True}}
QWEN3_VL_VISION = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                       temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=16,
                       deepstack_visual_indexes=[0, 1], initializer_range=0.2)


def build_qwen3_vl(folder: Path, seed: int = 0, text: dict | None = None, vision: dict | None = None,
                   tokenizer: bool = True, processor: bool = True) -> Path:
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    text_config = {**QWEN3_VL_TEXT, **(text or {})}
    config = Qwen3VLConfig(text_config=text_config, vision_config={**QWEN3_VL_VISION, **(vision or {})},
                           tie_word_embeddings=text_config.pop("tie_word_embeddings", False), **TOKEN_IDS)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.add_(torch.randn_like(param) * 0.1)  # trained norms are not all ones
            elif "pos_embed" in name:
                param.normal_(0.0, 1.0)  # position embeddings that move the vit's output
    model.save_pretrained(folder)
    if tokenizer:
        save_vlm_tokenizer(folder, text_config["vocab_size"])
    if processor:  # Qwen3-VL's processor: Qwen2-VL's, 16x16 patches, mean and std 0.5
        v = config.vision_config
        Qwen2VLImageProcessorPil(patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                                 merge_size=v.spatial_merge_size, image_mean=[0.5] * 3,
                                 image_std=[0.5] * 3).save_pretrained(folder)
    return folder


# Gemma 3: a Gemma 3 text model (sliding and full layers, the sliding window shorter than the image block so the
# bidirectional image attention meets the window) behind a SigLIP vit at a fixed 64x64 (8x8 patches of 8), pooled
# 2x2 to 16 image tokens by the projector. <boi> = 5, <eoi> = 6, the image token 7 (the Qwen words above).
GEMMA3_TOKEN_IDS = dict(boi_token_index=5, eoi_token_index=6, image_token_index=7)
GEMMA3_TEXT = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=8, max_position_embeddings=256,
                   layer_types=["sliding_attention", "full_attention"], sliding_window=8, bos_token_id=1,
                   eos_token_id=2, pad_token_id=0, initializer_range=0.2)
GEMMA3_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                     patch_size=8, vision_use_head=False)


# Gemma 3's tokenizer, in small: its image tokens and turn markers special (matched whole, even between other
# text), the blank line "\n\n" a token of its own, BOS added in front, the image tokens named in
# extra_special_tokens (as Gemma3Processor reads them), and its chat template's shape.
GEMMA3_WORDS = ["<pad>", "<bos>", "<eos>", "<unk>", "<start_of_turn>", "<start_of_image>", "<end_of_image>",
                "<image_soft_token>", "<end_of_turn>", "\n\n", "user", "model"]
GEMMA3_CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m.role == 'assistant' "
                        "else m.role }}\n{% if m.content is string %}{{ m.content }}{% else %}{% for c in m.content %}"
                        "{% if c.type == 'image' %}<start_of_image>{% else %}{{ c.text }}{% endif %}{% endfor %}"
                        "{% endif %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
                        "{% endif %}")


def save_gemma3_tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = GEMMA3_WORDS + [f"w{i}" for i in range(vocab_size - len(GEMMA3_WORDS))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(w, special=True, normalized=False) for w in GEMMA3_WORDS[:9]])
    tok.add_tokens([AddedToken("\n\n", normalized=False)])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", extra_special_tokens={
                                       "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                       "image_token": "<image_soft_token>"})
    fast.chat_template = GEMMA3_CHAT_TEMPLATE
    fast.save_pretrained(folder)


def build_gemma3(folder: Path, seed: int = 0, tokenizer: bool = True, processor: bool = True,
                 image_processor: dict | None = None) -> Path:
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    config = Gemma3Config(text_config=GEMMA3_TEXT, vision_config=GEMMA3_VISION, mm_tokens_per_image=16,
                          **GEMMA3_TOKEN_IDS)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.add_(torch.randn_like(param) * 0.1)  # trained norms are not all ones (nor zeros: 1 + w)
            elif "mm_input_projection_weight" in name:
                param.normal_(0.0, 0.2)  # transformers starts it at zeros: the image would reach nothing
    model.save_pretrained(folder)
    if tokenizer:
        save_gemma3_tokenizer(folder, GEMMA3_TEXT["vocab_size"])
    if processor:  # image_processor: other settings (pan-and-scan)
        size = GEMMA3_VISION["image_size"]
        Gemma3ImageProcessorPil(size={"height": size, "width": size}, image_mean=[0.5] * 3,
                                image_std=[0.5] * 3, **(image_processor or {})).save_pretrained(folder)
    return folder


# InternVL (transformers' layout, as OpenGVLab's -hf checkpoints): a Qwen2 text model behind an InternViT that takes
# 28x28 tiles (4x4 patches of 7), pixel-shuffled 2x2 to 4 rows per tile by the MLP projector. The brackets <img>,
# </img> and the placeholder <IMG_CONTEXT> are added tokens of the tokenizer (ids 5, 6, 7), as in the real ones; the
# processor crops an image into at most 4 tiles plus a thumbnail (the synthetic picture: 2x2 + 1).
INTERNVL_WORDS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<img>", "</img>", "<IMG_CONTEXT>"]
INTERNVL_TOKEN_IDS = dict(start=5, end=6, image=7)
INTERNVL_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("<|vision_start|> <|image_pad|> <|vision_end|> ", "<IMG_CONTEXT> ")
INTERNVL_TEXT = dict(model_type="qwen2", **{k: v for k, v in TEXT.items() if k != "rope_parameters"})
INTERNVL_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       image_size=28, patch_size=7, initializer_range=0.2)
INTERNVL_MAX_TILES = 4


def save_internvl_tokenizer(folder: Path, vocab_size: int, brackets: bool = True) -> None:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = INTERNVL_WORDS + [f"w{i}" for i in range(vocab_size - len(INTERNVL_WORDS))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(w, special=True) for w in INTERNVL_WORDS[5 if brackets else 7:]])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = INTERNVL_CHAT_TEMPLATE
    fast.save_pretrained(folder)


def build_internvl(folder: Path, seed: int = 0, tokenizer: bool = True, processor: bool = True,
                   brackets: bool = True) -> Path:
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    config = InternVLConfig(text_config=INTERNVL_TEXT, vision_config=INTERNVL_VISION,
                            image_token_id=INTERNVL_TOKEN_IDS["image"], image_seq_length=4, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.add_(torch.randn_like(param) * 0.1)  # trained norms are not all ones
            elif "norm" in name and name.endswith("bias"):
                # nor without bias: tpu-mlir 1.30.2's tpu optimization aborts ("v is none type") on an F16 vit whose
                # LayerNorms keep neither weight nor bias (the weight folded into the next MatMul, a zero bias dropped)
                param.normal_(0.0, 0.1)
            elif "lambda_" in name:
                param.uniform_(0.5, 1.5)  # layer scales of 0.1 would let the blocks barely move the rows
            elif "cls_token" in name or "position_embeddings" in name:
                param.normal_(0.0, 1.0)  # transformers starts them at zeros: the order of the patches would not matter
    model.save_pretrained(folder)
    if tokenizer:
        save_internvl_tokenizer(folder, INTERNVL_TEXT["vocab_size"], brackets)
    if processor:  # InternVL's own settings: crop_to_patches off in the file, InternVLProcessor turns it on
        size = INTERNVL_VISION["image_size"]
        GotOcr2ImageProcessorPil(size={"height": size, "width": size}, crop_to_patches=False, min_patches=1,
                                 max_patches=INTERNVL_MAX_TILES, image_mean=[0.485, 0.456, 0.406],
                                 image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


def image_conversation(out: Path, source: Path, turns: list[tuple[str, list]],
                       new_tokens: int = 3) -> list[tuple[int, int]]:
    """Drive OUT's nets through a chat of ``turns`` (user text, image files attached to it) keeping one KV cache,
    as `tpugraph chat` does, and check each turn against transformers' generate on the whole conversation with
    all its images (tokens equal, logits within 1e-3). Returns (prompt tokens, cached tokens reused) per turn."""
    import numpy as np

    from tpugraph.contract.manifest import read_manifest
    from tpugraph.proof.reference import load_full
    from tpugraph.proof.vision_verify import hf_image_generate
    from tpugraph.runtime.images import image_chat_messages, image_messages_ids, load_images
    from tpugraph.runtime.loop import KvCache, SegmentRuntime
    from tpugraph.runtime.text import stop_ids
    from tpugraph.runtime.vision import VisionConfig, encode_images
    from tpugraph.source.tokenizer import load_output_tokenizer

    manifest = read_manifest(out)
    tokenizer, vision = load_output_tokenizer(out, manifest), VisionConfig.of(manifest)
    runtime, cache, model = SegmentRuntime(out, manifest), KvCache(), load_full(source)
    eos = stop_ids(out, manifest, tokenizer)
    messages, images, reused = [], [], []
    try:
        for text, files in turns:
            new = load_images(out, manifest, files) if files else []
            images += new
            messages += image_chat_messages(text, len(new)) if new else [{"role": "user", "content": text}]
            ids = image_messages_ids(tokenizer, messages, vision, images, runtime.seq)
            merged = encode_images(runtime, ids, images, vision) if images else None
            reused.append((len(ids), runtime.reusable_prefix(cache, ids, merged)))
            trace = runtime.generate(ids, new_tokens, eos, cache=cache, image=merged)
            hf_tokens, hf_logits = hf_image_generate(model, ids, images, vision.token_ids["image"], new_tokens, eos)
            assert trace.tokens == hf_tokens, (text, trace.tokens, hf_tokens)
            assert max(float(np.max(np.abs(a - b))) for a, b in zip(trace.logits, hf_logits)) < 1e-3
            messages.append({"role": "assistant", "content": tokenizer.decode(trace.tokens, skip_special_tokens=True)})
    finally:
        runtime.close()
    return reused


def check_image_turns(out: Path, source: Path, files: list[Path]) -> None:
    """A --history-kv VLM export over three turns (an image, text only, another image): the chat against
    transformers keeps its KV cache (nothing cached before the first turn, each later turn reusing the history), and
    ``verify --turns 3`` (its image in the first turn) passes with the same reuse."""
    from tpugraph.proof.verify import verify

    reused = image_conversation(out, source, [("w3 w4", files[:1]), ("w5", []), ("w6 w7", files[1:])])
    (first, none), *later = reused
    assert none == 0 and all(kept >= before - 1 for (before, _), (_, kept) in zip(reused, later)), reused
    report = verify(out, turns=3, prompt_length=3, new_tokens=3)  # verify --turns: the image in the first turn
    assert report.passed, report.to_json()
    cached = [t.prompt_tokens - t.new_tokens for t in report.turns]
    assert cached[0] == 0 and all(kept >= t.prompt_tokens for t, kept in zip(report.turns, cached[1:]))
