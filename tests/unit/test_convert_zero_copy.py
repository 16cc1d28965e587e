"""The converter's zero-copy I/O gives exactly the bytes of the stock paths: the direct safetensors writer writes
save_file's file byte for byte (views and non-contiguous tensors included), the no-clone splits equal the cloning
ones, and the direct torch_dist reader loads what torch's FileSystemReader loads (falling back to it whenever a
request is not a whole stored chunk of the destination's dtype)."""

from __future__ import annotations

import filecmp
import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

from megatron_vr1.convert import transforms as T
from megatron_vr1.convert.direct_load import DirectFileSystemReader, _read_whole_chunk_into, _record_offset
from megatron_vr1.convert.safetensors_io import ShardedSafetensorsWriter, write_safetensors


def _mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w.f32": torch.randn(3, 5, generator=g), "w.bf16": torch.randn(4, 2, generator=g).bfloat16(),
            "b.i64": torch.arange(5), "a.f16": torch.randn(2, generator=g).half(),
            "m.bool": torch.tensor([True, False]),
            "e.empty": torch.zeros(0), "c.i32": torch.arange(3, dtype=torch.int32), "d.u8": torch.arange(3).byte(),
            "f.f64": torch.randn(2, generator=g, dtype=torch.float64), "g.i8": torch.arange(3, dtype=torch.int8),
            "h.i16": torch.arange(3, dtype=torch.int16)}


def test_direct_writer_is_byte_identical_to_save_file(tmp_path):
    tensors = _mixed()
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    nbytes = write_safetensors(tmp_path / "new.safetensors", tensors, metadata={"format": "pt"})
    assert filecmp.cmp(tmp_path / "ref.safetensors", tmp_path / "new.safetensors", shallow=False)
    assert nbytes == sum(t.numel() * t.element_size() for t in tensors.values())


def test_direct_writer_takes_views_and_non_contiguous_tensors(tmp_path):
    fc1 = torch.randn(8, 6).bfloat16()
    gate, up = T.split_gate_up(fc1, copy=False)  # share fc1's storage: save_file would refuse them
    strided = torch.randn(6, 4).t()  # not contiguous
    write_safetensors(tmp_path / "v.safetensors", {"gate": gate, "up": up, "t": strided})
    back = load_file(str(tmp_path / "v.safetensors"))
    assert torch.equal(back["gate"], fc1[:4]) and torch.equal(back["up"], fc1[4:]) and torch.equal(back["t"], strided)
    save_file({"gate": gate.clone(), "up": up.clone(), "t": strided.contiguous()}, str(tmp_path / "r.safetensors"))
    assert filecmp.cmp(tmp_path / "v.safetensors", tmp_path / "r.safetensors", shallow=False)


def test_sharded_writer_shards_views_like_before(tmp_path):
    fc1 = torch.randn(40, 10)
    w = ShardedSafetensorsWriter(tmp_path, max_shard_bytes=1000)
    for i, t in enumerate(T.split_gate_up(fc1, copy=False)):
        w.add(f"t{i}", t)
    w.close()
    got = {k: v for f in sorted(tmp_path.glob("model-*.safetensors")) for k, v in load_file(str(f)).items()}
    assert torch.equal(got["t0"], fc1[:20]) and torch.equal(got["t1"], fc1[20:])


def test_no_copy_splits_equal_the_cloning_ones_and_share_memory():
    fc1, emb = torch.randn(8, 3), torch.randn(12, 3)
    for a, b in zip(T.split_gate_up(fc1), T.split_gate_up(fc1, copy=False)):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    views = T.split_gate_up(fc1, copy=False)
    assert views[0].data_ptr() == fc1.data_ptr() and views[1].data_ptr() == fc1[4:].data_ptr()
    cut = T.strip_vocab(emb, 10, copy=False)
    assert torch.equal(cut, T.strip_vocab(emb, 10)) and cut.data_ptr() == emb.data_ptr()


def _saved(tmp_path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    state = {"a": torch.randn(64, 32, generator=g).bfloat16(), "b": torch.randn(17, generator=g),
             "c": torch.arange(10, dtype=torch.int64), "s": torch.randn(40, 8, generator=g)[::2]}  # a strided one
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp_path), single_file_per_rank=True), no_dist=True)
    return state


def test_direct_reader_loads_what_torch_loads(tmp_path):
    state = _saved(tmp_path)
    stock = {k: torch.full_like(v.contiguous(), 7) for k, v in state.items()}
    direct = {k: torch.full_like(v.contiguous(), 7) for k, v in state.items()}
    dcp.load(stock, storage_reader=dcp.FileSystemReader(str(tmp_path)), no_dist=True)
    dcp.load(direct, storage_reader=DirectFileSystemReader(str(tmp_path)), no_dist=True)
    for k, v in state.items():
        assert direct[k].dtype == v.dtype and torch.equal(direct[k].view(torch.uint8), stock[k].view(torch.uint8)), k
        assert torch.equal(direct[k], v), k


def test_direct_reader_falls_back_for_casts_and_non_contiguous_destinations(tmp_path):
    state = _saved(tmp_path)
    cast = {"b": torch.zeros(17, dtype=torch.float64)}  # a different dtype: torch's path casts
    dcp.load(cast, storage_reader=DirectFileSystemReader(str(tmp_path)), no_dist=True)
    assert torch.equal(cast["b"], state["b"].double())
    holder = torch.zeros(32, 64).bfloat16()
    strided = {"a": holder.t()}  # a non-contiguous destination: can't readinto, torch's path copies
    dcp.load(strided, storage_reader=DirectFileSystemReader(str(tmp_path)), no_dist=True)
    assert torch.equal(holder.t(), state["a"])


def test_whole_chunk_fast_path_is_taken_and_checks_the_record(tmp_path):
    state = _saved(tmp_path)
    reader = dcp.FileSystemReader(str(tmp_path))
    md = reader.read_metadata()
    (index, info), = [(i, s) for i, s in md.storage_data.items() if i.fqn == "a"]
    fd = os.open(tmp_path / info.relative_path, os.O_RDONLY)
    try:
        start, size = _record_offset(fd, info.offset, info.length)
        assert size == state["a"].numel() * 2 and info.offset < start < info.offset + info.length

        class Req:  # the fields of a ReadItem the fast path looks at
            storage_offsets, lengths = (0, 0), (64, 32)

        out = torch.empty(64, 32, dtype=torch.bfloat16)
        assert _read_whole_chunk_into(fd, info.offset, info.length, Req, out) and torch.equal(out, state["a"])
        Req.lengths = (32, 32)  # part of a chunk: not the fast path
        assert not _read_whole_chunk_into(fd, info.offset, info.length, Req, torch.empty(32, 32).bfloat16())
        Req.lengths = (64, 32)  # a wrong dtype: not the fast path
        assert not _read_whole_chunk_into(fd, info.offset, info.length, Req, torch.empty(64, 32, dtype=torch.float16))
    finally:
        os.close(fd)


@pytest.mark.parametrize("garbage", [b"", b"PK\x03\x04 not a zip", b"\x00" * 100])
def test_record_offset_rejects_what_is_not_a_torch_save_zip(tmp_path, garbage):
    path = tmp_path / "x.bin"
    path.write_bytes(b"head" + garbage)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert _record_offset(fd, 4, len(garbage)) is None
    finally:
        os.close(fd)


def _swiglu_like(param: torch.Tensor):
    """A factory that stores ``param`` as two row chunks, as megatron's SwiGLU factory does."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    def build(key, t, replica_id, flattened_range):
        w, v = torch.chunk(t, 2, dim=0)
        return [ShardedTensor.from_rank_offsets(key, w, (0, 0, 2), replica_id=replica_id),
                ShardedTensor.from_rank_offsets(key, v, (0, 1, 2), replica_id=replica_id)]

    return ShardedTensorFactory("fc1", param, build, lambda parts: torch.cat(parts))


def test_deferred_gate_up_blocks_replace_the_factory_halves_without_filling_the_parameter():
    from megatron_vr1.convert.mcore_ckpt import _substitute_row_blocks

    param = torch.full((8, 4), float("nan"))  # never filled: the halves must come from the blocks
    gate, up = torch.randn(4, 4), torch.randn(4, 4)
    sharded = _substitute_row_blocks({"fc1": _swiglu_like(param)}, {"fc1": (param, [gate, up])})
    halves = sharded["fc1"]
    assert [h.data.data_ptr() for h in halves] == [gate.data_ptr(), up.data_ptr()]
    assert torch.isnan(param).all()


def test_deferred_blocks_are_copied_in_when_a_sharded_tensor_reads_the_whole_parameter():
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_vr1.convert.mcore_ckpt import _substitute_row_blocks

    param = torch.full((8, 4), float("nan"))
    gate, up = torch.randn(4, 4), torch.randn(4, 4)
    sharded = _substitute_row_blocks({"fc1": ShardedTensor.from_rank_offsets("fc1", param)},
                                     {"fc1": (param, [gate, up])})
    assert sharded["fc1"].data is param and torch.equal(param, torch.cat([gate, up]))
