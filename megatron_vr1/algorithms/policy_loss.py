"""GRPO / PPO policy loss on per-token log-probabilities: clipped surrogate, KL to a frozen reference,
truncated importance sampling (TIS) against the rollout engine, sequence- or token-level aggregation.

Per valid token t of sequence i (A_i the sequence's advantage):

    ratio   = exp(logp - old_logp)                         (== 1 with one update per batch: old = logp.detach())
    pg      = max(-A_i * ratio, -A_i * clip(ratio, 1 - eps_low, 1 + eps_high))
    pg     *= w,  w = min(exp(old_logp - rollout_logp), C)  (TIS, detached; off by default)
    loss_t  = pg + beta * KL_t,   KL_k1 = logp - ref,   KL_k3 = exp(ref - logp) - (ref - logp) - 1

The released Vision-R1 trainer is the special case ratio == 1, no TIS, k3, "sequence" aggregation:
``-[exp(logp - logp.detach()) * A - beta * k3]`` averaged over each sequence's tokens, then over sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

KLEstimator = Literal["k1", "k3"]
Aggregation = Literal["sequence", "token"]


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyLossOutput:
    loss: torch.Tensor
    """Scalar to backpropagate."""
    metrics: dict[str, torch.Tensor]
    """Detached scalars, each a mean over valid tokens: ``pg_loss``, ``clip_fraction`` (tokens whose clipped
    branch is active, i.e. receive no gradient), ``ratio_mean``, ``kl_mean``, ``tis_weight_mean``,
    ``logprob_gap_mean`` (old - rollout), ``logprob_gap_abs_mean``, ``entropy_mean``, plus ``num_tokens``
    and ``num_sequences`` (so a caller can weight a cross-rank reduction)."""


def kl_penalty(*, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate from samples of pi. k1 = logp - ref (unbiased, can be negative);
    k3 = exp(ref - logp) - (ref - logp) - 1 (unbiased, always >= 0; the released trainer's)."""
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k3":
        delta = ref_logprobs - logprobs
        return torch.exp(delta) - delta - 1.0
    raise ValueError(f"kl_estimator={estimator!r} is invalid: use 'k1' or 'k3'")


def aggregate(values: torch.Tensor, mask: torch.Tensor, *, aggregation: Aggregation,
              denominator: float | None = None) -> torch.Tensor:
    """Reduce per-token ``values`` [B, T] over ``mask``.

    "sequence": mean over each sequence's valid tokens, then mean over sequences that have any (released).
    "token": mean over all valid tokens (long answers weigh more). ``denominator`` overrides the count of
    sequences / tokens, so that micro-batches or data-parallel ranks can share one global normaliser.
    """
    mask = mask.to(values.dtype)
    if aggregation == "sequence":
        lengths = mask.sum(dim=-1)
        has_tokens = lengths > 0
        per_seq = (values * mask).sum(dim=-1) / lengths.clamp(min=1.0)
        count = has_tokens.sum().to(values.dtype) if denominator is None else denominator
        return (per_seq * has_tokens).sum() / max(float(count), 1.0)
    if aggregation == "token":
        count = mask.sum() if denominator is None else denominator
        return (values * mask).sum() / max(float(count), 1.0)
    raise ValueError(f"loss_aggregation={aggregation!r} is invalid: use 'sequence' or 'token'")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    values = values.detach().float()
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def _check_shapes(logprobs: torch.Tensor, advantages: torch.Tensor, **per_token: torch.Tensor | None) -> None:
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [batch, tokens], got shape {tuple(logprobs.shape)}")
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must be [batch]={tuple(logprobs.shape[:1])}, got {tuple(advantages.shape)}")
    for name, t in per_token.items():
        if t is not None and t.shape != logprobs.shape:
            raise ValueError(f"{name} must match logprobs' shape {tuple(logprobs.shape)}, got {tuple(t.shape)}")


def policy_loss(*, logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                loss_mask: torch.Tensor, ref_logprobs: torch.Tensor | None = None, beta: float = 0.0,
                kl_estimator: KLEstimator = "k3", clip_eps_low: float = 0.2, clip_eps_high: float = 0.2,
                aggregation: Aggregation = "sequence", rollout_logprobs: torch.Tensor | None = None,
                tis_cap: float | None = None, entropy: torch.Tensor | None = None,
                denominator: float | None = None) -> PolicyLossOutput:
    """The GRPO loss (see the module docstring) for per-token ``logprobs`` [B, T] of the current policy.

    ``old_logprobs``: the policy that sampled the batch as the trainer computes it (pass ``logprobs.detach()``
    for one update per batch). ``rollout_logprobs`` + ``tis_cap``: enable TIS (both needed); the rollout
    logprobs are also used for the train/rollout gap metric when given. ``ref_logprobs`` is required when
    ``beta > 0``. ``loss_mask`` [B, T] is 1 on completion tokens that enter the loss.
    """
    _check_shapes(logprobs, advantages, old_logprobs=old_logprobs, loss_mask=loss_mask, ref_logprobs=ref_logprobs,
                  rollout_logprobs=rollout_logprobs, entropy=entropy)
    if beta > 0 and ref_logprobs is None:
        raise ValueError(f"beta={beta} needs ref_logprobs from the frozen reference model (or use beta=0)")
    if not 0.0 <= clip_eps_low < 1.0 or clip_eps_high < 0.0:
        raise ValueError(f"clip_eps_low={clip_eps_low}, clip_eps_high={clip_eps_high} are invalid: use "
                         "0 <= clip_eps_low < 1 and clip_eps_high >= 0")
    if tis_cap is not None and tis_cap < 1.0:
        raise ValueError(f"tis_cap={tis_cap} is invalid: use a cap >= 1 (e.g. 2)")
    if tis_cap is not None and rollout_logprobs is None:
        raise ValueError("tis_cap is set but rollout_logprobs is None: pass the rollout engine's logprobs")
    mask = loss_mask.to(logprobs.dtype)
    adv = advantages.to(logprobs.dtype)[:, None]
    old = old_logprobs.detach()

    ratio = torch.exp(logprobs - old)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high)
    pg = torch.maximum(unclipped, clipped)
    metrics = {"clip_fraction": _masked_mean((clipped > unclipped).float(), mask),
               "ratio_mean": _masked_mean(ratio, mask)}

    if tis_cap is not None:
        weight = torch.exp(old - rollout_logprobs.detach()).clamp(max=tis_cap).detach()
        pg = pg * weight
        metrics["tis_weight_mean"] = _masked_mean(weight, mask)
    metrics["pg_loss"] = _masked_mean(pg, mask)

    per_token = pg
    if ref_logprobs is not None:
        kl = kl_penalty(logprobs=logprobs, ref_logprobs=ref_logprobs.detach(), estimator=kl_estimator)
        metrics["kl_mean"] = _masked_mean(kl, mask)
        if beta > 0:
            per_token = pg + beta * kl
    if rollout_logprobs is not None:
        gap = old - rollout_logprobs.detach()
        metrics["logprob_gap_mean"] = _masked_mean(gap, mask)
        metrics["logprob_gap_abs_mean"] = _masked_mean(gap.abs(), mask)
    if entropy is not None:
        metrics["entropy_mean"] = _masked_mean(entropy, mask)
    metrics["num_tokens"] = mask.sum().detach()
    metrics["num_sequences"] = (mask.sum(dim=-1) > 0).sum().detach().to(mask.dtype)

    loss = aggregate(per_token, mask, aggregation=aggregation, denominator=denominator)
    return PolicyLossOutput(loss=loss, metrics=metrics)
