"""Checkpoint worker: trains the tiny megatron-core GPT (DDP + megatron Adam + OptimizerParamScheduler) and
saves / resumes the whole training state with megatron_vr1.checkpoint.

Runs as a plain process (world of one) or under torchrun. Writes, under --out:
  metrics_rank{r}.jsonl   one line per finished step (flushed), so a killed run leaves its completed steps
  moments_saved_rank{r}_step{s}.json / moments_loaded_rank{r}.json   optimizer-state fingerprints
  rank{r}.json            the final summary
With --hang-at S the run stops in the middle of step S (after forward/backward, before optimizer.step), writes
OUT/hanging and sleeps until the test kills it.
"""

import argparse
import hashlib
import json
import os
import random
import time


def moment_fingerprint(optimizer, tp_rank: int, mp_group, dp_group=None) -> dict:
    """sha256 of every Adam state tensor (exact comparison in one layout), the global squared norms of
    exp_avg / exp_avg_sq summed over the model-parallel group (comparable across TP/PP layouts: TP-replicated
    params counted once) and, for the distributed optimizer, over its data-parallel shards; the step counts."""
    import torch
    import torch.distributed as dist

    digest = hashlib.sha256()
    sq = torch.zeros(2, dtype=torch.float64)
    steps = set()
    for group in optimizer.optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.optimizer.state.get(p, {})
            if "exp_avg" not in st:
                continue
            for key in ("exp_avg", "exp_avg_sq"):
                digest.update(st[key].detach().cpu().contiguous().numpy().tobytes())
            steps.add(float(st["step"]))
            if getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
                sq[0] += st["exp_avg"].double().pow(2).sum()
                sq[1] += st["exp_avg_sq"].double().pow(2).sum()
    if dist.is_initialized():
        dist.all_reduce(sq, group=mp_group)
        if dp_group is not None:
            dist.all_reduce(sq, group=dp_group)
    return {"sha256": digest.hexdigest(), "exp_avg_sq_norm": float(sq[0]), "exp_avg_sq_sq_norm": float(sq[1]),
            "steps": sorted(steps)}


def param_digest(model) -> str:
    digest = hashlib.sha256()
    for _name, p in sorted(model.named_parameters()):
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--save-dir", required=True)
    ap.add_argument("--save-interval", type=int, default=3)
    ap.add_argument("--keep-last", type=int, default=2)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--no-load-optim", action="store_true")
    ap.add_argument("--hang-at", type=int, default=0)
    ap.add_argument("--dist-opt", action="store_true", help="megatron's DistributedOptimizer (shards over DP)")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--rng-data", action="store_true", help="draw data offsets from python/numpy/torch RNGs")
    args = ap.parse_args()

    import numpy as np
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_vr1.checkpoint import load_checkpoint, save_checkpoint
    from megatron_vr1.config.parallel import ParallelConfig
    from megatron_vr1.parallel import state
    from megatron_vr1.training.smoke import TinyGPTShape, _forward_step, build_tiny_gpt, synthetic_batches

    cfg = ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp)
    env = state.initialize(cfg)
    rank = env.rank
    random.seed(1234)
    np.random.seed(1234)
    shape = TinyGPTShape()
    model = build_tiny_gpt(shape, cfg)
    for module in model.modules():  # dropout makes the megatron TP RNG tracker and torch's RNG matter
        if isinstance(module, torch.nn.Dropout):
            module.p = args.dropout
    ddp = DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                                                use_distributed_optimizer=args.dist_opt),
                                  module=model)
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, min_lr=1e-3, weight_decay=0.01, clip_grad=1.0,
                                                       use_distributed_optimizer=args.dist_opt),
                                       [ddp])
    scheduler = OptimizerParamScheduler(optimizer, init_lr=0.0, max_lr=1e-2, min_lr=1e-3, lr_warmup_steps=2,
                                        lr_decay_steps=args.steps, lr_decay_style="cosine", start_wd=0.01,
                                        end_wd=0.01, wd_incr_steps=args.steps, wd_incr_style="constant")
    forward_backward = get_forward_backward_func()
    pool = synthetic_batches(shape, 16, 2, seed=1)
    from megatron.core import parallel_state

    tp_rank, mp_group = state.tp_rank(), parallel_state.get_model_parallel_group()
    dp_group = parallel_state.get_data_parallel_group() if args.dist_opt else None
    out = args.out
    step, position, info = 0, 0, None
    if args.resume:
        info = load_checkpoint(load_dir=args.save_dir, model=ddp, optimizer=optimizer, scheduler=scheduler,
                               load_optimizer=not args.no_load_optim)
        step, position = info.step, info.state["sampler_position"]
        with open(os.path.join(out, f"moments_loaded_rank{rank}.json"), "w") as f:
            json.dump(moment_fingerprint(optimizer, tp_rank, mp_group, dp_group) | {
                "step": info.step, "state": info.state, "rng_restored": info.rng_restored,
                "saved_layout": info.saved_layout, "lr": optimizer.param_groups[0]["lr"]}, f)

    metrics = open(os.path.join(out, f"metrics_rank{rank}.jsonl"), "a")
    for step in range(step + 1, args.steps + 1):
        micro = []
        for _ in range(2):
            batch = pool[position % len(pool)]
            position += 1
            shift = 0
            if args.rng_data:
                shift = random.randrange(7) + int(np.random.randint(7)) + int(torch.randint(7, (1,)))
            micro.append({k: (v + shift) % shape.vocab_size for k, v in batch.items()})
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        losses = forward_backward(forward_step_func=_forward_step, data_iterator=iter(micro), model=[ddp],
                                  num_microbatches=2, seq_length=shape.seq_length, micro_batch_size=2,
                                  forward_only=False)
        if step == args.hang_at:
            with open(os.path.join(out, "hanging"), "w") as f:
                f.write(str(os.getpid()))
            time.sleep(3600)  # the test SIGKILLs us here, mid-step
        _ok, grad_norm, _ = optimizer.step()
        scheduler.step(increment=1)
        # under PP only the last stage sees the loss; every rank has the (model-parallel reduced) grad norm
        loss = float(torch.stack([d["lm loss"] for d in losses]).mean()) if losses else None
        metrics.write(json.dumps({"step": step, "loss": loss, "grad_norm": float(grad_norm),
                                  "lr": optimizer.param_groups[0]["lr"]}) + "\n")
        metrics.flush()
        if step % args.save_interval == 0:
            save_checkpoint(save_dir=args.save_dir, step=step, model=ddp, optimizer=optimizer, scheduler=scheduler,
                            state={"sampler_position": position, "weight_version": step,
                                   "reward_stage": "beginner" if step < 4 else "advanced"},
                            keep_last=args.keep_last)
            with open(os.path.join(out, f"moments_saved_rank{rank}_step{step}.json"), "w") as f:
                json.dump(moment_fingerprint(optimizer, tp_rank, mp_group, dp_group), f)
    metrics.close()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"params": param_digest(model), "position": position,
                   "resumed_from": info.step if info else None}, f)
    state.destroy()


if __name__ == "__main__":  # dist_checkpointing's spawn worker re-imports this file
    main()
