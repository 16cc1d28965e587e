"""Tensor-parallel split and merge of *full* Megatron tensors, per split kind of the name table.

- column (linear_qkv, output_layer): rows split in contiguous blocks. For linear_qkv this works because the
  fused layout is grouped per key/value group (``transforms.fuse_qkv``), so a block is whole groups.
- gate_up (linear_fc1 = [gate; up]): each rank holds [gate_r; up_r]; a plain row split would give rank 0
  all of gate.
- vocab (embedding, output_layer): the padded vocabulary split in rows.
- row (linear_proj, linear_fc2): columns (input features) split.
- replicated (norms, vision tower): every rank holds the full tensor.
"""

from __future__ import annotations

import torch

from megatron_vr1.convert.errors import ConversionError
from megatron_vr1.convert.names import TPKind


def _check(name: str, size: int, tp: int, what: str) -> None:
    if size % tp:
        raise ConversionError(f"{name}: {what} of size {size} can't be split over tensor_parallel={tp}; choose a TP "
                              f"size that divides it")


def shard(full: torch.Tensor, kind: TPKind, tp: int, rank: int, name: str = "tensor") -> torch.Tensor:
    """The slice of ``full`` that TP rank ``rank`` of ``tp`` holds. Unsplit tensors (TP=1, replicated) are returned
    as is, without a copy: the loader copies into the parameter anyway, and a 1 GB model would pay twice."""
    if tp == 1 or kind == "replicated":
        return full
    if kind in ("column", "vocab"):
        _check(name, full.shape[0], tp, "dim 0")
        return torch.chunk(full, tp, dim=0)[rank].clone()
    if kind == "row":
        _check(name, full.shape[-1], tp, "dim 1")
        return torch.chunk(full, tp, dim=-1)[rank].clone()
    if kind == "gate_up":
        _check(name, full.shape[0], 2 * tp, "dim 0 (gate + up)")
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([torch.chunk(gate, tp, dim=0)[rank], torch.chunk(up, tp, dim=0)[rank]], dim=0)
    raise ConversionError(f"{name}: unknown tensor-parallel kind {kind!r}")


def unshard(shards: list[torch.Tensor], kind: TPKind, name: str = "tensor") -> torch.Tensor:
    """Inverse of :func:`shard`: the full tensor from every TP rank's slice (rank order)."""
    if len(shards) == 1 or kind == "replicated":
        return shards[0]
    if kind in ("column", "vocab"):
        return torch.cat(shards, dim=0)
    if kind == "row":
        return torch.cat(shards, dim=-1)
    if kind == "gate_up":
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    raise ConversionError(f"{name}: unknown tensor-parallel kind {kind!r}")
