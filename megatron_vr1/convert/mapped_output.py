"""Offline Megatron -> HF into output files laid out before the load: the checkpoint is read straight into them.

The mirror image of ``hf_loader.bind_hf_weights`` (HF -> Megatron binds parameters to the mapped HF files). Here
the output safetensors shards are planned first, from the model's parameters and the exporter's own table
(names, shapes and transforms evaluated on meta tensors, so no name comes from anywhere else), created at their
final size and memory-mapped shared. Every parameter whose HF tensors are consecutive row ranges of it (a copy,
gate/up, an unpadded vocabulary) then *is* its slice of the output mapping: the torch_dist load writes its bytes
into the output's page cache, and the exporter's views of it need no write at all. Only what changes layout
(the QKV split, a padded vocabulary's cut) is copied into its slot. That is one pass over fresh memory per byte
instead of two (load into the parameters, then write them out), which is what the VM's page-fault cost makes
dear (bench/convert.py).

The files keep safetensors' format (header, then every tensor's bytes with no gaps) but tensors are in the
model's order rather than ``save_file``'s dtype-then-name order; readers index by the header, so the tensors, not
the file bytes, are what the round trip keeps identical.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_vr1.convert.arch import arch_from_config
from megatron_vr1.convert.errors import ConversionError
from megatron_vr1.convert.exporter import local_tensors, unwrap
from megatron_vr1.convert.mapping import Table, to_hf
from megatron_vr1.convert.safetensors_io import _SAFETENSORS_DTYPES, finalize_shards

_MAPPABLE = ("copy", "gate_up", "vocab")


@dataclass(slots=True)
class _Slot:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # in the shard's data section
    nbytes: int


@dataclass(slots=True)
class _Shard:
    slots: list[_Slot] = field(default_factory=list)
    nbytes: int = 0


def _hf_pieces(entry, param: torch.Tensor, arch) -> tuple[list[tuple[str, torch.Tensor]], bool]:
    """The exporter's (HF name, meta tensor) pieces of a parameter, and whether they are consecutive row ranges
    that cover it exactly (then the parameter can be its pieces' slots)."""
    meta = torch.empty(param.shape, dtype=param.dtype, device="meta")
    pieces = to_hf(entry, meta, arch, copy=False)
    start, covers = 0, entry.transform in _MAPPABLE and param.is_contiguous()
    for _, t in pieces:
        covers = covers and t.is_contiguous() and t.storage_offset() == start
        start += t.numel()
    return pieces, covers and start == param.numel()


class MappedHFOutput:
    """Plan, create and map the output shards of ``model``; bind parameters; later, place the exporter's tensors.

    Use: ``out = MappedHFOutput(model, hf_config, tmp_dir, max_shard_bytes)`` before loading the checkpoint into
    ``model``, then ``out.place(name, tensor)`` for every exported tensor, then ``out.close()``."""

    def __init__(self, model: torch.nn.Module, hf_config, out_dir: Path, max_shard_bytes: int):
        if max_shard_bytes < 1:
            raise ConversionError(f"max_shard_bytes={max_shard_bytes} is invalid: use a positive size in bytes")
        arch = arch_from_config(hf_config)
        bare = unwrap(model)
        table = Table(arch, prefix="language_model." if hasattr(bare, "language_model") else "")
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        # local_tensors gives detached aliases; binding has to replace the parameters' own data.
        owners = {(t.data_ptr(), tuple(t.shape)): t for t in [*bare.parameters(), *bare.buffers()]}
        shards: list[_Shard] = [_Shard()]
        units: list[tuple[torch.Tensor | None, list[_Slot]]] = []  # (parameter to bind or None, its slots)
        for name, param in local_tensors(model, table):
            pieces, bind = _hf_pieces(table.entry(name), param, arch)
            slots = []
            for hf_name, t in pieces:
                if t.dtype not in _SAFETENSORS_DTYPES:
                    raise ConversionError(f"{hf_name}: dtype {t.dtype} can't be written to safetensors")
                slots.append(_Slot(hf_name, t.dtype, tuple(t.shape), 0, t.numel() * t.element_size()))
            size = sum(s.nbytes for s in slots)
            # A unit (a parameter's pieces) stays in one shard, so that the parameter is one slice of one file.
            if shards[-1].slots and shards[-1].nbytes + size > max_shard_bytes:
                shards.append(_Shard())
            for s in slots:
                s.offset = shards[-1].nbytes
                shards[-1].nbytes += s.nbytes
                shards[-1].slots.append(s)
            owner = owners.get((param.data_ptr(), tuple(param.shape))) if bind else None
            units.append((owner, slots))
        self._shards = shards
        self._maps: list[mmap.mmap] = []
        self._bytes: dict[str, torch.Tensor] = {}  # name -> its slot's bytes (uint8) in the mapping
        self._placed: set[str] = set()
        self._paths: list[Path] = []
        for i, shard in enumerate(shards):
            self._open(i, shard)
        self.bound_bytes = 0
        """Bytes of the parameters that are slices of the output (loaded in place, never copied)."""
        for param, slots in units:  # point each bindable parameter at its pieces' bytes (consecutive, in order)
            if param is not None and param.numel():
                view = _typed(self._bytes[slots[0].name], param.dtype, param.shape, sum(s.nbytes for s in slots))
                if view is not None:
                    param.data = view
                    self.bound_bytes += view.numel() * view.element_size()
        self.total_bytes = sum(s.nbytes for s in shards)

    def _open(self, i: int, shard: _Shard) -> None:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        for s in shard.slots:
            header[s.name] = {"dtype": _SAFETENSORS_DTYPES[s.dtype], "shape": list(s.shape),
                              "data_offsets": [s.offset, s.offset + s.nbytes]}
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        raw += b" " * (-len(raw) % 8)
        path = self.dir / f".tmp-shard-{i:05d}.safetensors"
        start = 8 + len(raw)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.pwrite(fd, struct.pack("<Q", len(raw)) + raw, 0)
            # Blocks reserved up front: a full disk is then an error here, not a SIGBUS in a write to the mapping.
            os.posix_fallocate(fd, 0, start + shard.nbytes)
        except OSError as e:
            os.close(fd)
            raise ConversionError(f"{path}: can't create a {start + shard.nbytes}-byte output shard ({e}); free disk "
                                  f"space or choose another --out") from None
        try:
            buf = mmap.mmap(fd, start + shard.nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) \
                if shard.nbytes else None
        finally:
            os.close(fd)  # the mapping keeps the file
        self._paths.append(path)
        if buf is None:  # only empty tensors in this shard
            self._bytes.update({s.name: torch.empty(0, dtype=torch.uint8) for s in shard.slots})
            return
        self._maps.append(buf)
        whole = torch.frombuffer(buf, dtype=torch.uint8)
        for s in shard.slots:
            self._bytes[s.name] = whole[start + s.offset:start + s.offset + s.nbytes]

    def place(self, name: str, tensor: torch.Tensor) -> None:
        """Put an exported tensor in its slot: nothing to do when it already is the slot (a bound parameter)."""
        slot = self._bytes.get(name)
        if slot is None:
            raise ConversionError(f"{name}: not in the planned output; the exporter produced a name the plan of the "
                                  f"same model lacks")
        if name in self._placed:
            raise ConversionError(f"{name}: written twice; the exporter produced a duplicate HF name")
        if tensor.numel() * tensor.element_size() != slot.numel():
            raise ConversionError(f"{name}: exported as {tuple(tensor.shape)} {tensor.dtype}, which does not fit "
                                  f"its planned {slot.numel()} bytes")
        self._placed.add(name)
        if slot.numel() and tensor.data_ptr() != slot.data_ptr():
            typed = _typed(slot, tensor.dtype, tensor.shape, slot.numel())
            if typed is not None:
                typed.copy_(tensor)
            else:  # a slot not aligned to its element size: copy the bytes
                slot.copy_(tensor.contiguous().reshape(-1).view(torch.uint8))

    def close(self) -> list[Path]:
        """Check that every planned tensor was placed, flush, rename the shards and write the index."""
        planned = [s.name for sh in self._shards for s in sh.slots]
        missing = [n for n in planned if n not in self._placed]
        if missing:
            raise ConversionError(f"{missing[0]}: planned but never exported ({len(missing)} such tensors)")
        self._bytes.clear()
        # No msync: the pages are the files' page cache, which every reader sees; like the stock writer's
        # write(), this does not make the output durable (an msync here is a synchronous disk write).
        return finalize_shards(self.dir, [(p, [s.name for s in sh.slots]) for p, sh in zip(self._paths, self._shards)],
                               self.total_bytes)

    def unmap(self) -> None:
        """Close the mappings (call once nothing views them, the model's parameters included)."""
        for buf in self._maps:
            try:
                buf.close()
            except BufferError:  # a view is still alive; the mapping goes with it
                pass
        self._maps.clear()


def _typed(raw: torch.Tensor, dtype: torch.dtype, shape, nbytes: int) -> torch.Tensor | None:
    """``nbytes`` bytes from the start of ``raw`` (a uint8 view of a mapping) viewed as ``dtype`` and ``shape``;
    None when the offset is not aligned to the element size (then the tensor is copied rather than bound)."""
    elem = torch.empty((), dtype=dtype).element_size()
    if raw.storage_offset() % elem or nbytes % elem:
        return None
    span = torch.empty(0, dtype=torch.uint8).set_(raw.untyped_storage(), raw.storage_offset(), (nbytes,))
    return span.view(dtype).view(shape)
