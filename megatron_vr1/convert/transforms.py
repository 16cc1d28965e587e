"""Named tensor transforms between HF and Megatron layouts. Pure functions on full (unsharded) tensors.

Every split returns fresh tensors (clones) by default, so outputs never share storage: safetensors' save_file
refuses aliasing tensors, a live-sync consumer may ship them anywhere, and a caller may free the fused input
right away. ``copy=False`` returns views instead (gate/up halves and the vocabulary cut are contiguous row
ranges) for a consumer that writes them out before the input changes, such as the offline exporter.
"""

from __future__ import annotations

import torch

from megatron_vr1.convert.errors import ConversionError


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_kv_heads: int,
             head_dim: int) -> torch.Tensor:
    """HF q/k/v projections (weight [rows, hidden] or bias [rows]) -> Megatron's fused ``linear_qkv``.

    Megatron groups the rows per key/value group: ``[q_g (heads/kv * head_dim), k_g (head_dim), v_g (head_dim)]``
    for g = 0..kv-1, so that a TP shard is a contiguous block of whole groups.
    """
    per_group = num_heads // num_kv_heads
    rest = q.shape[1:]
    qg = q.reshape(num_kv_heads, per_group * head_dim, *rest)
    kg = k.reshape(num_kv_heads, head_dim, *rest)
    vg = v.reshape(num_kv_heads, head_dim, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int,
              head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`: Megatron ``linear_qkv`` -> HF (q, k, v)."""
    per_group = num_heads // num_kv_heads
    rest = qkv.shape[1:]
    groups = qkv.reshape(num_kv_heads, (per_group + 2) * head_dim, *rest)
    q, k, v = torch.split(groups, [per_group * head_dim, head_dim, head_dim], dim=1)
    return tuple(_fresh(t.reshape(-1, *rest), qkv) for t in (q, k, v))


def _fresh(t: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``t`` if it is already a copy (a reshape across groups copies), else a clone: one copy either way."""
    return t.clone() if t.untyped_storage().data_ptr() == source.untyped_storage().data_ptr() else t


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """HF gate_proj, up_proj -> Megatron ``linear_fc1`` = [gate; up] (SwiGLU takes the first half as the gate)."""
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor, copy: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_gate_up` (views of ``fc1`` with ``copy=False``)."""
    gate, up = torch.chunk(fc1, 2, dim=0)
    return (gate.clone(), up.clone()) if copy else (gate, up)


def pad_vocab(t: torch.Tensor, padded: int) -> torch.Tensor:
    """Append zero rows up to Megatron's padded vocabulary (padding logits are never sampled: they are
    cut off again by :func:`strip_vocab` and by the logprob code)."""
    if t.shape[0] > padded:
        raise ConversionError(f"vocabulary of {t.shape[0]} rows is larger than the padded size {padded}")
    if t.shape[0] == padded:
        return t
    return torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])], dim=0)


def strip_vocab(t: torch.Tensor, vocab_size: int, copy: bool = True) -> torch.Tensor:
    """Drop Megatron's padding rows (a view of ``t`` with ``copy=False``)."""
    if t.shape[0] == vocab_size:
        return t
    return t[:vocab_size].clone() if copy else t[:vocab_size]
