"""SFT mode on the same rows: teacher forcing on the released SFT target (the fenced JSON answer + <|im_end|>).

It is the paper's "+SFT" baseline and the demo's warm start. Same Policy, optimizer, schedule, logging and
checkpoints as GRPO; only the batch (prompt + target) and the loss (the algorithms' NLL) differ.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from megatron_vr1.config.run import RunConfig
from megatron_vr1.training.batch import prepare_prompt, sft_batch
from megatron_vr1.training.metrics import MetricsLogger
from megatron_vr1.training.policy import LossFn, Policy
from megatron_vr1.training.sharding import shard_batch
from megatron_vr1.training.state import budget_reached, is_rank0, load_or_start, save_state, scatter_shards
from megatron_vr1.types import Sample


def sft_loss_fn(aggregation: str = "token") -> LossFn:
    """The algorithms' SFT negative log-likelihood as a Policy loss function (advantages are ignored)."""
    from megatron_vr1.algorithms.sft_loss import sft_loss

    def loss_fn(*, logprobs, entropy, mask, advantages, old_logprobs, ref_logprobs, rollout_logprobs, denominator):
        loss = sft_loss(token_logprobs=logprobs, loss_mask=mask, aggregation=aggregation, denominator=denominator)
        m = mask.sum().clamp(min=1.0)
        return loss, {"nll": (-(logprobs * mask).sum() / m).detach(), "entropy_mean": ((entropy * mask).sum() / m).detach(),
                      "num_tokens": mask.sum().detach()}

    return loss_fn


def target_ids(sample: Sample, tokenizer) -> list[int]:
    """Token ids of the sample's SFT answer followed by <|im_end|> (the end-of-turn the policy must learn)."""
    from megatron_vr1.data.prompts import IM_END, sample_sft_target

    return tokenizer(sample_sft_target(sample) + IM_END, add_special_tokens=False)["input_ids"]


def sft_train(cfg: RunConfig, policy: Policy, samples: Iterator[Sample], *, tokenizer, dataset=None) -> list[dict]:
    """``cfg.grpo.train_steps`` SFT steps (fewer if ``grpo.time_budget_s`` runs out) of ``cfg.grpo.prompts_per_step``
    rows each (``samples`` read on rank 0).
    Token-level mean NLL over the step (``grpo.loss_aggregation`` picks "token" or "sequence")."""
    from megatron.core import parallel_state

    g, rank0 = cfg.grpo, is_rank0()
    dp = parallel_state.get_data_parallel_world_size()
    start, version = load_or_start(cfg, policy, dataset=dataset)
    log = MetricsLogger(cfg.log.run_dir, total_steps=g.stop_at_step or g.train_steps, start_step=start,
                        enabled=rank0, tensorboard=cfg.log.tensorboard, progress=cfg.log.progress, description="sft")
    loss_fn, records, started = sft_loss_fn(g.loss_aggregation), [], time.time()
    try:
        end = g.stop_at_step or g.train_steps  # stop_at_step: a checkpoint partway through the schedule
        for step in range(start + 1, end + 1):
            t0 = time.time()
            batch = shards = None
            if rank0:
                prompts = [prepare_prompt(next(samples), tokenizer, min_pixels=cfg.data.min_pixels,
                                          max_pixels=cfg.data.max_pixels) for _ in range(g.prompts_per_step)]
                batch = sft_batch(prompts, [target_ids(p.sample, tokenizer) for p in prompts])
                shards = shard_batch(batch, dp)
            shard = scatter_shards(shards)  # each rank: its data-parallel rank's rows only
            if shard is None:
                raise ValueError(f"grpo.prompts_per_step={g.prompts_per_step} SFT rows for {dp} data-parallel ranks: "
                                 "give every rank at least one")
            result = policy.train_step(shard.batch, loss_fn, rows=shard.minibatches[0], totals=shard.totals[0])
            version += 1
            elapsed = time.time() - t0
            scalars = {**{f"train/{k}": v for k, v in result.metrics.items()}, "train/grad_norm": result.grad_norm,
                       "train/lr": result.lr, "time/step_s": elapsed, "time/elapsed_s": time.time() - started}
            if batch is not None:  # rank 0 holds the whole step
                scalars["throughput/tokens_per_s"] = float(batch.loss_mask.sum()) / max(elapsed, 1e-9)
            if dataset is not None:  # rank 0 reads all data, so its count is the run's
                scalars["data/bad_rows_skipped"] = float(dataset.bad_rows_skipped)
            if rank0:
                log.log(step, scalars)
                records.append({"step": step, **scalars})
            out_of_time = budget_reached(started, g.time_budget_s)
            every = cfg.checkpoint.save_interval
            if every and (step % every == 0 or step == end or out_of_time):
                save_state(cfg, policy, step, version, dataset=dataset)
            if out_of_time:
                break
    finally:
        log.close()
    return records
