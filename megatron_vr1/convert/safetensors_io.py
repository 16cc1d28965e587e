"""Streaming safetensors I/O: a lazy reader (one tensor at a time, opening only the files it needs) and a
sharded writer (max shard size, HF index json, atomic renames) that writes straight from the tensors' memory.

The reader validates every file header up front (offsets inside the file, a size cap on the header) so that
a truncated download fails with the tensor's and the file's name before any conversion work.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from megatron_vr1.convert.errors import ConversionError
from megatron_vr1.convert.names import canonical_hf_name

INDEX_NAME = "model.safetensors.index.json"
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool}
MAX_HEADER_BYTES = 100 * 1024 * 1024
"""A header larger than this is not a checkpoint we wrote or can trust (cap on input size)."""


def read_header(path: Path) -> dict[str, dict]:
    """The tensor entries of a safetensors header, checked against the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ConversionError(f"{path}: shorter than a safetensors header ({size} bytes); the file is "
                                  f"truncated, download or convert it again")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise ConversionError(f"{path}: header length {n} does not fit the file ({size} bytes); the file is "
                                  f"truncated or not safetensors, download or convert it again")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConversionError(f"{path}: the safetensors header is not valid JSON ({e}); the file is "
                                  f"corrupt") from None
    header.pop("__metadata__", None)
    body = size - 8 - n
    for name, info in header.items():
        end = info["data_offsets"][1]
        if end > body:
            raise ConversionError(f"{path}: tensor {name!r} ends at byte {end} but the data section has only {body} "
                                  f"bytes; the file is truncated, download or convert it again")
    return header


class SafetensorsReader:
    """Tensors of an HF checkpoint directory by canonical (on-disk layout) name, loaded lazily.

    Accepts a sharded checkpoint (``model.safetensors.index.json``) or any ``*.safetensors`` files, with HF names
    in either layout (on-disk or transformers 5 in-memory).
    """

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ConversionError(f"{index}: not a valid safetensors index ({e}); restore the file") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
        if not files:
            raise ConversionError(f"{self.dir}: no *.safetensors files; pass the directory of a Hugging Face "
                                  f"checkpoint saved with safetensors")
        self._where: dict[str, tuple[str, str]] = {}  # canonical name -> (file, key as stored)
        self._info: dict[str, dict] = {}
        for fname in files:
            path = self.dir / fname
            if not path.exists():
                raise ConversionError(f"{path}: listed in {INDEX_NAME} but missing; the checkpoint is incomplete")
            for key, info in read_header(path).items():
                name = canonical_hf_name(key)
                if name in self._where:
                    raise ConversionError(f"{path}: tensor {key!r} also stored in {self._where[name][0]}; remove the "
                                          f"duplicate file")
                self._where[name] = (fname, key)
                self._info[name] = info
        self._open: dict[str, object] = {}
        self._maps: dict[str, tuple[mmap.mmap, int]] = {}  # file -> (private mapping, data section start)

    def names(self) -> list[str]:
        return list(self._where)

    def nbytes(self) -> int:
        return sum(i["data_offsets"][1] - i["data_offsets"][0] for i in self._info.values())

    def files(self) -> list[Path]:
        return sorted({self.dir / f for f, _ in self._where.values()})

    def get(self, name: str) -> torch.Tensor:
        """One tensor by canonical name (a fresh CPU tensor)."""
        if name not in self._where:
            raise ConversionError(f"{name}: not in the HF checkpoint {self.dir}")
        fname, key = self._where[name]
        handle = self._open.get(fname)
        if handle is None:
            handle = self._open[fname] = safe_open(str(self.dir / fname), framework="pt")
        try:
            return handle.get_tensor(key)
        except Exception as e:  # safetensors raises its own types; re-raise with the tensor and file named
            raise ConversionError(f"{self.dir / fname}: can't read tensor {key!r} ({e}); the file is corrupt") from None

    def view(self, name: str) -> torch.Tensor:
        """One tensor by canonical name as a read-only-by-contract view of the memory-mapped file: no copy, the
        pages are read when the caller copies from it. Do not write to it (the mapping is private, copy-on-write,
        so a write would never reach the file, only cost memory). Falls back to :meth:`get` for empty tensors and
        dtypes torch can't view."""
        if name not in self._where:
            raise ConversionError(f"{name}: not in the HF checkpoint {self.dir}")
        fname, _ = self._where[name]
        info = self._info[name]
        dtype = _TORCH_DTYPES.get(info["dtype"])
        begin, end = info["data_offsets"]
        if dtype is None or end == begin:
            return self.get(name)
        mapped = self._maps.get(fname)
        if mapped is None:
            path = self.dir / fname
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                # ACCESS_COPY: a writable private mapping, so torch.frombuffer takes it without a warning.
                mapped = self._maps[fname] = (mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), 8 + header_len)
        buf, data_start = mapped
        count = (end - begin) // torch.empty((), dtype=dtype).element_size()
        return torch.frombuffer(buf, dtype=dtype, count=count, offset=data_start + begin).view(info["shape"])

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._where:
            yield name, self.get(name)

    def close(self) -> None:
        """Drop the open handles; a mapping stays alive as long as a view of it does."""
        self._open.clear()
        self._maps.clear()


_SAFETENSORS_DTYPES = {v: k for k, v in _TORCH_DTYPES.items()}
_SAVE_ORDER = {code: i for i, code in enumerate(["I64", "F64", "F32", "I32", "BF16", "F16", "I16", "I8", "U8",
                                                    "BOOL"])}
"""The order in which safetensors' own serializer lays out dtypes (measured on safetensors 0.8 by save_file)."""


def _raw_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (uint8 view: numpy has no bfloat16)."""
    flat = t.reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> int:
    """Write ``tensors`` as one safetensors file, straight from their memory; returns the data bytes.

    The layout is ``safetensors.torch.save_file``'s (tensors ordered by dtype as safetensors orders them, then by
    name; compact JSON header, ``__metadata__`` first, space-padded to 8 bytes), so the file is byte-identical to
    save_file's. Unlike save_file it makes no copy: save_file first turns every tensor into a ``bytes`` object
    (a second copy of the shard in fresh memory, as slow as the write itself on a VM where touching new pages is
    the bottleneck), and it refuses tensors that share storage, which forced the splits to clone. Views are fine
    here; a non-contiguous tensor is made contiguous one at a time."""
    order = sorted(tensors, key=lambda n: (_SAVE_ORDER.get(_SAFETENSORS_DTYPES.get(tensors[n].dtype), 99), n))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name in order:
        t = tensors[name]
        code = _SAFETENSORS_DTYPES.get(t.dtype)
        if code is None:
            raise ConversionError(f"{name}: dtype {t.dtype} can't be written to safetensors by this writer; cast it "
                                  f"to one of {sorted(_SAFETENSORS_DTYPES.values())}")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb", buffering=0) as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in order:
            t = tensors[name].detach().cpu()
            if t.numel():
                view = _raw_bytes(t if t.is_contiguous() else t.contiguous())
                while view:  # write() may write less than asked (signals, huge buffers)
                    view = view[f.write(view):]
    return offset


class ShardedSafetensorsWriter:
    """Write tensors to ``model-0000i-of-0000N.safetensors`` shards of at most ``max_shard_bytes`` (a single
    larger tensor gets its own shard) plus ``model.safetensors.index.json``; one shard is written as
    ``model.safetensors`` without an index, as transformers does. Files are written under temporary names and
    renamed only in :meth:`close`, so a crash never leaves a checkpoint that looks complete."""

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 5 * 1024**3):
        if max_shard_bytes < 1:
            raise ConversionError(f"max_shard_bytes={max_shard_bytes} is invalid: use a positive size in bytes")
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue ``tensor`` for the current shard. It is written from its own memory when the shard is flushed,
        so it (a view, possibly) must not change until then."""
        if name in self._pending or any(name in names for _, names in self._shards):
            raise ConversionError(f"{name}: written twice; the exporter produced a duplicate HF name")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach()  # a view is fine: written from its memory at the flush
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        tmp = self.dir / f".tmp-shard-{len(self._shards):05d}.safetensors"
        write_safetensors(tmp, self._pending, metadata={"format": "pt"})
        self._shards.append((tmp, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Flush, rename shards to their final names, write the index. Returns the files written."""
        if self._pending or not self._shards:
            self._flush()
        return finalize_shards(self.dir, self._shards, self.total_bytes)


def finalize_shards(out_dir: Path, shards: list[tuple[Path, list[str]]], total_bytes: int) -> list[Path]:
    """Rename complete temporary shards (path, tensor names) to HF's names and, for several, write the index
    (``model.safetensors`` alone otherwise, as transformers does). Returns the files written."""
    n = len(shards)
    final = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for (tmp, names), fname in zip(shards, final):
        os.replace(tmp, out_dir / fname)
        weight_map.update({k: fname for k in names})
    written = [out_dir / f for f in final]
    if n > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        tmp = out_dir / f".tmp-{INDEX_NAME}"
        tmp.write_text(json.dumps(index, indent=2))
        os.replace(tmp, out_dir / INDEX_NAME)
        written.append(out_dir / INDEX_NAME)
    return written
