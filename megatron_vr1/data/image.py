"""Image sizing and pixel patches exactly as Qwen2.5-VL's image processor computes them.

``smart_resize`` is the processor's sizing rule (both sides multiples of 28, pixel count within
[min_pixels, max_pixels], aspect ratio <= 200); ``patchify`` lays pixels out as the processor's
``pixel_values`` (one row of 3*2*14*14 values per 14x14 patch, in merge-window order). Both are checked
against transformers' ``Qwen2VLImageProcessor`` in the tests. numpy + PIL only.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE
MAX_ASPECT_RATIO = 200
# CLIP normalisation used by Qwen2-VL / Qwen2.5-VL (OPENAI_CLIP_MEAN / OPENAI_CLIP_STD in transformers).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
_B64_TEXT = re.compile(r"[A-Za-z0-9+/=\s]+")
MAX_IMAGE_BYTES = 64 * 1024 * 1024
"""Encoded images larger than this are rejected (input size cap)."""


def smart_resize(height: int, width: int, *, factor: int = FACTOR, min_pixels: int = 4 * 28 * 28,
                 max_pixels: int = 16384 * 28 * 28) -> tuple[int, int]:
    """The (height, width) the model sees: Qwen2.5-VL's rounding to multiples of ``factor`` within the budget.

    Raises ValueError for non-positive sizes or an aspect ratio above 200 (the processor refuses those).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size {width}x{height} is invalid: width and height must be positive")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"image size {width}x{height}: aspect ratio {max(height, width) / min(height, width):.1f} "
                         f"exceeds {MAX_ASPECT_RATIO}; crop or pad the image")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_grid_thw(input_height: int, input_width: int) -> tuple[int, int, int]:
    """The processor's ``image_grid_thw`` row for a resized still image."""
    return 1, input_height // PATCH_SIZE, input_width // PATCH_SIZE


def decode_image_field(value: str | bytes, base_dir: Path | None = None) -> Path | bytes:
    """Resolve a row's ``image`` value: a data URL or base64 text becomes bytes; anything else is a path.

    Relative paths are taken relative to ``base_dir`` (the directory of the rows file).
    """
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if value.startswith("data:"):
        header, _, payload = value.partition(",")
        if ";base64" not in header:
            raise ValueError("data URL images must be base64 encoded (data:image/png;base64,...)")
        return _b64(payload)
    # Base64 never contains ".", image paths practically always do (the extension); long dot-free text in the
    # base64 alphabet is therefore an encoded image, anything else a path.
    if len(value) >= 64 and "." not in value and _B64_TEXT.fullmatch(value[:4096]):
        return _b64(value)
    path = Path(value)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path


def _b64(text: str) -> bytes:
    if len(text) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise ValueError(f"base64 image of {len(text)} characters exceeds the {MAX_IMAGE_BYTES} byte cap")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"image is neither an existing file nor valid base64 ({e})") from None


def open_image(source: Path | str | bytes) -> Image.Image:
    """Open and fully decode an image as RGB. Raises OSError/ValueError for missing or corrupt images."""
    if isinstance(source, (bytes, bytearray)):
        if len(source) > MAX_IMAGE_BYTES:
            raise ValueError(f"image of {len(source)} bytes exceeds the {MAX_IMAGE_BYTES} byte cap")
        stream: io.BytesIO | Path = io.BytesIO(source)
    else:
        stream = Path(source)
        if stream.stat().st_size > MAX_IMAGE_BYTES:
            raise ValueError(f"{stream}: {stream.stat().st_size} bytes exceeds the {MAX_IMAGE_BYTES} byte cap")
    with Image.open(stream) as im:
        im.load()
        return im.convert("RGB")


Backend = Literal["torchvision", "pil"]
"""Which transformers image-processor backend to reproduce bit for bit: "torchvision" (the default
``Qwen2VLImageProcessor`` when torchvision is installed; SGLang uses it too) or "pil"
(``Qwen2VLImageProcessorPil``). They resize and normalise with different arithmetic."""


def require_torchvision():
    """Import torchvision or say how to get it: transformers' default Qwen2-VL image and video processors
    (and so the tiny-model assets and the "torchvision" backend here) need it."""
    try:
        import torchvision
        import torchvision.transforms.v2.functional  # noqa: F401
    except ImportError:
        raise ImportError("torchvision is required for the Qwen2-VL processors: pip install torchvision==0.29.1 "
                          "(the build matching torch 2.14.1), or use backend='pil'") from None
    return torchvision


def resize_for_model(image: Image.Image, *, min_pixels: int, max_pixels: int,
                     backend: Backend = "torchvision") -> np.ndarray:
    """The resized uint8 (H, W, 3) array the processor feeds to patchify (bicubic, antialiased)."""
    h, w = smart_resize(image.height, image.width, min_pixels=min_pixels, max_pixels=max_pixels)
    arr = np.asarray(image.convert("RGB"))
    if (h, w) == (image.height, image.width):
        return arr
    if backend == "pil":
        return np.asarray(image.convert("RGB").resize((w, h), resample=Image.Resampling.BICUBIC))
    import torch  # the torchvision backend resizes a uint8 CHW tensor with antialiasing

    tvF = require_torchvision().transforms.v2.functional

    chw = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
    out = tvF.resize(chw, [h, w], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
    return out.numpy().transpose(1, 2, 0)


def normalize(arr: np.ndarray, backend: Backend = "torchvision") -> np.ndarray:
    """float32 (x/255 - mean) / std with the rounding of the chosen processor backend."""
    mean, std = np.asarray(IMAGE_MEAN, np.float32), np.asarray(IMAGE_STD, np.float32)
    if backend == "pil":  # rescale in float64, cast to float32, then normalise in float32
        x = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
        return (x - mean) / std
    # torchvision fuses the rescale into mean/std: (x - 255*mean) / (255*std), all float32
    return (arr.astype(np.float32) - mean * np.float32(255.0)) / (std * np.float32(255.0))


def patchify(image: Image.Image | np.ndarray, backend: Backend = "torchvision"
             ) -> tuple[np.ndarray, tuple[int, int, int]]:
    """``pixel_values`` (float32, [h*w/196, 3*2*14*14]) and ``image_grid_thw`` of an already resized image.

    The image's height and width must be multiples of 28 (use ``resize_for_model`` first).
    """
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"patchify expects an RGB image of shape (H, W, 3), got {arr.shape}")
    height, width = arr.shape[:2]
    if height % FACTOR or width % FACTOR:
        raise ValueError(f"patchify: image {width}x{height} is not a multiple of {FACTOR}; resize it first")
    x = normalize(arr, backend)
    x = np.repeat(x.transpose(2, 0, 1)[None], TEMPORAL_PATCH_SIZE, axis=0)  # (T, C, H, W): a still image twice
    gh, gw = height // PATCH_SIZE, width // PATCH_SIZE
    x = x.reshape(TEMPORAL_PATCH_SIZE, 3, gh // MERGE_SIZE, MERGE_SIZE, PATCH_SIZE,
                  gw // MERGE_SIZE, MERGE_SIZE, PATCH_SIZE)
    x = x.transpose(2, 5, 3, 6, 1, 0, 4, 7)  # gh/m, gw/m, m, m, C, T, P, P: merge windows are contiguous rows
    flat = x.reshape(gh * gw, 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE)
    return np.ascontiguousarray(flat), (1, gh, gw)


def preprocess(image: Image.Image, *, min_pixels: int, max_pixels: int, backend: Backend = "torchvision"
               ) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Resize + normalise + patchify: the processor's ``pixel_values`` and ``image_grid_thw`` for one image."""
    return patchify(resize_for_model(image, min_pixels=min_pixels, max_pixels=max_pixels, backend=backend), backend)
