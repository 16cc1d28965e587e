"""The converter's copy-avoiding paths give exactly what the plain ones give: zero-copy safetensors views equal
``get``, and fusing straight into a preallocated Megatron tensor equals ``to_mcore``, byte for byte."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from megatron_vr1.convert.arch import LMArch
from megatron_vr1.convert.mapping import mcore_shape, to_mcore, to_mcore_into
from megatron_vr1.convert.names import lm_entries
from megatron_vr1.convert.safetensors_io import SafetensorsReader

ARCH = LMArch(num_layers=1, hidden_size=16, intermediate_size=24, num_heads=4, num_kv_heads=2, head_dim=4,
              vocab_size=50, tie_word_embeddings=False, has_vision=False)
SHAPES = {"embed_tokens": (50, 16), "lm_head": (50, 16), "norm": (16,), "q_proj.weight": (16, 16),
          "k_proj.weight": (8, 16), "v_proj.weight": (8, 16), "q_proj.bias": (16,), "k_proj.bias": (8,),
          "v_proj.bias": (8,), "o_proj": (16, 16), "gate_proj": (24, 16), "up_proj": (24, 16), "down_proj": (16, 24)}


def _hf(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for e in lm_entries(ARCH, prefix=""):
        for name in e.hf:
            shape = next(v for k, v in SHAPES.items() if k in name)
            out[name] = torch.randn(shape, generator=g).to(dtype)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_view_equals_get_bytes_and_fused_into_equals_to_mcore(tmp_path, dtype):
    tensors = _hf(dtype)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    reader = SafetensorsReader(tmp_path)
    padded = 64
    for e in lm_entries(ARCH, prefix=""):
        views = [reader.view(n) for n in e.hf]
        for n, v in zip(e.hf, views):
            assert v.dtype == dtype and torch.equal(v.view(torch.uint8), reader.get(n).view(torch.uint8))
        want = to_mcore(e, [reader.get(n) for n in e.hf], ARCH, padded)
        out = torch.full(mcore_shape(e, views, padded), 7.0, dtype=dtype)  # garbage the fill must overwrite
        to_mcore_into(e, views, ARCH, out)
        assert out.shape == want.shape and torch.equal(out.view(torch.uint8), want.view(torch.uint8)), e.mcore
    reader.close()


def test_view_of_an_empty_tensor_falls_back_to_get(tmp_path):
    save_file({"model.norm.weight": torch.ones(16), "empty": torch.zeros(0)}, str(tmp_path / "model.safetensors"))
    reader = SafetensorsReader(tmp_path)
    assert reader.view("empty").shape == (0,) and torch.equal(reader.view("model.norm.weight"), torch.ones(16))
