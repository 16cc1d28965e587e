"""torchrun worker (2 ranks): one GRPO step of the Megatron policy under TP=1 (DP=2), TP=2 and PP=2 from the same
HF checkpoint and the same batch; each layout reports its metrics, grad norm, post-step logprobs and the exported
HF weights' difference to the TP=1 run. Writes OUT/rank{r}.json."""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from training_data import make_sample, run_config  # noqa: E402

LAYOUTS = {"tp1": (1, 1, False, False, False), "tp2": (2, 1, False, False, False), "pp2": (1, 2, False, False, False),
           "tp2_packed": (2, 1, True, False, False), "tp2_sp": (2, 1, False, True, False),
           "dp2_distopt": (1, 1, False, False, True)}
"""name: (TP, PP, shared-prompt packing, sequence parallelism, distributed optimizer). The rows have odd lengths,
so under sequence parallelism every micro-batch is padded to a multiple of TP (megatron splits the sequence over
the TP ranks). dp2_distopt shards the Adam state over the two data-parallel ranks."""


def make_batch(hf_dir):
    from transformers import AutoTokenizer

    from megatron_vr1.training.batch import build_train_batch, prepare_prompt
    from megatron_vr1.types import Completion, RolloutGroup

    tok = AutoTokenizer.from_pretrained(hf_dir)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    g = torch.Generator().manual_seed(0)
    groups, preps = [], []
    for i in range(2):
        prep = prepare_prompt(make_sample(i), tok, min_pixels=56 * 56, max_pixels=56 * 56)
        comps = []
        for j in range(2):
            ids = torch.randint(20, 1000, (5 + 3 * j + i,), generator=g).tolist() + [eos]
            lps = (-torch.rand(len(ids), generator=g) * 5).tolist()
            comps.append(Completion(sample_id=prep.sample.sample_id, request_id=f"{i}-{j}", text="", token_ids=tuple(ids),
                                    logprobs=tuple(lps), finish_reason="stop", weight_version=0))
        groups.append(RolloutGroup(sample=prep.sample, completions=tuple(comps)))
        preps.append(prep)
    return build_train_batch(groups, preps, torch.tensor([1.0, -1.0, 0.5, -0.5]), eos_ids=[eos])


def run_layout(hf_dir, tp, pp, packed, sp, distopt, aggregation, baseline):
    from megatron_vr1.parallel import state
    from megatron_vr1.training.policy import Policy, grpo_loss_fn

    cfg = run_config(Path(hf_dir), Path(hf_dir).parent / "run", lr=1e-3, beta=0.2, loss_aggregation=aggregation,
                     tis=True, lr_schedule="constant")
    cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel = tp, pp
    cfg.parallel.pack_groups, cfg.parallel.sequence_parallel = packed, sp
    cfg.parallel.distributed_optimizer = distopt
    state.initialize(cfg.parallel)
    policy = Policy(cfg)
    from megatron.core import parallel_state

    from megatron_vr1.training.sharding import shard_batch

    batch = make_batch(hf_dir)
    batch.ref_logprobs = policy.logprobs(batch, reference=True)
    # as the loop does: each data-parallel rank trains on its shard (whole groups, each image once)
    shard = shard_batch(batch, parallel_state.get_data_parallel_world_size())[parallel_state.get_data_parallel_rank()]
    step = policy.train_step(shard.batch, grpo_loss_fn(cfg), rows=shard.minibatches[0], totals=shard.totals[0])
    after = policy.logprobs(batch)
    weights = {name: t.clone() for bucket in policy.export_buckets(1 << 20) for name, t in bucket}
    out = dict(metrics=step.metrics, grad_norm=step.grad_norm, lr=step.lr, logprobs_after=after.tolist())
    if baseline is not None:
        out["weight_max_abs_diff"] = max((weights[k] - baseline[k]).abs().max().item() for k in baseline)
        out["same_names"] = sorted(weights) == sorted(baseline)
    return out, weights


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--hf-dir", required=True)
    ap.add_argument("--aggregation", default="sequence")
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    results, baseline = {}, None
    for name in args.layouts.split(","):
        tp, pp, packed, sp, distopt = LAYOUTS[name]
        results[name], weights = run_layout(args.hf_dir, tp, pp, packed, sp, distopt, args.aggregation, baseline)
        baseline = weights if baseline is None else baseline
    from megatron_vr1.parallel import state

    state.destroy()  # once: re-initialising after a destroy desynchronises the ranks' group creation
    Path(args.out, f"rank{os.environ['RANK']}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
