"""``megatron-vr1 bench batch``: how a GRPO step's TrainBatch reaches the ranks, before and after sharding.

    torchrun --nproc_per_node 8 -m megatron_vr1.cli bench batch --recipe qwen25vl_7b_vision_r1

Builds one step's batch at the recipe's shape (prompts_per_step x G completions, real-size images at
``data.max_pixels``, completions of up to ``rollout.max_new_tokens``) and ships it to every rank of the recipe's
layout (TP x PP x DP = the world) two ways, each timed in the same process (median of --repeats, slowest rank):

- ``broadcast``: what the trainer did before: the whole batch pickled to every rank, with one copy of the image per
  completion;
- ``scatter``: what it does now (training/sharding.py, training/state.py): one shard per data-parallel rank (its
  rows, each group's image once), each rank receiving its own over ``scatter_object_list``.

Bytes are the pickled payloads. No model is built; on a CPU the ranks are processes on gloo.
"""

from __future__ import annotations

import argparse
import io
import pickle
import statistics
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from megatron_vr1.commands.config_cmd import add_recipe_arguments

    add_recipe_arguments(parser)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per method (median reported)")
    parser.add_argument("--seed", type=int, default=0)


def step_batch(cfg, seed: int = 0):
    """One step's TrainBatch at ``cfg``'s shape: a square image at data.max_pixels per prompt, a 64-token prompt
    text, G completions of random lengths up to rollout.max_new_tokens."""
    import numpy as np
    import torch

    from megatron_vr1.data.image import smart_resize
    from megatron_vr1.training.batch import PreparedPrompt, build_train_batch
    from megatron_vr1.types import Completion, GroundTruth, RolloutGroup, Sample

    g = torch.Generator().manual_seed(seed)
    side = int(cfg.data.max_pixels ** 0.5)
    h, w = smart_resize(side, side, min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
    grid = (1, h // 14, w // 14)
    patches = grid[1] * grid[2]
    prompt_len = patches // 4 + 64
    groups, preps = [], []
    for i in range(cfg.grpo.prompts_per_step):
        sample = Sample(sample_id=f"bench-{i}", problem="", image=b"", solution=(GroundTruth(label="a", box=(0, 0, 1, 1)),),
                        width=w, height=h, input_width=w, input_height=h, num_instances=1, target_id_maps={"a": 1})
        preps.append(PreparedPrompt(sample=sample, prompt="", prompt_ids=tuple(range(20, 20 + prompt_len)),
                                    pixel_values=torch.randn(patches, 1176, generator=g), image_grid_thw=grid))
        comps = []
        for j in range(cfg.grpo.num_generations):
            n = int(torch.randint(cfg.rollout.max_new_tokens // 4, cfg.rollout.max_new_tokens + 1, (1,), generator=g))
            comps.append(Completion(sample_id=sample.sample_id, request_id=f"{i}-{j}", text="",
                                    token_ids=tuple(np.random.default_rng(seed + j).integers(20, 1000, n).tolist()),
                                    logprobs=tuple([-1.0] * n), finish_reason="length", weight_version=0))
        groups.append(RolloutGroup(sample=sample, completions=tuple(comps)))
    adv = torch.randn(cfg.grpo.prompts_per_step * cfg.grpo.num_generations, generator=g)
    return build_train_batch(groups, preps, adv, eos_ids=[])


def per_completion_images(batch):
    """The batch as the trainer laid it out before: one copy of the image per completion."""
    import dataclasses

    import torch

    from megatron_vr1.training.batch import row_images

    rows = list(range(batch.input_ids.shape[0]))
    pixels, grids = row_images(batch, rows)
    return dataclasses.replace(batch, pixel_values=pixels, image_grid_thw=grids, group_ids=torch.arange(len(rows)))


def _nbytes(obj) -> int:
    buf = io.BytesIO()
    pickle.dump(obj, buf)
    return buf.tell()


def _timed(fn, repeats: int) -> float:
    import torch
    import torch.distributed as dist

    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()  # the step starts when the slowest rank has its data
        times.append(time.perf_counter() - t0)
    t = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def run(args: argparse.Namespace) -> int:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_vr1.config import ConfigError, load_recipe
    from megatron_vr1.parallel import state
    from megatron_vr1.training.sharding import shard_batch
    from megatron_vr1.training.state import broadcast_object, is_rank0, scatter_shards

    try:
        cfg = load_recipe(args.recipe, args.overrides)
        env = state.initialize(cfg.parallel)
    except ConfigError as e:
        print(f"megatron-vr1 bench batch: {e}")
        return 2
    try:
        dp = parallel_state.get_data_parallel_world_size()
        batch = step_batch(cfg, args.seed) if is_rank0() else None
        old = per_completion_images(batch) if batch is not None else None
        shards = shard_batch(batch, dp, cfg.grpo.minibatches) if batch is not None else None
        received: dict[str, object] = {}

        def broadcast():
            received["broadcast"] = broadcast_object(old)

        def scatter():
            received["scatter"] = scatter_shards(shards)

        t_old = _timed(broadcast, args.repeats)
        t_new = _timed(scatter, args.repeats)
        sizes = [_nbytes(received["broadcast"]), _nbytes(received["scatter"])]
        gathered: list = [None] * env.world_size
        dist.all_gather_object(gathered, sizes)
        if is_rank0():
            rows = batch.input_ids.shape[0]
            print(f"bench batch: recipe {cfg.name}, world {env.world_size} (TP {cfg.parallel.tensor_parallel} x PP "
                  f"{cfg.parallel.pipeline_parallel} x DP {dp}), {rows} completions of {cfg.grpo.prompts_per_step} "
                  f"prompts, images {tuple(int(v) for v in batch.image_grid_thw[0])} patches; median of "
                  f"{args.repeats}, slowest rank")
            head = ["method", "bytes to each rank (max)", "bytes sent in all", "seconds"]
            table = [["broadcast (before: whole batch, image per completion)", max(s[0] for s in gathered),
                      sum(s[0] for s in gathered[1:]), t_old],
                     ["scatter (now: data-parallel shard, image per group)", max(s[1] for s in gathered),
                      sum(s[1] for s in gathered[1:]), t_new]]
            print("| " + " | ".join(head) + " |")
            print("|" + "|".join("---" for _ in head) + "|")
            for name, per_rank, total, seconds in table:
                print(f"| {name} | {per_rank / 1e6:,.1f} MB | {total / 1e6:,.1f} MB | {seconds:.3f} |")
            print(f"scatter / broadcast: {table[1][1] / table[0][1]:.3f}x the bytes per rank, "
                  f"{t_new / t_old:.3f}x the time")
        return 0
    finally:
        state.destroy()
