"""Image files (or the built-in synthetic test image) -> the model's own image processor's patches, within the
vit's compiled size, and the prompt ids with its image placeholders expanded, one image each (tpugraph run/verify
--image, chat /image).

The processor is the one saved beside the tokenizer (OUT/tokenizer/preprocessor_config.json), loaded through
transformers' PIL image processors (torchvision is not needed). An image larger than the vit's max_pixels is
resized within it as the processor itself resizes (``size.longest_edge``), never refused for its size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..contract.manifest import Manifest
from ..errors import UsageError
from ..source.tokenizer import TOKENIZER_DIR
from .vision import VisionConfig, expand_image_tokens

PROCESSOR_FILE = "preprocessor_config.json"
SYNTHETIC = "synthetic"  # the source label of the built-in test image


# Gemma3Processor's own values for the pan-and-scan settings its preprocessor_config.json leaves null (its
# ``images_kwargs``): pan-and-scan is off unless OUT's preprocessor_config.json turns it on.
GEMMA3_PAN_AND_SCAN = {"do_pan_and_scan": False, "pan_and_scan_min_crop_size": 256, "pan_and_scan_max_num_crops": 4,
                       "pan_and_scan_min_ratio_to_activate": 1.2}


@dataclass
class ProcessedImage:
    pixel_values: np.ndarray  # [t*h*w, patch_dim] float32 (Gemma 3: [1 + crops, 3, S, S])
    grid: tuple[int, int, int]  # (t, h, w) in patches
    source: str  # the file, or "synthetic"
    crops: int = 0  # Gemma 3 with pan-and-scan: the crops after the whole image in pixel_values


def synthetic_image(width: int = 100, height: int = 80):
    """A deterministic test picture (gradients and a disc): not square and not a multiple of the patch grid,
    so it goes through the processor's resize."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    disc = ((x - width * 0.6) ** 2 + (y - height * 0.4) ** 2) < (min(width, height) * 0.25) ** 2
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                    np.where(disc, 230, 40)], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def open_image(path: str | Path):
    """The file as an RGB PIL image, or one clear line (UsageError, exit 2) when it is missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise UsageError(f"'{path}' not found", option="image")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise UsageError(f"'{path}' is not an image PIL can read", option="image") from None
    except OSError as exc:
        raise UsageError(f"'{path}' cannot be read: {exc.strerror or exc}", option="image") from None


def vision_of(out_dir: Path, manifest: Manifest) -> VisionConfig:
    """OUT's vit settings, or one line saying OUT takes no images."""
    vision = VisionConfig.of(manifest)
    if vision is None:
        raise UsageError(f"given, but '{out_dir}' is a text-only model ({manifest.model.architecture}) and "
                         "takes no image", option="image")
    return vision


def load_processor(out_dir: Path, manifest: Manifest):
    """OUT's copy of the model's image processor (PIL backend)."""
    record = manifest.model.tokenizer
    folder = Path(out_dir) / ((record.dir if record else None) or TOKENIZER_DIR)
    if record is None or PROCESSOR_FILE not in record.files or not (folder / PROCESSOR_FILE).is_file():
        raise UsageError(f"'{out_dir}' has no image processor ({TOKENIZER_DIR}/{PROCESSOR_FILE}): the source model "
                         "had no preprocessor_config.json; add it to the model folder and re-export")
    import warnings

    from transformers import AutoImageProcessor

    try:
        with warnings.catch_warnings():  # "torchvision not available, using the PIL processor"
            warnings.simplefilter("ignore")
            return AutoImageProcessor.from_pretrained(str(folder), backend="pil")
    except TypeError:
        return AutoImageProcessor.from_pretrained(str(folder))
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"transformers cannot load the image processor in {folder}: {first}") from None


def process_image(processor, image, vision: VisionConfig, source: str) -> ProcessedImage:
    """The processor's patches of ``image``, resized to at most the vit's max_pixels (a vit of one fixed size: the
    processor's own resize to it)."""
    if vision.kind == "gemma3":  # pan-and-scan as Gemma3Processor runs it: the saved settings, else its own
        settings = {k: default if getattr(processor, k, None) is None else getattr(processor, k)
                    for k, default in GEMMA3_PAN_AND_SCAN.items()}
        out = processor(images=image, return_tensors="np", **settings)
        side = int(round(vision.patches ** 0.5))
        crops = int(np.asarray(out.get("num_crops", [0])).reshape(-1)[0])
        return ProcessedImage(np.asarray(out["pixel_values"], dtype=np.float32), (1, side, side), source, crops)
    if vision.kind == "internvl":  # tiles as InternVLProcessor makes them (it crops to patches by default)
        out = processor(images=image, crop_to_patches=True, return_tensors="np")
        pixels = np.asarray(out["pixel_values"], dtype=np.float32)
        side = int(round(vision.patches ** 0.5))
        return ProcessedImage(pixels, (len(pixels), side, side), source)
    size = dict(getattr(processor, "size", None) or {})
    shortest = min(int(size.get("shortest_edge", 56 * 56)), vision.max_pixels)
    out = processor(images=image, size={"shortest_edge": shortest, "longest_edge": vision.max_pixels},
                    return_tensors="np")
    grid = tuple(int(x) for x in np.asarray(out["image_grid_thw"]).reshape(-1)[:3])
    return ProcessedImage(np.asarray(out["pixel_values"], dtype=np.float32), grid, source)


def load_image(out_dir: Path, manifest: Manifest, image: str | Path | None) -> ProcessedImage:
    """``image`` (a file, or None for the built-in test picture) through OUT's processor."""
    return load_images(out_dir, manifest, [image])[0]


def load_images(out_dir: Path, manifest: Manifest, images) -> list[ProcessedImage]:
    """Each of ``images`` (files; None: the built-in test picture) through OUT's processor, in order."""
    vision = vision_of(out_dir, manifest)
    pictures = [(synthetic_image(), SYNTHETIC) if image is None else (open_image(image), str(image))
                for image in images]  # every file read before the processor loads
    processor = load_processor(out_dir, manifest)
    return [process_image(processor, picture, vision, source) for picture, source in pictures]


def _as_list(images) -> list[ProcessedImage]:
    return [] if images is None else [images] if isinstance(images, ProcessedImage) else list(images)


def _fits(ids: list[int], images: list[ProcessedImage], seq: int) -> list[int]:
    if len(ids) > seq:
        raise UsageError(f"the prompt with its {len(images)} image(s) is {len(ids)} tokens, longer than this "
                         f"output's SEQ={seq}")
    return ids


def image_prompt_ids(ids: list[int], vision: VisionConfig, images, seq: int) -> list[int]:
    """The prompt ids as the model takes them: its image placeholders expanded for ``images`` (one
    ProcessedImage, a list of them in order, or None); a placeholder without an image, placeholders for more or
    fewer images than given, or a prompt that no longer fits SEQ, is one clear line. A Gemma 3 image with
    pan-and-scan crops is a block for the image and one for each crop, back to back (the processor's text
    around them needs a text prompt: ``text_prompt_ids``)."""
    images = _as_list(images)
    placeholder = vision.token_ids[vision.placeholder]
    if not images:
        if placeholder in ids:
            raise UsageError("the prompt holds an image placeholder but no image was given: pass --image FILE")
        return ids
    grids = [image.grid for image in images]
    if vision.placeholder == "start" and any(image.crops for image in images):  # a block per tile, back to back
        at = [i for i, t in enumerate(ids) if t == placeholder]
        if not at:
            ids, at = [placeholder] * len(images) + list(ids), list(range(len(images)))
        if len(at) == len(images):  # other counts: refused by expand_image_tokens
            for i, image in zip(reversed(at), reversed(images)):
                ids = list(ids[:i]) + [placeholder] * (1 + image.crops) + list(ids[i + 1:])
            grids = [image.grid for image in images for _ in range(1 + image.crops)]
    return _fits(expand_image_tokens(ids, vision, grids), images, seq)


def gemma3_image_text(tokenizer, vision: VisionConfig, image: ProcessedImage) -> str:
    """What Gemma3Processor puts in the text for one image (``replace_image_token``): the image block between
    blank lines, and with pan-and-scan crops its sentence and one block per crop."""
    boi, soft, eoi = (tokenizer.convert_ids_to_tokens(vision.token_ids[k]) for k in ("start", "image", "end"))
    block = f"\n\n{boi}{soft * vision.tokens}{eoi}\n\n"
    if not image.crops:
        return block
    return (f"Here is the original image {block} and here are some crops to help you see better "
            + " ".join([block] * image.crops))


def text_prompt_ids(tokenizer, text: str, chat: bool, vision: VisionConfig, images, seq: int) -> list[int]:
    """A text prompt (with ``chat``: a user turn of the chat template, the images first) and its images as the
    model's processor makes the ids. Gemma 3: each ``<start_of_image>`` of the text is replaced by the
    processor's text for its image (``gemma3_image_text``) and the whole text tokenized, so the blank lines
    around each block are the tokens the processor gives; without a placeholder the images' placeholders go in
    front of the text. Qwen: the text's ids with each image placeholder expanded (``image_prompt_ids``)."""
    images = _as_list(images)
    if chat and not getattr(tokenizer, "chat_template", None):
        raise UsageError("--chat needs a chat template, and this model's tokenizer has none: drop --chat")
    if chat:
        messages = image_chat_messages(text, len(images)) if images else [{"role": "user", "content": text}]
        return image_messages_ids(tokenizer, messages, vision, images, seq)
    return image_messages_ids(tokenizer, None, vision, images, seq, text=text)


def image_messages_ids(tokenizer, messages: list[dict] | None, vision: VisionConfig, images, seq: int,
                       text: str | None = None) -> list[int]:
    """The ids of a conversation (``messages``, rendered by the chat template; or a plain ``text``) holding
    ``images`` in order, as the model's processor makes them (``text_prompt_ids``)."""
    from .conversation import apply_chat_template

    images = _as_list(images)
    if vision.placeholder != "start" or not images:
        ids = apply_chat_template(tokenizer, messages) if messages is not None else \
            [int(t) for t in tokenizer(text)["input_ids"]]
        return image_prompt_ids(ids, vision, images, seq)
    if messages is not None:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    boi = tokenizer.convert_ids_to_tokens(vision.token_ids["start"])
    if images and boi not in text:
        text = boi * len(images) + text
    pieces = text.split(boi)
    if len(pieces) - 1 != len(images):
        raise UsageError(f"the prompt holds {len(pieces) - 1} image placeholder(s) for {len(images)} image(s): give "
                         "one image per placeholder, in order")
    text = pieces[0] + "".join(gemma3_image_text(tokenizer, vision, image) + piece
                               for image, piece in zip(images, pieces[1:]))
    # the processor tokenizes a rendered chat without adding special tokens again (its BOS is in the text)
    ids = tokenizer(text, add_special_tokens=messages is None)["input_ids"]
    return _fits([int(t) for t in ids], images, seq)


def image_chat_messages(text: str, images: int = 1) -> list[dict]:
    """A user turn with its images first, as the model's chat template expects structured content."""
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}]
