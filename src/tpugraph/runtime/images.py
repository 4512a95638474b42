"""An image file (or the built-in synthetic test image) -> the model's own image processor's patches, within the
vit's compiled size, and the prompt ids with its image placeholder expanded (tpugraph run/verify --image).

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


@dataclass
class ProcessedImage:
    pixel_values: np.ndarray  # [t*h*w, patch_dim] float32
    grid: tuple[int, int, int]  # (t, h, w) in patches
    source: str  # the file, or "synthetic"


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
    if vision.kind == "gemma3":
        out = processor(images=image, return_tensors="np")
        side = int(round(vision.patches ** 0.5))
        return ProcessedImage(np.asarray(out["pixel_values"], dtype=np.float32), (1, side, side), source)
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
    vision = vision_of(out_dir, manifest)
    if image is None:
        picture, source = synthetic_image(), SYNTHETIC
    else:
        picture, source = open_image(image), str(image)
    return process_image(load_processor(out_dir, manifest), picture, vision, source)


def image_prompt_ids(ids: list[int], vision: VisionConfig, image: ProcessedImage | None, seq: int) -> list[int]:
    """The prompt ids as the model takes them: its image placeholder expanded for ``image``; a placeholder
    without an image, or a prompt that no longer fits SEQ, is one clear line."""
    placeholder = vision.token_ids[vision.placeholder]
    if image is None:
        if placeholder in ids:
            raise UsageError("the prompt holds an image placeholder but no image was given: pass --image FILE")
        return ids
    expanded = expand_image_tokens(ids, vision, image.grid)
    if len(expanded) > seq:
        raise UsageError(f"the prompt with its image is {len(expanded)} tokens, longer than this output's SEQ={seq}")
    return expanded


def image_chat_messages(text: str) -> list[dict]:
    """A user turn with the image first, as the model's chat template expects structured content."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
