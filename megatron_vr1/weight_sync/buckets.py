"""Buckets of (HF name, tensor) pairs: the one currency every transport accepts.

The exporter (``megatron_vr1.convert.exporter``) yields buckets of full, HF-named tensors from the live Megatron
model; tests and the benchmark yield them from a safetensors checkpoint. A transport takes any iterable of
buckets, so both plug in the same way (anchors pain point 5: one exporter for every transport).

``flatten_bucket`` reproduces the layout of SGLang's ``FlattenedTensorBucket`` (uint8 views concatenated, with
name/shape/dtype/start/end/numel per tensor) so one copy and one message carry a whole bucket.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

NamedTensor = tuple[str, torch.Tensor]
Bucket = list[NamedTensor]

MB = 1 << 20


def bucket_nbytes(bucket: Bucket) -> int:
    """Total payload bytes of a bucket."""
    return sum(t.numel() * t.element_size() for _, t in bucket)


def rebucket(named_tensors: Iterable[NamedTensor], bucket_bytes: int) -> Iterator[Bucket]:
    """Group a stream of (name, tensor) into buckets of at most ``bucket_bytes`` (a larger tensor is alone)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes={bucket_bytes} is invalid: use a positive size (e.g. 512 MB)")
    bucket: Bucket = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def iter_safetensors(model_dir: str | Path) -> Iterator[NamedTensor]:
    """(name, tensor) of every tensor in a HF checkpoint directory, in file then key order (hub names on disk)."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors files; point to a Hugging Face checkpoint directory")
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def buckets_from_safetensors(model_dir: str | Path, bucket_bytes: int = 512 * MB) -> Iterator[Bucket]:
    """Buckets read from a HF checkpoint: the stand-in for the exporter in tests and benchmarks."""
    return rebucket(iter_safetensors(model_dir), bucket_bytes)


@dataclass(frozen=True, slots=True)
class FlatEntry:
    """Where one tensor lives inside a flattened bucket (SGLang's FlattenedTensorMetadata fields)."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


def flatten_bucket(bucket: Bucket) -> tuple[torch.Tensor, list[FlatEntry]]:
    """One contiguous uint8 tensor holding every tensor of the bucket, plus where each one is.

    Mixed dtypes are fine (each tensor is viewed as bytes). The result is a fresh buffer: the caller owns it
    and must keep it alive until the receiver has copied it.
    """
    if not bucket:
        raise ValueError("cannot flatten an empty bucket")
    parts, entries, offset = [], [], 0
    for name, tensor in bucket:
        raw = tensor.detach().contiguous().flatten().view(torch.uint8)
        entries.append(FlatEntry(name, tensor.shape, tensor.dtype, offset, offset + raw.numel(), raw.numel()))
        parts.append(raw)
        offset += raw.numel()
    return torch.cat(parts), entries


def unflatten_bucket(flat: torch.Tensor, entries: list[FlatEntry]) -> Bucket:
    """Views of the tensors inside ``flat`` (inverse of ``flatten_bucket``)."""
    return [(e.name, flat[e.start_idx:e.end_idx].view(e.dtype).reshape(e.shape)) for e in entries]
