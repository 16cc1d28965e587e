"""Token log-probabilities and entropy from vocab-parallel logits, without gathering the vocabulary.

Each TP rank holds logits for its slice of the (padded) vocabulary. We all-reduce the max (no grad: the
log-sum-exp is shift invariant), then the sum of exponentials and the sum of p*z, and pick the target logit on
the rank that owns it; only [tokens]-sized tensors cross ranks, never [tokens, vocab]. Rows past the true
vocabulary (padding to a multiple of 128 x TP) are excluded, so the result equals transformers'
log_softmax over the real vocabulary. Gradients follow megatron's convention: the loss is replicated over TP and
``reduce_from_tensor_model_parallel_region`` (sum forward, identity backward) carries each rank's share.

Under pipeline parallelism the last stage computes them; ``pipelined_token_logprobs`` runs the model through
megatron's schedule and broadcasts the results to every pipeline rank.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterable

import torch
import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """Per-token results [B, S], zero outside ``mask`` (the completion tokens)."""

    logprobs: torch.Tensor
    entropy: torch.Tensor
    mask: torch.Tensor


def vocab_parallel_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, vocab_size: int | None = None,
                            compute_entropy: bool = True, tp_group=None,
                            temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) and the entropy of p for vocab-parallel ``logits`` [..., V/TP] and ``targets`` [...].

    ``vocab_size``: the real vocabulary; ids at or past it (TP padding) get probability 0. Computed in fp32.
    ``temperature``: p = softmax(logits / temperature), the distribution a sampler at that temperature draws from.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region
    from megatron.core.tensor_parallel.utils import VocabUtility

    group = tp_group if tp_group is not None else parallel_state.get_tensor_model_parallel_group()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    part = logits.shape[-1]
    start, end = VocabUtility.vocab_range_from_per_partition_vocab_size(part, rank, world)
    valid = None
    if vocab_size is not None and end > vocab_size:
        valid = torch.arange(start, end, device=logits.device) < vocab_size

    with torch.no_grad():
        local_max = logits if valid is None else logits.masked_fill(~valid, float("-inf"))
        shift = local_max.max(dim=-1).values
        if world > 1:
            dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
    z = logits - shift.unsqueeze(-1)
    exp = z.exp()
    if valid is not None:
        exp = torch.where(valid, exp, torch.zeros((), dtype=exp.dtype, device=exp.device))
    sum_exp = reduce_from_tensor_model_parallel_region(exp.sum(dim=-1), group=group)
    log_z = sum_exp.log()

    # The target's logit lives on exactly one rank; the others contribute 0 to the sum.
    local_target = targets - start
    owned = (local_target >= 0) & (local_target < part)
    picked = z.gather(-1, local_target.clamp(0, part - 1).unsqueeze(-1)).squeeze(-1)
    picked = torch.where(owned, picked, torch.zeros((), dtype=picked.dtype, device=picked.device))
    target_z = reduce_from_tensor_model_parallel_region(picked, group=group)
    logprobs = target_z - log_z

    entropy = None
    if compute_entropy:
        # H = log Z - sum_i p_i z_i = log Z - (sum_i e^{z_i} z_i) / Z
        weighted = reduce_from_tensor_model_parallel_region((exp * z).sum(dim=-1), group=group)
        entropy = log_z - weighted / sum_exp
    return logprobs, entropy


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, *, vocab_size: int | None = None,
                   compute_entropy: bool = True, tp_group=None, temperature: float = 1.0) -> TokenLogprobs:
    """``vocab_parallel_logprobs`` masked to the completion tokens (``mask`` [B, S], 1 = scored)."""
    lp, ent = vocab_parallel_logprobs(logits, targets, vocab_size=vocab_size, compute_entropy=compute_entropy,
                                      tp_group=tp_group, temperature=temperature)
    m = mask.to(lp.dtype)
    return TokenLogprobs(logprobs=lp * m, entropy=(ent * m) if ent is not None else torch.zeros_like(lp), mask=m)


@dataclass(slots=True)
class MicroBatch:
    """One micro-batch of model inputs plus what the last stage scores. Every pipeline stage gets the same record;
    each uses what it needs (the first stage the tokens and pixels, the last stage targets and mask)."""

    input_ids: torch.Tensor          # [B, S]
    position_ids: torch.Tensor       # [3, B, S]
    targets: torch.Tensor            # [B, S] next-token ids (input_ids shifted left); packed: [k, L] (see below)
    loss_mask: torch.Tensor          # [B, S] 1 on completion tokens; packed: [k, L]
    attention_mask: torch.Tensor | None = None  # megatron bool mask, or None for causal
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    score_index: torch.Tensor | None = None
    """Shared-prompt packing (training/packing.py): [k, L] flat positions of the [B, S] logits that predict each of
    the k completions' L tokens; ``targets`` / ``loss_mask`` are then [k, L]. None: logits score ``targets`` in
    place."""
    token_index: torch.Tensor | None = None
    """Packed: [k, L] each scored token's position in its TrainBatch row."""
    # What the loss reads besides the logits, laid out like ``targets`` (train steps only; None otherwise).
    advantages: torch.Tensor | None = None        # [k]
    old_logprobs: torch.Tensor | None = None      # [k, L]
    ref_logprobs: torch.Tensor | None = None      # [k, L]
    rollout_logprobs: torch.Tensor | None = None  # [k, L]

    def to(self, device: torch.device) -> "MicroBatch":
        """This micro-batch with every tensor on ``device``: the trainer's one host-to-device boundary."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        return MicroBatch(**moved)

    def model_kwargs(self) -> dict:
        return dict(input_ids=self.input_ids, position_ids=self.position_ids, attention_mask=self.attention_mask,
                    pixel_values=self.pixel_values, image_grid_thw=self.image_grid_thw)

    def scoring_logits(self, output: torch.Tensor) -> torch.Tensor:
        """The model's logits laid out like ``targets``."""
        if self.score_index is None:
            return output
        from megatron_vr1.training.packing import scored_logits

        return scored_logits(output, self.score_index)


def broadcast_from_last_stage(tensors: list[torch.Tensor] | None, device: torch.device) -> list[torch.Tensor]:
    """The last pipeline stage's list of tensors on every rank of its pipeline group (shapes sent first)."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return list(tensors or [])
    group = parallel_state.get_pipeline_model_parallel_group()
    src = parallel_state.get_pipeline_model_parallel_last_rank()
    meta = [[(tuple(t.shape), str(t.dtype).removeprefix("torch.")) for t in tensors] if tensors is not None else None]
    dist.broadcast_object_list(meta, src=src, group=group)
    out = []
    for i, (shape, dtype) in enumerate(meta[0]):
        buf = tensors[i].detach().contiguous() if tensors is not None else torch.empty(
            shape, dtype=getattr(torch, dtype), device=device)
        dist.broadcast(buf, src=src, group=group)
        out.append(buf)
    return out


def pipelined_token_logprobs(model, micro_batches: Iterable[MicroBatch], *, vocab_size: int | None = None,
                             compute_entropy: bool = True, temperature: float = 1.0) -> list[TokenLogprobs]:
    """Forward-only pass of ``model`` (one chunk, possibly DDP-wrapped) over ``micro_batches`` with megatron's
    pipeline schedule; the last stage computes masked logprobs / entropy, and every pipeline rank receives them."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batches = list(micro_batches)
    results: list[TokenLogprobs] = []

    def forward_step(data_iterator, chunk):
        mb = next(data_iterator)

        def loss_func(output):
            r = token_logprobs(mb.scoring_logits(output), mb.targets, mb.loss_mask, vocab_size=vocab_size,
                               compute_entropy=compute_entropy, temperature=temperature)
            results.append(r)
            zero = output.new_zeros(())
            return zero, {"logprobs": zero.clone()}

        return chunk(**mb.model_kwargs()), loss_func

    device = batches[0].input_ids.device
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
            num_microbatches=len(batches), seq_length=max(b.input_ids.shape[1] for b in batches),
            micro_batch_size=max(b.input_ids.shape[0] for b in batches), forward_only=True)
    from megatron.core import parallel_state

    last = parallel_state.is_pipeline_last_stage()
    flat = [t for r in results for t in (r.logprobs, r.entropy, r.mask)] if last else None
    flat = broadcast_from_last_stage(flat, device)
    return [TokenLogprobs(*flat[i:i + 3]) for i in range(0, len(flat), 3)]

