"""The loop's plumbing, kept out of loop.py so the loop reads like the algorithm: rank helpers, reward/rollout
scalars, and checkpoint save/resume through the checkpoint package (weight sync: training/weights.py)."""

from __future__ import annotations

import time

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_vr1.config.run import RunConfig


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (pickled: for small things, a flag or a count; a step's data goes through
    ``scatter_shards``)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


_DP_RANKS: dict[int, list[int]] = {}


def _data_parallel_rank_of_each_rank() -> list[int]:
    """Global rank -> data-parallel rank (gathered once per process group)."""
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group()
    if id(group) not in _DP_RANKS:
        ranks: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, parallel_state.get_data_parallel_rank())
        _DP_RANKS.clear()
        _DP_RANKS[id(group)] = ranks
    return _DP_RANKS[id(group)]


def scatter_shards(shards: list | None) -> Any:
    """Rank 0's ``shards`` (one per data-parallel rank, ``training.sharding``; None: no update this step) to the
    ranks: each receives its data-parallel rank's shard only, the TP / PP ranks of one data-parallel rank the
    same one. ``scatter_object_list`` pickles each shard once for its rank (on NCCL through the rank's GPU)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return shards[0] if shards else None
    dp_of = _data_parallel_rank_of_each_rank()
    objects = None
    if dist.get_rank() == 0:
        objects = [None if shards is None else shards[dp_of[r]] for r in range(dist.get_world_size())]
    out: list[Any] = [None]
    dist.scatter_object_list(out, objects, src=0)
    return out[0]


def budget_reached(started: float, budget_s: float) -> bool:
    """Rank 0's "the time budget is spent" on every rank (ranks' clocks differ; the decision must not)."""
    return bool(broadcast_object(budget_s > 0 and time.time() - started >= budget_s))


def reward_scalars(rewards, groups, zero_variance, version: int) -> dict[str, float]:
    """Reward breakdown, completion lengths, truncation, zero-variance groups and the sampling weight versions."""
    n = max(1, len(rewards))
    comps = [c for g in groups for c in g.completions]
    mean = lambda xs: float(sum(xs) / max(1, len(xs)))  # noqa: E731
    return {
        "reward/total": mean([r.total for r in rewards]), "reward/format": mean([r.format for r in rewards]),
        "reward/recall": mean([r.recall for r in rewards]), "reward/precision": mean([r.precision for r in rewards]),
        "reward/mean_iou": mean([r.mean_iou for r in rewards]),
        "reward/unparsable_frac": sum(r.parse_status == "unparsable" for r in rewards) / n,
        "rollout/length_mean": mean([len(c.token_ids) for c in comps]),
        "rollout/length_max": float(max((len(c.token_ids) for c in comps), default=0)),
        "rollout/truncated_frac": sum(c.finish_reason == "length" for c in comps) / max(1, len(comps)),
        "rollout/zero_variance_groups": float(zero_variance.sum()),
        "rollout/weight_version_lag": float(version - min((c.weight_version for c in comps), default=version)),
    }


def _save_dir(cfg: RunConfig) -> Path:
    return Path(cfg.checkpoint.save_dir or Path(cfg.log.run_dir) / "checkpoints")


def save_state(cfg: RunConfig, policy, step: int, version: int, *, dataset=None, schedule=None, dynamic=None) -> Path:
    """Model, optimizer, scheduler, RNG (per rank), sampler position, reward stage and weight version; atomic."""
    from megatron_vr1.checkpoint.training_state import save_checkpoint

    state = {"weight_version": version,
             "data": dataset.state_dict() if dataset is not None else None,
             "reward_schedule": schedule.state_dict() if schedule is not None else None,
             "dynamic_sampling": dynamic.state_dict() if dynamic is not None else None}
    return save_checkpoint(save_dir=_save_dir(cfg), step=step, model=policy.model, optimizer=policy.optimizer,
                           scheduler=policy.scheduler, state=state, keep_last=cfg.checkpoint.keep_last)


def load_or_start(cfg: RunConfig, policy, *, dataset=None, schedule=None, dynamic=None) -> tuple[int, int]:
    """(last completed step, weight version): restored from the save dir's ``latest`` when resuming, else (0, 0)."""
    from megatron_vr1.checkpoint.training_state import load_checkpoint

    info = None
    if cfg.checkpoint.resume:
        info = load_checkpoint(load_dir=_save_dir(cfg), model=policy.model, optimizer=policy.optimizer,
                               scheduler=policy.scheduler)
    if info is None:
        return 0, warm_start(cfg, policy)
    s = info.state
    for obj, key in ((dataset, "data"), (schedule, "reward_schedule"), (dynamic, "dynamic_sampling")):
        if obj is not None and s.get(key) is not None:
            obj.load_state_dict(s[key])
    return info.step, int(s.get("weight_version", info.step))


def warm_start(cfg: RunConfig, policy) -> int:
    """Load ``checkpoint.init_from``'s weights into the policy and the reference; returns the weight version to
    start at: 1 when the weights changed (the engine, loaded from model.hf_path, must be synced), else 0."""
    from megatron_vr1.checkpoint.training_state import load_checkpoint

    if not cfg.checkpoint.init_from:
        return 0
    for model in (policy.model, policy.reference):
        if model is not None and load_checkpoint(load_dir=cfg.checkpoint.init_from, model=model,
                                                 load_rng=False) is None:
            raise FileNotFoundError(f"checkpoint.init_from={cfg.checkpoint.init_from}: no checkpoint there "
                                    "(expected a save dir with `latest`, or an iter_ directory)")
    return 1


@torch.no_grad()
def logprob_gap(policy, engine, batch, prompts) -> float:
    """Max |policy - engine| teacher-forced logprob over the completion tokens of ``batch`` (rank 0 engine):
    zero up to float noise right after a weight sync."""
    ours = policy.logprobs(batch)
    worst = 0.0
    for b, prep in enumerate(prompts):
        p = len(prep.prompt_ids)
        n = int(batch.lengths[b]) - p
        ids = batch.input_ids[b, p:p + n].tolist()
        theirs = torch.tensor(engine.teacher_forced_logprobs(prep.prompt, prep.sample.image, ids))
        worst = max(worst, float((ours[b, p:p + n] - theirs).abs().max()))
    return worst
