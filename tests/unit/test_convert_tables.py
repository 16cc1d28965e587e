"""Name table, transforms and TP split of the converter on random tensors and a tiny HF Qwen2.5-VL checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))

from megatron_vr1.convert import transforms as T  # noqa: E402
from megatron_vr1.convert.arch import LMArch, arch_from_config, padded_vocab  # noqa: E402
from megatron_vr1.convert.errors import ConversionError  # noqa: E402
from megatron_vr1.convert.mapping import Table, iter_hf_to_mcore, to_hf  # noqa: E402
from megatron_vr1.convert.names import (canonical_hf_name, canonical_mcore_name, to_memory_layout,  # noqa: E402
                                        with_layer_index)
from megatron_vr1.convert.tp import shard, unshard  # noqa: E402


def _arch(**kw) -> LMArch:
    base = dict(num_layers=2, hidden_size=16, intermediate_size=24, num_heads=8, num_kv_heads=2, head_dim=4,
                vocab_size=100, tie_word_embeddings=False, has_vision=False)
    return LMArch(**{**base, **kw})


def test_fuse_qkv_groups_each_kv_head_with_its_queries():
    heads, kv, hd, hidden = 8, 2, 4, 16
    q, k, v = torch.randn(heads * hd, hidden), torch.randn(kv * hd, hidden), torch.randn(kv * hd, hidden)
    fused = T.fuse_qkv(q, k, v, heads, kv, hd)
    per = heads // kv
    groups = fused.view(kv, (per + 2) * hd, hidden)
    for g in range(kv):  # group g = its 4 query heads, then its key head, then its value head
        assert torch.equal(groups[g, : per * hd], q[g * per * hd:(g + 1) * per * hd])
        assert torch.equal(groups[g, per * hd:(per + 1) * hd], k[g * hd:(g + 1) * hd])
        assert torch.equal(groups[g, (per + 1) * hd:], v[g * hd:(g + 1) * hd])
    for a, b in zip(T.split_qkv(fused, heads, kv, hd), (q, k, v)):
        assert torch.equal(a, b)
    bias = [torch.randn(heads * hd), torch.randn(kv * hd), torch.randn(kv * hd)]
    for a, b in zip(T.split_qkv(T.fuse_qkv(*bias, heads, kv, hd), heads, kv, hd), bias):
        assert torch.equal(a, b)


def test_gate_up_and_vocab_round_trip_bytes():
    gate, up = torch.randn(24, 16, dtype=torch.bfloat16), torch.randn(24, 16, dtype=torch.bfloat16)
    g2, u2 = T.split_gate_up(T.fuse_gate_up(gate, up))
    assert torch.equal(g2.view(torch.int16), gate.view(torch.int16)) and torch.equal(u2, up)
    emb = torch.randn(100, 16)
    padded = T.pad_vocab(emb, padded_vocab(100, 2))
    assert padded.shape == (256, 16) and not padded[100:].any()
    assert torch.equal(T.strip_vocab(padded, 100), emb)
    with pytest.raises(ConversionError):
        T.pad_vocab(emb, 64)


@pytest.mark.parametrize("kind", ["column", "row", "gate_up", "vocab", "replicated"])
def test_tp_shard_unshard_round_trip(kind):
    full = torch.randn(48, 32)
    for tp in (1, 2, 4):
        parts = [shard(full, kind, tp, r) for r in range(tp)]
        assert torch.equal(unshard(parts, kind), full)


def test_gate_up_shard_holds_its_slice_of_gate_and_of_up():
    gate, up = torch.randn(8, 4), torch.randn(8, 4)
    s1 = shard(T.fuse_gate_up(gate, up), "gate_up", 2, 1)
    assert torch.equal(s1, torch.cat([gate[4:], up[4:]]))


def test_qkv_column_shard_is_whole_kv_groups():
    heads, kv, hd, hidden = 8, 2, 4, 16
    q, k, v = torch.randn(heads * hd, hidden), torch.randn(kv * hd, hidden), torch.randn(kv * hd, hidden)
    s1 = shard(T.fuse_qkv(q, k, v, heads, kv, hd), "column", 2, 1)
    # TP rank 1 = the second kv group, i.e. what a model with heads 4..7 and kv head 1 would fuse.
    assert torch.equal(s1, T.fuse_qkv(q[16:], k[4:], v[4:], 4, 1, hd))
    with pytest.raises(ConversionError, match="tensor_parallel=3"):
        shard(torch.randn(40, 16), "column", 3, 0, name="linear_qkv.weight")


def test_hf_key_layouts_and_te_aliases():
    assert canonical_hf_name("model.visual.blocks.0.attn.qkv.weight") == "visual.blocks.0.attn.qkv.weight"
    assert canonical_hf_name("model.language_model.layers.3.mlp.up_proj.weight") == "model.layers.3.mlp.up_proj.weight"
    assert canonical_hf_name("model.layers.3.mlp.up_proj.weight") == "model.layers.3.mlp.up_proj.weight"
    assert canonical_hf_name("lm_head.weight") == "lm_head.weight"
    for disk in ("visual.merger.mlp.0.weight", "model.norm.weight", "lm_head.weight"):
        assert canonical_hf_name(to_memory_layout(disk, True)) == disk
    assert to_memory_layout("model.norm.weight", False) == "model.norm.weight"
    assert canonical_mcore_name("language_model.decoder.layers.5.self_attention.linear_qkv.layer_norm_weight") == \
        "language_model.decoder.layers.5.input_layernorm.weight"
    assert canonical_mcore_name("decoder.layers.0.mlp.linear_fc1.layer_norm_weight") == \
        "decoder.layers.0.pre_mlp_layernorm.weight"
    assert with_layer_index("language_model.decoder.layers.1.mlp.linear_fc2.weight", 7) == \
        "language_model.decoder.layers.7.mlp.linear_fc2.weight"


def test_table_entries_tied_and_untied():
    untied, tied = Table(_arch()), Table(_arch(tie_word_embeddings=True))
    out = "language_model.output_layer.weight"
    assert out in untied.by_mcore and out not in tied.by_mcore
    assert untied.entry("language_model.decoder.layers.1.self_attention.linear_qkv.bias").hf == tuple(
        f"model.layers.1.self_attn.{p}_proj.bias" for p in "qkv")
    assert untied.entry("visual.blocks.0.norm1.weight").transform == "copy"
    with pytest.raises(ConversionError, match="decoder.layers.0.foo"):
        untied.entry("decoder.layers.0.foo")


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def tiny_hf(request, tmp_path_factory):
    from convert_tiny import build_tiny_vl

    return build_tiny_vl(tmp_path_factory.mktemp(f"tiny_tie{request.param}"), tie=request.param)


def _round_trip(arch, names, get, tp=2):
    table = Table(arch, [n for n in names if n.startswith("visual.")])
    out = {}
    for entry, full in iter_hf_to_mcore(arch, get, names, padded_vocab(arch.vocab_size, tp)):
        parts = [shard(full, entry.tp, tp, r, entry.mcore) for r in range(tp)]  # through TP=2 and back
        for name, t in to_hf(table.entry(entry.mcore), unshard(parts, entry.tp), arch):
            out[name] = t
    return out


def test_tiny_checkpoint_round_trip_is_byte_identical(tiny_hf):
    from safetensors.torch import load_file

    from megatron_vr1.convert.safetensors_io import SafetensorsReader

    arch = arch_from_config(json.loads((tiny_hf / "config.json").read_text()))
    assert arch.has_vision and arch.vocab_size == 500
    reader = SafetensorsReader(tiny_hf)
    out = _round_trip(arch, reader.names(), reader.get)
    original = load_file(str(tiny_hf / "model.safetensors"))
    assert set(out) == set(original)
    for name, t in original.items():
        assert out[name].dtype == t.dtype and torch.equal(out[name].view(torch.uint8), t.view(torch.uint8)), name


def test_in_memory_layout_converts_like_the_disk_layout(tiny_hf):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_hf)
    sd = {canonical_hf_name(k): v for k, v in model.state_dict().items()}
    arch = arch_from_config(model.config)
    if arch.tie_word_embeddings:
        sd.pop("lm_head.weight")  # the in-memory state dict lists the tied head; the table drops it
    out = _round_trip(arch, list(sd), sd.__getitem__)
    assert all(torch.equal(out[k], v) for k, v in sd.items())


def test_mismatched_config_names_the_tensor(tiny_hf):
    from megatron_vr1.convert.safetensors_io import SafetensorsReader

    cfg = json.loads((tiny_hf / "config.json").read_text())
    reader = SafetensorsReader(tiny_hf)
    wrong = arch_from_config({**cfg, "text_config": {**cfg["text_config"], "intermediate_size": 96}})
    with pytest.raises(ConversionError, match=r"model.layers.0.mlp.gate_proj.weight: shape \(128, 64\)"):
        list(iter_hf_to_mcore(wrong, reader.get, reader.names(), 512))
    fewer = arch_from_config({**cfg, "text_config": {**cfg["text_config"], "num_hidden_layers": 1}})
    with pytest.raises(ConversionError, match="model.layers.1"):
        list(iter_hf_to_mcore(fewer, reader.get, reader.names(), 512))
