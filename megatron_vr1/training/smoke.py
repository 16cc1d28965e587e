"""A tiny megatron-core GPT train step: the smallest proof that the parallel stack is real.

Used by the foundation tests (TP=2 / PP=2 / SP vs TP=1 on gloo, dist-checkpoint resharding) and by
``make demo`` until the Vision-R1 loop replaces it. Everything is real megatron-core: GPTModel (local spec),
megatron DDP, get_megatron_optimizer, get_forward_backward_func (1F1B under PP), dist_checkpointing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

from megatron_vr1.config.parallel import ParallelConfig
from megatron_vr1.parallel import state


@dataclass(kw_only=True)
class TinyGPTShape:
    num_layers: int = 4
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 2
    ffn_hidden_size: int = 128
    vocab_size: int = 128
    seq_length: int = 32


@dataclass(kw_only=True)
class SmokeResult:
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    eval_loss: float | None = None
    is_last_stage: bool = False


def build_tiny_gpt(shape: TinyGPTShape, parallel: ParallelConfig):
    """A GPTModel with RMSNorm, SwiGLU, GQA and RoPE; CPU initialisation makes every layout hold the same
    full weights (each rank slices the master weight), so layouts are comparable bit for bit."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(
        num_layers=shape.num_layers, hidden_size=shape.hidden_size, num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups, ffn_hidden_size=shape.ffn_hidden_size,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, pipeline_dtype=torch.float32,
        tensor_model_parallel_size=parallel.tensor_parallel, pipeline_model_parallel_size=parallel.pipeline_parallel,
        sequence_parallel=parallel.sequence_parallel, params_dtype=torch.float32)
    return GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                    vocab_size=shape.vocab_size, max_sequence_length=shape.seq_length,
                    pre_process=parallel_state.is_pipeline_first_stage(),
                    post_process=parallel_state.is_pipeline_last_stage(),
                    share_embeddings_and_output_weights=False, position_embedding_type="rope")


def synthetic_batches(shape: TinyGPTShape, num_batches: int, micro_batch_size: int, seed: int) -> list[dict]:
    """Deterministic, learnable token batches (identical on every rank): arithmetic progressions modulo the
    vocabulary with a random start and a stride from {1, 2, 3}, so a few steps visibly lower the loss."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.arange(shape.seq_length + 1)
    out = []
    for _ in range(num_batches):
        start = torch.randint(0, shape.vocab_size, (micro_batch_size, 1), generator=g)
        stride = torch.randint(1, 4, (micro_batch_size, 1), generator=g)
        tokens = (start + stride * steps) % shape.vocab_size
        out.append({"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()})
    return out


def _causal_mask(seq: int) -> torch.Tensor:
    # megatron's default mask helper hard-codes CUDA; pass an explicit one (True = masked).
    return torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1)


def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    loss = (output.float() * loss_mask).sum() / loss_mask.sum()
    return loss, {"lm loss": loss.detach().clone()}


def _forward_step(data_iterator, model):
    from megatron_vr1.parallel.state import device

    batch = {k: v.to(device()) for k, v in next(data_iterator).items()}  # host batches -> the run device
    tokens, labels = batch["tokens"], batch["labels"]
    seq = tokens.shape[1]
    position_ids = torch.arange(seq, device=tokens.device).unsqueeze(0).expand_as(tokens)
    output = model(tokens, position_ids, _causal_mask(seq).to(tokens.device), labels=labels)
    return output, partial(_loss_func, torch.ones_like(labels, dtype=torch.float32))


def run_smoke(parallel: ParallelConfig, *, steps: int = 2, num_microbatches: int = 2, micro_batch_size: int = 2,
              shape: TinyGPTShape | None = None, lr: float = 1e-3, load_dir: str | None = None,
              save_dir: str | None = None, save_init_dir: str | None = None, seed: int = 0) -> SmokeResult:
    """Train ``steps`` optimizer steps, then one forward-only eval. Optionally load a dist checkpoint first,
    save the initial weights (``save_init_dir``: lets another layout start from the same weights, since PP
    stages draw their initialisation from different RNG positions) and save the final ones.
    Requires ``parallel.state.initialize(parallel)`` to have run."""
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    shape = shape or TinyGPTShape()
    torch.manual_seed(seed)
    model = build_tiny_gpt(shape, parallel)
    if load_dir:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), load_dir))
    if save_init_dir:
        os.makedirs(save_init_dir, exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), save_init_dir)
    ddp = DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                  module=model)
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=lr, clip_grad=1.0), [ddp])
    forward_backward = get_forward_backward_func()
    result = SmokeResult(is_last_stage=parallel_state.is_pipeline_last_stage())
    batches = synthetic_batches(shape, steps * num_microbatches, micro_batch_size, seed + 1)
    eval_batches = synthetic_batches(shape, num_microbatches, micro_batch_size, seed + 2)  # same for any `steps`
    common = dict(forward_step_func=_forward_step, model=[ddp], num_microbatches=num_microbatches,
                  seq_length=shape.seq_length, micro_batch_size=micro_batch_size)
    for step in range(steps):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        chunk = iter(batches[step * num_microbatches:(step + 1) * num_microbatches])
        losses = forward_backward(data_iterator=chunk, forward_only=False, **common)
        _ok, grad_norm, _zeros = optimizer.step()
        if losses:
            result.losses.append(float(torch.stack([d["lm loss"] for d in losses]).mean()))
        result.grad_norms.append(float(grad_norm))
    eval_losses = forward_backward(data_iterator=iter(eval_batches), forward_only=True, **common)
    if eval_losses:
        result.eval_loss = float(torch.stack([d["lm loss"] for d in eval_losses]).mean())
    if save_dir:
        os.makedirs(save_dir, exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), save_dir)
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m megatron_vr1.training.smoke [--tp N --pp M --steps K --out FILE]``: one tiny Megatron train
    run on this host or across hosts (under torchrun / srun), CPU (gloo) or GPU (nccl)."""
    import argparse
    import json
    import time

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default="", help="write this rank's result as JSON here ({rank} is substituted)")
    args = ap.parse_args(argv)
    cfg = ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp)
    t0 = time.time()
    env = state.initialize(cfg)
    res = run_smoke(cfg, steps=args.steps)
    if res.is_last_stage and env.rank == env.world_size - 1:
        print(f"megatron-core GPT smoke run (TP={args.tp} PP={args.pp}, world {env.world_size}, {state.device()}): "
              f"losses {[round(x, 4) for x in res.losses]}, grad norms {[round(x, 4) for x in res.grad_norms]}, "
              f"eval loss {res.eval_loss:.4f}, {time.time() - t0:.1f} s", flush=True)
    if args.out:
        import socket

        with open(args.out.format(rank=env.rank), "w") as f:
            json.dump({"rank": env.rank, "host": socket.gethostname(), "losses": res.losses,
                       "grad_norms": res.grad_norms, "eval_loss": res.eval_loss, "is_last_stage": res.is_last_stage}, f)
    state.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
