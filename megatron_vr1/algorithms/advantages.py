"""GRPO group-normalised advantages: A_i = (r_i - mean_g) / (std_g + eps) over groups of G completions.

Rewards are taken in float64: with non-binary partial rewards (e.g. 0.9 + 0.333...) float32 round-off makes
``r - mean`` non-zero inside a group whose rewards are all equal, which hands the policy a spurious gradient
(slime's geo3k note). Zero-variance groups are found by exact equality and their advantages are exactly 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupAdvantages:
    """Advantages for ``num_groups * group_size`` completions laid out group after group."""

    advantages: torch.Tensor
    """[N] float32, the value that enters the loss."""
    zero_variance: torch.Tensor
    """[num_groups] bool: every reward in the group is exactly equal (no learning signal; dynamic sampling
    drops these groups)."""
    group_mean: torch.Tensor
    """[num_groups] float64."""
    group_std: torch.Tensor
    """[num_groups] float64 (unbiased or biased, as requested)."""


def _as_groups(rewards: torch.Tensor | Sequence[float], group_size: int) -> torch.Tensor:
    r = torch.as_tensor(rewards, dtype=torch.float64).detach().reshape(-1)
    if group_size < 1:
        raise ValueError(f"group_size={group_size} is invalid: use the number of completions per prompt (>= 1)")
    if r.numel() % group_size:
        raise ValueError(f"{r.numel()} rewards do not split into groups of group_size={group_size}: "
                         "pass whole groups laid out group after group")
    if not torch.isfinite(r).all():
        raise ValueError("rewards contain NaN or inf: fix the reward function (rewards must be finite)")
    return r.reshape(-1, group_size)


def zero_variance_groups(*, rewards: torch.Tensor | Sequence[float], group_size: int) -> torch.Tensor:
    """[num_groups] bool: groups whose rewards are all exactly equal (compared in float64, not via std > tol)."""
    groups = _as_groups(rewards, group_size)
    return (groups == groups[:, :1]).all(dim=1)


def group_advantages(*, rewards: torch.Tensor | Sequence[float], group_size: int, eps: float = 1e-4,
                     unbiased_std: bool = True) -> GroupAdvantages:
    """GRPO advantages over consecutive groups of ``group_size`` rewards.

    ``unbiased_std=True`` is torch's default (N-1), as the released Vision-R1 trainer uses; ``eps=1e-4`` is its
    denominator guard. The arithmetic is float64; only the returned ``advantages`` are cast to float32.
    """
    if eps < 0:
        raise ValueError(f"eps={eps} is invalid: use >= 0 (released trainer: 1e-4)")
    groups = _as_groups(rewards, group_size)
    if unbiased_std and group_size < 2:
        raise ValueError("unbiased_std=True needs group_size >= 2 (N-1 in the denominator); use G >= 2")
    mean = groups.mean(dim=1)
    std = groups.std(dim=1, unbiased=unbiased_std) if group_size > 1 else torch.zeros_like(mean)
    zero_var = (groups == groups[:, :1]).all(dim=1)
    centred = groups - mean[:, None]
    # Exact equality, not the float64 mean: sum(0.1, 0.1, 0.1) / 3 != 0.1, so force a clean zero.
    centred[zero_var] = 0.0
    # where(): with eps=0 a zero-variance group would otherwise be 0/0 = NaN.
    adv = torch.where(zero_var[:, None], torch.zeros_like(centred), centred / (std[:, None] + eps))
    return GroupAdvantages(advantages=adv.reshape(-1).to(torch.float32), zero_variance=zero_var,
                           group_mean=mean, group_std=std)
