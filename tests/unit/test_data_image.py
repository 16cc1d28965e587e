"""smart_resize and patchify agree exactly with transformers' Qwen2-VL image processors."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from megatron_vr1.data.image import decode_image_field, open_image, preprocess, smart_resize

transformers = pytest.importorskip("transformers")
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: E402
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize  # noqa: E402

BUDGETS = [(4 * 28 * 28, 512 * 28 * 28), (56 * 56, 112 * 112), (28 * 28, 12800 * 28 * 28)]


@pytest.mark.parametrize("min_pixels,max_pixels", BUDGETS)
def test_smart_resize_matches_transformers_over_many_sizes(min_pixels, max_pixels):
    rng = np.random.default_rng(0)
    sizes = [(h, w) for h in range(1, 300, 13) for w in range(1, 300, 17)]
    sizes += [tuple(int(v) for v in rng.integers(1, 5000, 2)) for _ in range(2000)]
    checked = 0
    for h, w in sizes:
        if max(h, w) / min(h, w) > 200:
            with pytest.raises(ValueError, match="aspect ratio"):
                smart_resize(h, w, min_pixels=min_pixels, max_pixels=max_pixels)
            continue
        ours = smart_resize(h, w, min_pixels=min_pixels, max_pixels=max_pixels)
        assert ours == hf_smart_resize(h, w, 28, min_pixels, max_pixels), (h, w)
        assert ours[0] % 28 == 0 and ours[1] % 28 == 0
        checked += 1
    assert checked > 2000


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
@pytest.mark.parametrize("size", [(56, 56), (112, 84), (100, 120), (37, 90), (300, 20), (640, 480)])
def test_pixel_values_identical_to_processor(backend, size):
    width, height = size
    cls = transformers.Qwen2VLImageProcessor if backend == "torchvision" else Qwen2VLImageProcessorPil
    if backend == "torchvision":
        pytest.importorskip("torchvision")
    proc = cls(min_pixels=56 * 56, max_pixels=112 * 112)
    image = Image.fromarray(np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8))
    ref = proc(images=[image], return_tensors="np")
    pixel_values, grid = preprocess(image, min_pixels=56 * 56, max_pixels=112 * 112, backend=backend)
    assert list(grid) == ref["image_grid_thw"][0].tolist()
    assert pixel_values.shape == np.asarray(ref["pixel_values"]).shape
    assert np.abs(pixel_values - np.asarray(ref["pixel_values"])).max() == 0.0


def test_image_field_forms(tmp_path):
    image = Image.new("RGB", (30, 20), (1, 2, 3))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    raw = buf.getvalue()
    (tmp_path / "a.png").write_bytes(raw)
    b64 = base64.b64encode(raw).decode()
    assert decode_image_field("a.png", tmp_path) == tmp_path / "a.png"
    assert decode_image_field(b64, tmp_path) == raw
    assert decode_image_field("data:image/png;base64," + b64, tmp_path) == raw
    assert open_image(raw).size == (30, 20) and open_image(tmp_path / "a.png").getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(ValueError, match="base64"):
        decode_image_field("data:image/png;base64,@@@not-base64@@@", tmp_path)
