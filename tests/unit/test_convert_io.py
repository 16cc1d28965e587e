"""Streaming safetensors reader and sharded atomic writer of the converter."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_vr1.convert.errors import ConversionError
from megatron_vr1.convert.safetensors_io import INDEX_NAME, SafetensorsReader, ShardedSafetensorsWriter


def _tensors(n=6):
    g = torch.Generator().manual_seed(0)
    return {f"model.layers.{i}.mlp.down_proj.weight": torch.randn(32, 16, generator=g) for i in range(n)}


def test_writer_shards_by_size_and_reader_reads_them_back(tmp_path):
    tensors = _tensors()  # 6 tensors x 2 KiB
    w = ShardedSafetensorsWriter(tmp_path, max_shard_bytes=5000)
    for k, v in tensors.items():
        w.add(k, v)
    files = w.close()
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)] and len(files) == 4
    assert set(index["weight_map"]) == set(tensors) and index["metadata"]["total_size"] == 6 * 32 * 16 * 4
    assert not list(tmp_path.glob(".tmp-*"))
    reader = SafetensorsReader(tmp_path)
    assert sorted(reader.names()) == sorted(tensors) and reader.nbytes() == 6 * 2048
    for k, v in tensors.items():
        assert torch.equal(reader.get(k), v)


def test_single_shard_is_model_safetensors_without_index(tmp_path):
    w = ShardedSafetensorsWriter(tmp_path)
    w.add("a", torch.ones(3))
    w.close()
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / INDEX_NAME).exists()
    with pytest.raises(ConversionError, match="a: written twice"):
        w2 = ShardedSafetensorsWriter(tmp_path / "x")
        w2.add("a", torch.ones(1))
        w2.add("a", torch.ones(1))


def test_truncated_file_names_the_tensor_and_file(tmp_path):
    save_file(_tensors(2), str(tmp_path / "model.safetensors"))
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(ConversionError, match=r"model.safetensors: tensor 'model.layers.1.mlp.down_proj.weight' ends"):
        SafetensorsReader(tmp_path)
    path.write_bytes(data[:5])
    with pytest.raises(ConversionError, match="truncated"):
        SafetensorsReader(tmp_path)


def test_reader_accepts_in_memory_layout_and_rejects_missing_shard(tmp_path):
    save_file({"model.language_model.norm.weight": torch.ones(4), "model.visual.merger.ln_q.weight": torch.ones(2)},
              str(tmp_path / "a.safetensors"))
    assert sorted(SafetensorsReader(tmp_path).names()) == ["model.norm.weight", "visual.merger.ln_q.weight"]
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    with pytest.raises(ConversionError, match="gone.safetensors: listed in"):
        SafetensorsReader(tmp_path)
    assert load_file(str(tmp_path / "a.safetensors"))  # the original file is untouched
