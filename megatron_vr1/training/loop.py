"""The Vision-R1 GRPO loop, written to read like the algorithm.

    for step:  sample prompts -> rollout (each completion carries weight_version) -> rewards in the CPU worker,
               overlapped with generating the next prompt chunk -> advantages (zero-variance groups dropped
               with grpo.dynamic_sampling; no refill yet) ->
               Megatron update(s) -> weight sync, weight_version + 1 -> log, incl. the train/rollout logprob gap
               -> periodic checkpoint

Rank 0 drives the rollout engine and the reward worker; the TrainBatch is broadcast to every rank, every rank
takes its DP share of the update, and the weight export is collective.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from megatron_vr1.config.run import RunConfig
from megatron_vr1.rollout.engine import GenerationRequest, RolloutEngine, SamplingParams
from megatron_vr1.training.batch import PreparedPrompt, build_train_batch, prepare_prompt
from megatron_vr1.training.metrics import MetricsLogger
from megatron_vr1.training.policy import Policy, grpo_loss_fn
from megatron_vr1.training.state import (broadcast_object, is_rank0, load_or_start, reward_scalars,
                                         save_state, sync_weights)
from megatron_vr1.types import RolloutGroup, Sample


def rollout_and_score(engine: RolloutEngine, prompts: list[PreparedPrompt], cfg: RunConfig, worker, step: int,
                      tag: str) -> tuple[list[RolloutGroup], list]:
    """Generate G completions per prompt, one prompt chunk at a time, scoring each chunk in the reward worker
    while the next chunk generates. Returns the groups and their RewardBreakdowns (group after group)."""
    from megatron_vr1.rewards.target import target_from_sample

    sampling = SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                              max_new_tokens=cfg.rollout.max_new_tokens, n=cfg.grpo.num_generations)
    chunk = max(1, len(prompts) // 2)
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


def grpo_train(cfg: RunConfig, policy: Policy, engine: RolloutEngine | None, samples: Iterator[Sample], *,
               tokenizer, eos_ids: list[int], vision_ids: list[int] = (), dataset=None) -> list[dict]:
    """Run ``cfg.grpo.train_steps`` GRPO steps (resuming from the checkpoint dir when one exists). ``engine`` and
    ``samples`` are used on rank 0 only. Returns the logged records (rank 0; empty elsewhere)."""
    from megatron_vr1.algorithms.advantages import group_advantages
    from megatron_vr1.rewards.schedule import RefinementSchedule
    from megatron_vr1.rewards.worker import RewardWorker

    g, rank0 = cfg.grpo, is_rank0()
    schedule = RefinementSchedule.from_config(cfg.reward, total_steps=g.train_steps)
    start, version = load_or_start(cfg, policy, dataset=dataset, schedule=schedule)
    if rank0 and engine is not None and engine.weight_version < version:
        sync_weights(policy, engine, version, cfg)  # a resumed run's engine starts from the saved weights
    log = MetricsLogger(cfg.log.run_dir, total_steps=g.train_steps, start_step=start, enabled=rank0,
                        tensorboard=cfg.log.tensorboard, progress=cfg.log.progress)
    worker = RewardWorker(cfg.reward, schedule=schedule) if rank0 else None
    records, loss_fn = [], grpo_loss_fn(cfg)
    try:
        for step in range(start + 1, g.train_steps + 1):
            t0 = time.time()
            batch, scalars = None, {}
            if rank0:
                prompts = [prepare_prompt(next(samples), tokenizer, min_pixels=cfg.data.min_pixels,
                                          max_pixels=cfg.data.max_pixels) for _ in range(g.prompts_per_step)]
                groups, rewards = rollout_and_score(engine, prompts, cfg, worker, step, f"s{step}")
                adv = group_advantages(rewards=[r.total for r in rewards], group_size=g.num_generations,
                                       eps=g.adv_eps, unbiased_std=g.std_unbiased)
                keep = [i for i in range(len(groups)) if not (g.dynamic_sampling and adv.zero_variance[i])]
                n = g.num_generations
                batch = build_train_batch(
                    [groups[i] for i in keep], [prompts[i] for i in keep],
                    torch.cat([adv.advantages[i * n:(i + 1) * n] for i in keep]) if keep else torch.zeros(0),
                    eos_ids=eos_ids, overlong_filter=g.overlong_filter, vision_ids=vision_ids)
                scalars = reward_scalars(rewards, groups, adv, version)
                scalars["rollout/vision_token_frac"] = sum(  # completions kept out of the loss (see batch.py)
                    any(t in vision_ids for t in c.token_ids) for grp in groups for c in grp.completions
                ) / max(1, len(rewards))
                scalars["rollout/time_s"] = time.time() - t0
            batch = broadcast_object(batch)
            if batch is not None:
                if g.beta > 0:
                    batch.ref_logprobs = policy.logprobs(batch, reference=True)
                if g.updates_per_batch > 1:
                    batch.old_logprobs = policy.logprobs(batch)
                for _ in range(g.updates_per_batch):
                    result = policy.train_step(batch, loss_fn)
                scalars.update({f"train/{k}": v for k, v in result.metrics.items()},
                               **{"train/grad_norm": result.grad_norm, "train/lr": result.lr})
                version += 1
                if rank0:
                    sync_weights(policy, engine, version, cfg)
                else:
                    sync_weights(policy, None, version, cfg)  # the export is collective
            scalars["time/step_s"] = elapsed = time.time() - t0
            if batch is not None:
                scalars["throughput/tokens_per_s"] = float(batch.loss_mask.sum()) / max(elapsed, 1e-9)
            scalars["weight_version"] = version
            scalars["reward/stage"] = schedule.observe(step).name
            if rank0:
                log.log(step, scalars)
                records.append({"step": step, **scalars})
            if step % cfg.checkpoint.save_interval == 0 or step == g.train_steps:
                save_state(cfg, policy, step, version, dataset=dataset, schedule=schedule)
    finally:
        log.close()
        if worker is not None:
            worker.close()
    return records
