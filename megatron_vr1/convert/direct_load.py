"""A torch_dist load strategy that reads each stored tensor straight into its destination.

torch.distributed.checkpoint's ``FileSystemReader`` loads every item with ``torch.load`` from the file (a fresh
storage, read in small chunks) and then copies it into the destination: two passes over fresh memory per tensor,
which on a VM where first-touching pages runs at ~0.3-0.7 GB/s costs more than the disk. Each item of a
``.distcp`` file is a ``torch.save`` zip whose one storage record is stored uncompressed, so when a request asks
for a whole stored chunk into a contiguous destination of the same dtype, this reader ``readinto``-s the
record's bytes directly into the destination. Whether that holds is checked per item from the item itself (the
zip directory, and ``torch.load(map_location="meta")`` for dtype, shape, strides and storage size, which reads
only the pickle); anything else goes through torch's own path, so the bytes loaded are the same either way.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import struct
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.planner import LoadItemType
from torch.futures import Future
from megatron.core.dist_checkpointing.strategies.torch import (MCoreLoadPlanner, TorchDistLoadShardedStrategy,
                                                                _replace_sharded_keys_with_state_dict_keys,
                                                                _replace_state_dict_keys_with_sharded_keys,
                                                                _restore_dict_types, _unwrap_pyt_sharded_tensor,
                                                                mcore_to_pyt_state_dict)
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.dict_utils import nested_values

_STORAGE_RECORD = re.compile(r"/data/\d+$")
_LOCAL_HEADER = b"PK\x03\x04"


class _Slice(io.RawIOBase):
    """A read-only window ``[offset, offset + length)`` of an open file, with full seek semantics (zipfile seeks
    relative to the end; torch's own file view gets negative end offsets wrong)."""

    def __init__(self, fd: int, offset: int, length: int):
        super().__init__()
        self._fd, self._offset, self._length, self._pos = fd, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._length}[whence]
        self._pos = min(max(base + pos, 0), self._length)
        return self._pos

    def readinto(self, buf) -> int:
        view = memoryview(buf).cast("B")
        n = min(len(view), self._length - self._pos)
        got = os.preadv(self._fd, [view[:n]], self._offset + self._pos) if n > 0 else 0
        self._pos += got
        return got


def _record_offset(fd: int, offset: int, length: int) -> tuple[int, int] | None:
    """(absolute file offset, size) of the one uncompressed storage record of the torch.save zip stored at
    ``[offset, offset + length)``; None when the item is anything else."""
    try:
        with zipfile.ZipFile(_Slice(fd, offset, length)) as z:
            records = [i for i in z.infolist() if _STORAGE_RECORD.search(i.filename)]
    except (zipfile.BadZipFile, OSError, ValueError):
        return None
    if len(records) != 1 or records[0].compress_type != zipfile.ZIP_STORED:
        return None
    info = records[0]
    header = os.pread(fd, 30, offset + info.header_offset)
    if len(header) != 30 or header[:4] != _LOCAL_HEADER:
        return None
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return offset + info.header_offset + 30 + name_len + extra_len, info.file_size


def _whole_chunk_record(fd: int, offset: int, length: int, req, target: torch.Tensor) -> tuple[int, int] | None:
    """(file offset, size) of the bytes that are exactly ``target``'s content, if the request is a whole stored
    chunk of the destination's dtype into a contiguous CPU destination; None otherwise."""
    if any(req.storage_offsets) or list(req.lengths) != list(target.shape) or not target.is_contiguous() \
            or target.device.type != "cpu" or target.numel() == 0:
        return None
    record = _record_offset(fd, offset, length)
    if record is None:
        return None
    size = record[1]
    stored = torch.load(_Slice(fd, offset, length), map_location="meta", weights_only=True)
    if not isinstance(stored, torch.Tensor) or stored.dtype != target.dtype or stored.shape != target.shape \
            or not stored.is_contiguous() or stored.storage_offset() != 0 \
            or size != stored.untyped_storage().nbytes() or size != target.numel() * target.element_size():
        return None
    return record


def _pread_into(fd: int, start: int, size: int, target: torch.Tensor) -> bool:
    """``size`` bytes at ``start`` straight into ``target``'s memory; False on a short file."""
    view = memoryview(target.reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < size:
        got = os.preadv(fd, [view[done:]], start + done)
        if got <= 0:
            return False
        done += got
    return True


def _read_whole_chunk_into(fd: int, offset: int, length: int, req, target: torch.Tensor) -> bool:
    """Fill ``target`` from the stored item if it is exactly the stored tensor's bytes; False if not applicable."""
    record = _whole_chunk_record(fd, offset, length, req, target)
    return record is not None and _pread_into(fd, *record, target)


class DirectFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose whole-chunk tensor reads go straight into the destination (module docstring).
    The reads run on ``threads`` threads: preadv releases the GIL, and first-touching the destination pages is
    CPU work in the kernel that a second core halves when it is free."""

    def __init__(self, path, *args, threads: int = 2, **kwargs):
        super().__init__(path, *args, **kwargs)
        self.threads = threads

    def read_data(self, plan, planner) -> Future:
        rest, jobs = [], []
        by_file: dict[str, list] = {}
        for req in plan.items:
            by_file.setdefault(self.storage_data[req.storage_index].relative_path, []).append(req)
        fds = []
        try:
            for relative_path, reqs in by_file.items():
                fd = os.open(Path(self.path) / relative_path, os.O_RDONLY)
                fds.append(fd)
                for req in reqs:
                    info = self.storage_data[req.storage_index]
                    if req.type == LoadItemType.BYTE_IO or info.transform_descriptors:
                        rest.append(req)
                        continue
                    target = planner.resolve_tensor(req).detach()
                    record = _whole_chunk_record(fd, info.offset, info.length, req, target)
                    if record is None:
                        rest.append(req)
                    else:
                        jobs.append((req, fd, record, target))
            # Largest first, so that the two threads finish together.
            jobs.sort(key=lambda j: -j[2][1])
            with ThreadPoolExecutor(max_workers=max(1, self.threads)) as pool:
                ok = list(pool.map(lambda j: _pread_into(j[1], *j[2], j[3]), jobs))
        finally:
            for fd in fds:
                os.close(fd)
        for (req, _, _, target), good in zip(jobs, ok):
            if good:
                planner.commit_tensor(req, target)
            else:
                rest.append(req)  # a short file: torch's path raises its own error
        if rest:  # everything else (objects, partial chunks, casts) exactly as torch reads it
            return super().read_data(dataclasses.replace(plan, items=rest), planner)
        done: Future = Future()
        done.set_result(None)
        return done


class DirectTorchDistLoad(TorchDistLoadShardedStrategy):
    """megatron's torch_dist load (same planner, same key translation) with :class:`DirectFileSystemReader`;
    ``dist_checkpointing.load(..., sharded_strategy=DirectTorchDistLoad())``."""

    def load(self, sharded_state_dict, checkpoint_dir: Path, async_strategy: str = "mcore"):
        from torch.distributed import checkpoint

        tensors = [t for t in nested_values(sharded_state_dict) if isinstance(t, ShardedTensor)]
        flexible = [t for t in tensors if not t.allow_shape_mismatch]
        mismatch = {t.key: t for t in tensors if t.allow_shape_mismatch}
        orig = sharded_state_dict
        sharded_state_dict, flat_mapping, rename_mapping = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict)
        pyt_state_dict = mcore_to_pyt_state_dict(sharded_state_dict, True)
        checkpoint.load(pyt_state_dict, DirectFileSystemReader(str(checkpoint_dir)),
                        planner=MCoreLoadPlanner(shapes_validation_sharded_tensors=flexible,
                                                 allow_shape_mismatch_sharded_tensors=mismatch,
                                                 stream_ckpt_dequant=self.stream_ckpt_dequant,
                                                 flatten_state_dict=False, flatten_sharded_tensors=False),
                        no_dist=True)
        mcore_state_dict = {k: _unwrap_pyt_sharded_tensor(v) for k, v in pyt_state_dict.items()}
        mcore_state_dict = _replace_sharded_keys_with_state_dict_keys(mcore_state_dict, flat_mapping,
                                                                      rename_mapping)
        _restore_dict_types(mcore_state_dict, orig)
        return mcore_state_dict
