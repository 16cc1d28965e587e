"""The Vision-R1 GRPO loop, written to read like the algorithm.

    for step:  sample prompts -> rollout (each completion carries weight_version) -> rewards in the CPU worker,
               overlapped with generating the next prompt chunk -> advantages (with grpo.dynamic_sampling,
               zero-variance groups are dropped and fresh prompts refill the batch) ->
               Megatron update(s) (grpo.minibatches steps per pass, grpo.updates_per_batch passes) -> weight sync,
               weight_version + 1 -> log, incl. the train/rollout logprob gap
               -> periodic checkpoint (and a final one when grpo.time_budget_s is spent)

Rank 0 drives the rollout engine and the reward worker and splits the step's TrainBatch into one shard per
data-parallel rank (whole groups, each image once: training/sharding.py); each rank receives and trains on its
shard only, and the weight export is collective.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from megatron_vr1.config.run import RunConfig
from megatron_vr1.rollout.engine import GenerationRequest, RolloutEngine, SamplingParams
from megatron_vr1.training.batch import PreparedPrompt, build_train_batch, prepare_prompt
from megatron_vr1.training.metrics import MetricsLogger
from megatron_vr1.training.policy import Policy, grpo_loss_fn
from megatron_vr1.training.sharding import shard_batch
from megatron_vr1.training.state import (broadcast_object, budget_reached, is_rank0, load_or_start,
                                         reward_scalars, save_state, scatter_shards)
from megatron_vr1.training.weights import WeightExports, sync_weights
from megatron_vr1.types import RolloutGroup, Sample


def rollout_and_score(engine: RolloutEngine, prompts: list[PreparedPrompt], cfg: RunConfig, worker, step: int,
                      tag: str) -> tuple[list[RolloutGroup], list]:
    """Generate G completions per prompt, one prompt chunk at a time, scoring each chunk in the reward worker
    while the next chunk generates. Returns the groups and their RewardBreakdowns (group after group)."""
    from megatron_vr1.rewards.target import target_from_sample

    sampling = SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                              max_new_tokens=cfg.rollout.max_new_tokens, n=cfg.grpo.num_generations)
    chunk = max(1, -(-len(prompts) // cfg.rollout.reward_overlap_chunks))
    groups, futures = [], []
    for start in range(0, len(prompts), chunk):
        part = prompts[start:start + chunk]
        requests = [GenerationRequest(request_id=f"{tag}-{start + i}", sample_id=p.sample.sample_id, prompt=p.prompt,
                                      image=p.sample.image, sampling=sampling) for i, p in enumerate(part)]
        for p, comps in zip(part, engine.generate(requests)):
            groups.append(RolloutGroup(sample=p.sample, completions=tuple(comps)))
        texts = [c.text for g in groups[start:] for c in g.completions]
        targets = [target_from_sample(g.sample) for g in groups[start:] for _ in g.completions]
        futures.append(worker.submit(texts, targets, step))
    rewards = [r for f in futures for r in f.result()]
    return groups, rewards


@dataclass(slots=True)
class ScoredGroup:
    """One prompt's G completions with their advantages, ready for the batch."""

    prompt: PreparedPrompt
    group: RolloutGroup
    advantages: torch.Tensor
    """[G] float32."""


def sample_step(engine: RolloutEngine, samples: Iterator[Sample], tokenizer, cfg: RunConfig, worker, step: int,
                dynamic=None) -> tuple[list[ScoredGroup], list[RolloutGroup], list, torch.Tensor]:
    """The step's training groups, plus every group sampled, their rewards and zero-variance flags (for logging).

    Without ``dynamic`` (a DynamicSampler) one round of ``prompts_per_step`` prompts is the batch. With it,
    zero-variance groups are dropped and rounds of fresh prompts refill the batch, up to its round cap.
    """
    from megatron_vr1.algorithms.advantages import group_advantages

    g, n = cfg.grpo, cfg.grpo.num_generations
    all_groups, all_rewards, flags, rnd = [], [], [], 0
    while True:
        need = g.prompts_per_step - (dynamic.num_buffered if dynamic is not None else 0)
        prompts = [prepare_prompt(next(samples), tokenizer, min_pixels=cfg.data.min_pixels,
                                  max_pixels=cfg.data.max_pixels) for _ in range(need)]
        groups, rewards = rollout_and_score(engine, prompts, cfg, worker, step, f"s{step}r{rnd}")
        adv = group_advantages(rewards=[r.total for r in rewards], group_size=n, eps=g.adv_eps,
                               unbiased_std=g.std_unbiased)
        scored = [ScoredGroup(p, grp, adv.advantages[i * n:(i + 1) * n])
                  for i, (p, grp) in enumerate(zip(prompts, groups))]
        all_groups += groups
        all_rewards += rewards
        flags.append(adv.zero_variance)
        rnd += 1
        if dynamic is None:
            return scored, all_groups, all_rewards, torch.cat(flags)
        dynamic.add(scored, zero_variance=adv.zero_variance.tolist())
        if dynamic.ready():
            return dynamic.pop_batch(), all_groups, all_rewards, torch.cat(flags)


def grpo_train(cfg: RunConfig, policy: Policy, engine: RolloutEngine | None, samples: Iterator[Sample], *,
               tokenizer, eos_ids: list[int], vision_ids: list[int] = (), dataset=None) -> list[dict]:
    """Run ``cfg.grpo.train_steps`` GRPO steps (resuming from the checkpoint dir when one exists), or fewer when
    ``grpo.time_budget_s`` runs out. ``engine`` and ``samples`` are used on rank 0 only. Returns the logged
    records (rank 0; empty elsewhere)."""
    from megatron_vr1.algorithms.dynamic_sampling import DynamicSampler
    from megatron_vr1.rewards.schedule import RefinementSchedule
    from megatron_vr1.rewards.worker import RewardWorker

    from megatron.core import parallel_state

    g, rank0 = cfg.grpo, is_rank0()
    dp = parallel_state.get_data_parallel_world_size()
    schedule = RefinementSchedule.from_config(cfg.reward, total_steps=g.train_steps)
    dynamic = (DynamicSampler(target_groups=g.prompts_per_step, max_rounds=g.dynamic_sampling_max_rounds)
               if g.dynamic_sampling else None)
    start, version = load_or_start(cfg, policy, dataset=dataset, schedule=schedule, dynamic=dynamic)
    exports = WeightExports(policy, cfg.rollout.bucket_mb * (1 << 20))
    if broadcast_object(rank0 and engine is not None and engine.weight_version < version):
        sync_weights(exports, engine, version)  # a resumed run's engine starts from the saved weights
    log = MetricsLogger(cfg.log.run_dir, total_steps=g.stop_at_step or g.train_steps, start_step=start,
                        enabled=rank0, tensorboard=cfg.log.tensorboard, progress=cfg.log.progress,
                        rollouts=cfg.log.rollouts)
    worker = RewardWorker(cfg.reward, schedule=schedule) if rank0 else None
    records, loss_fn, started = [], grpo_loss_fn(cfg), time.time()
    try:
        end = g.stop_at_step or g.train_steps  # stop_at_step: a checkpoint partway through the schedule
        for step in range(start + 1, end + 1):
            t0 = time.time()
            batch, shards, scalars = None, None, {}
            if not rank0:
                exports.follow()  # rank 0 may re-export while generating: a server it restarted needs the weights
            else:
                kept, groups, rewards, zero_var = sample_step(engine, samples, tokenizer, cfg, worker, step, dynamic)
                exports.release()
                log.log_rollouts(step, groups, rewards)
                # Dynamic sampling can come back empty-handed (every group flat after its round cap): no update.
                batch = build_train_batch(
                    [k.group for k in kept], [k.prompt for k in kept], torch.cat([k.advantages for k in kept]),
                    eos_ids=eos_ids, overlong_filter=g.overlong_filter, vision_ids=vision_ids) if kept else None
                scalars = reward_scalars(rewards, groups, zero_var, version)
                scalars["rollout/vision_token_frac"] = sum(  # completions kept out of the loss (see batch.py)
                    any(t in vision_ids for t in c.token_ids) for grp in groups for c in grp.completions
                ) / max(1, len(rewards))
                scalars["rollout/groups_trained"] = float(len(kept))
                if dataset is not None:  # rank 0 reads all data, so its count is the run's
                    scalars["data/bad_rows_skipped"] = float(dataset.bad_rows_skipped)
                if dynamic is not None:
                    scalars.update({f"dynamic_sampling/{k}": float(v) for k, v in dynamic.counters.items()})
                scalars["rollout/time_s"] = time.time() - t0
                shards = shard_batch(batch, dp, g.minibatches) if batch is not None else None
            t_scatter = time.time()
            shard = scatter_shards(shards)  # each rank: its data-parallel rank's rows only
            scalars["time/scatter_s"] = time.time() - t_scatter
            if shard is not None:
                t_train = time.time()
                mine = shard.batch
                if g.beta > 0:
                    mine.ref_logprobs = policy.logprobs(mine, reference=True)
                if g.steps_per_batch > 1:
                    mine.old_logprobs = policy.logprobs(mine)
                results = [policy.train_step(mine, loss_fn, rows=rows, totals=totals) for _ in range(g.updates_per_batch)
                           for rows, totals in zip(shard.minibatches, shard.totals)]
                scalars.update({f"train/{k}": sum(r.metrics[k] for r in results) / len(results)
                                for k in results[-1].metrics},
                               **{"train/grad_norm": sum(r.grad_norm for r in results) / len(results),
                                  "train/lr": results[-1].lr, "train/optimizer_steps": float(len(results))})
                version += 1
                t_sync = time.time()
                sync_weights(exports, engine, version)  # rank 0 leads the collective export, the others follow
                scalars["time/train_s"], scalars["time/sync_s"] = t_sync - t_train, time.time() - t_sync
            scalars["time/step_s"] = elapsed = time.time() - t0
            if batch is not None:  # rank 0 keeps the whole step's batch for its logs
                scalars["throughput/tokens_per_s"] = float(batch.loss_mask.sum()) / max(elapsed, 1e-9)
                scalars["throughput/train_tokens"] = float(batch.lengths.sum())  # prompts + completions, per pass
            scalars["time/elapsed_s"] = time.time() - started  # training seconds so far (what the budget counts)
            scalars["weight_version"] = version
            scalars["reward/stage"] = schedule.observe(step).name
            if rank0:
                log.log(step, scalars)
                records.append({"step": step, **scalars})
            out_of_time = budget_reached(started, g.time_budget_s)
            every = cfg.checkpoint.save_interval
            if every and (step % every == 0 or step == end or out_of_time):
                save_state(cfg, policy, step, version, dataset=dataset, schedule=schedule, dynamic=dynamic)
            if out_of_time:
                break
    finally:
        log.close()
        if worker is not None:
            worker.close()
    return records
