"""Supervised fine-tuning loss: token cross-entropy over the answer tokens (the paper's "+SFT" baseline and
the demo's warm start)."""

from __future__ import annotations

import torch

from megatron_vr1.algorithms.policy_loss import Aggregation, aggregate


def token_logprobs_from_logits(*, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels) [B, T] from full-vocabulary ``logits`` [B, T, V] (float32 log-softmax).
    Vocab-parallel logits go through ``megatron_vr1.training.logprobs`` instead."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on [batch, tokens]")
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)


def sft_loss(*, token_logprobs: torch.Tensor, loss_mask: torch.Tensor, aggregation: Aggregation = "token",
             denominator: float | None = None) -> torch.Tensor:
    """Negative log-likelihood of the answer tokens: ``-logp`` averaged over ``loss_mask``.

    "token" (default, what HF/TRL SFT does) weighs every answer token equally; "sequence" averages within
    each answer first. ``denominator`` overrides the local count for a global (cross-micro-batch) mean.
    """
    if token_logprobs.shape != loss_mask.shape:
        raise ValueError(f"token_logprobs {tuple(token_logprobs.shape)} and loss_mask {tuple(loss_mask.shape)} "
                         "must have the same shape")
    return aggregate(-token_logprobs, loss_mask, aggregation=aggregation, denominator=denominator)


def sft_loss_from_logits(*, logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                         aggregation: Aggregation = "token") -> torch.Tensor:
    """``sft_loss`` from full-vocabulary logits [B, T, V] and next-token ``labels`` [B, T]."""
    return sft_loss(token_logprobs=token_logprobs_from_logits(logits=logits, labels=labels), loss_mask=loss_mask,
                    aggregation=aggregation)
