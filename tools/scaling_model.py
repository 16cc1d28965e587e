#!/usr/bin/env python3
"""Predict the Vision-R1 GRPO step time of Qwen2.5-VL-7B on 1-64 H100 nodes (docs/scaling.md explains every term).

    python tools/scaling_model.py                 # the tables of docs/scaling.md
    python tools/scaling_model.py --tokens-per-seq 1500 --prompts-per-node 16

Inputs marked MEASURED come from the GPU probe recorded in docs/gpu.md (one H100, megatron-core GPT with the
Transformer Engine spec, bf16, 2026-11-22); everything else is a stated assumption. The output is a prediction,
not a measurement: no multi-GPU run of megatron-vr1 has been made yet. Only layouts the trainer accepts for the
model are considered (megatron_vr1.config.parallel.check_layout: TP divides the 4 key/value heads, PP splits the
28 layers).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's package, without installing it

from megatron_vr1.config.base import ConfigError  # noqa: E402  (stdlib-only modules)
from megatron_vr1.config.parallel import ParallelConfig, check_layout  # noqa: E402

# --- model: Qwen2.5-VL-7B-Instruct (config.json) ---
LM_PARAMS = 7.61e9
VIT_PARAMS = 0.67e9
HIDDEN, LAYERS, HEADS, KV_HEADS = 3584, 28, 28, 4
# --- MEASURED (gpu-device.md): TE-spec GPT at 7B width, bf16, one H100: 430 TFLOP/s (6*N*T + attention) ---
TRAIN_TFLOPS_1GPU = 430.0
# --- assumptions (H100 SXM nodes) ---
NVLINK_BUS_GBPS = 360.0      # achieved all-reduce bus bandwidth inside a node (NCCL, 8 GPUs)
IB_BUS_GBPS_PER_GPU = 45.0   # 8 x 400 Gb/s NDR per node, ~90% achieved, per GPU
DECODE_MS_PER_TOKEN = 28.0   # SGLang, 7B bf16, batch <= 64 per TP=1 engine (decode is memory-bound)
PREFILL_TOKENS_PER_S = 40e3  # SGLang prefill per H100 engine incl. the ViT


@dataclass(frozen=True)
class Layout:
    nodes: int
    tp: int
    pp: int
    gpus_per_node: int = 8

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)

    def valid(self) -> bool:
        """Whether the trainer accepts this layout for Qwen2.5-VL-7B (the repository's one layout check)."""
        try:
            check_layout(ParallelConfig(tensor_parallel=self.tp, pipeline_parallel=self.pp), num_heads=HEADS,
                         num_kv_heads=KV_HEADS, num_layers=LAYERS, world_size=self.gpus)
        except ConfigError:
            return False
        return True


def step_time(layout: Layout, *, prompts: int, group: int, tokens_per_seq: int, completion_tokens: int,
              microbatch_tokens: int = 8192, rollout_share: float = 0.5) -> dict[str, float]:
    """Seconds per GRPO step, by phase. Colocated: rollout and training share the GPUs in turn."""
    seqs = prompts * group
    tokens = seqs * tokens_per_seq
    # compute: policy fwd+bwd (6NT) + reference fwd for the KL (2NT); ViT on ~1/2 of prompt tokens
    flops = 8 * LM_PARAMS * tokens + 8 * VIT_PARAMS * tokens * 0.5
    t_compute = flops / (TRAIN_TFLOPS_1GPU * 1e12 * layout.gpus)
    # pipeline bubble with 1F1B: (p-1)/(m+p-1), m = micro-batches per DP rank
    m = max(1, math.ceil(tokens / layout.dp / microbatch_tokens))
    bubble = (layout.pp - 1) / (m + layout.pp - 1)
    t_compute /= (1 - bubble)
    # TP: 4 all-reduces (2 fwd + 2 bwd) of [tokens, hidden] bf16 per layer on each TP group, ring 2(t-1)/t
    tok_per_group = tokens / layout.dp
    tp_bytes = 4 * LAYERS / layout.pp * tok_per_group * HIDDEN * 2 * 2 * (layout.tp - 1) / layout.tp * 1.5  # +ref fwd
    t_tp = tp_bytes / (NVLINK_BUS_GBPS * 1e9) if layout.tp > 1 else 0.0
    # DP: reduce-scatter + all-gather of fp32 grads / bf16 params (distributed optimizer), over IB when nodes > 1
    shard = (LM_PARAMS + VIT_PARAMS) / (layout.tp * layout.pp)
    dp_bytes = shard * (4 + 2) * (layout.dp - 1) / layout.dp
    dp_bw = (IB_BUS_GBPS_PER_GPU if layout.nodes > 1 else NVLINK_BUS_GBPS) * 1e9
    t_dp = dp_bytes / dp_bw if layout.dp > 1 else 0.0
    # rollout: engines of TP=1 on every GPU (colocated); decode steps dominate
    seqs_per_engine = math.ceil(seqs / layout.gpus)
    t_rollout = completion_tokens * DECODE_MS_PER_TOKEN / 1e3 * (1 + 0.15 * math.log2(max(seqs_per_engine, 1)))
    t_rollout += seqs_per_engine * (tokens_per_seq - completion_tokens) / PREFILL_TOKENS_PER_S
    # weight sync: bf16 weights once per engine node; CUDA IPC inside a node (~12 GB/s effective incl. loading)
    t_sync = (LM_PARAMS + VIT_PARAMS) * 2 / 12e9
    total = t_compute + t_tp + t_dp + t_rollout + t_sync
    return {"compute": t_compute, "tp_comm": t_tp, "dp_comm": t_dp, "rollout": t_rollout, "sync": t_sync,
            "step": total, "tokens_per_s_per_gpu": tokens / total / layout.gpus}


def fits(layout: Layout, budget_gb: float = 60.0) -> bool:
    """Trainer memory per GPU with megatron's distributed optimizer: bf16 weights + fp32 grads sharded by TP x PP;
    fp32 master weights and Adam moments (12 bytes/param) sharded by TP x PP x DP. Activations and the rollout
    engine's KV cache share the rest (colocated engines release it during training)."""
    params = LM_PARAMS + VIT_PARAMS
    per_gpu = params * 6 / (layout.tp * layout.pp) + params * 12 / (layout.tp * layout.pp * layout.dp)
    return per_gpu < budget_gb * 1e9


def best_layout(nodes: int, **kw) -> tuple[Layout, dict[str, float]]:
    candidates = [lay for tp in (1, 2, 4, 8) for pp in (1, 2, 4) if (lay := Layout(nodes, tp, pp)).valid()]
    scored = [(lay, step_time(lay, **kw)) for lay in candidates if fits(lay)]
    return min(scored, key=lambda x: x[1]["step"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens-per-seq", type=int, default=1000, help="prompt (incl. image) + completion tokens")
    ap.add_argument("--completion-tokens", type=int, default=200)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--prompts-per-node", type=int, default=16, help="weak scaling: prompts per step per node")
    args = ap.parse_args()
    common = dict(group=args.group, tokens_per_seq=args.tokens_per_seq, completion_tokens=args.completion_tokens)
    for title, per_node in (("strong scaling: 128 prompts per step in total", False),
                            (f"weak scaling: {args.prompts_per_node} prompts per step per node", True)):
        print(f"\n{title}\n| nodes | GPUs | layout (TP x PP x DP) | compute s | TP comm s | DP comm s | rollout s | "
              f"sync s | step s | tokens/s/GPU | efficiency |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        base = None
        for nodes in (1, 2, 4, 8, 16, 32, 64):
            prompts = args.prompts_per_node * nodes if per_node else 128
            lay, t = best_layout(nodes, prompts=prompts, **common)
            base = base or t
            eff = (t["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"])
            print(f"| {nodes} | {lay.gpus} | {lay.tp} x {lay.pp} x {lay.dp} | {t['compute']:.2f} | {t['tp_comm']:.2f} | "
                  f"{t['dp_comm']:.2f} | {t['rollout']:.2f} | {t['sync']:.2f} | {t['step']:.2f} | "
                  f"{t['tokens_per_s_per_gpu']:.0f} | {eff:.0%} |")


if __name__ == "__main__":
    main()
