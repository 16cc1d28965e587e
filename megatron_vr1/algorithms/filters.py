"""Loss-mask filters applied before the policy loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch

TRUNCATED = "length"
"""The finish_reason of a completion cut at max_new_tokens (SGLang / OpenAI convention)."""


def overlong_keep(finish_reasons: Sequence[str]) -> torch.Tensor:
    """[B] bool: False for completions truncated at the length limit (finish_reason == "length")."""
    return torch.tensor([reason != TRUNCATED for reason in finish_reasons], dtype=torch.bool)


def apply_overlong_filter(*, loss_mask: torch.Tensor, finish_reasons: Sequence[str]) -> torch.Tensor:
    """Overlong filtering (DAPO): a copy of ``loss_mask`` [B, T] with truncated completions masked out entirely,
    so an answer that never finished is neither rewarded nor punished for where it was cut. Their group's
    advantages are still computed with them (the filter only removes them from the loss)."""
    if loss_mask.dim() != 2 or loss_mask.shape[0] != len(finish_reasons):
        raise ValueError(f"loss_mask {tuple(loss_mask.shape)} needs one row per finish reason "
                         f"({len(finish_reasons)} given)")
    keep = overlong_keep(finish_reasons).to(loss_mask.device)
    return loss_mask * keep[:, None].to(loss_mask.dtype)
