"""One GRPO step (PPO clip, k3 KL to the reference, TIS) of the Megatron policy on 2 gloo ranks: TP=2, PP=2,
TP=2 with sequence parallelism (odd-length rows, padded to a multiple of TP) and DP=2 with the distributed optimizer
(Adam state sharded over the ranks) equal TP=1 (DP=2) in loss metrics,
grad norm, post-step logprobs and the exported weights; so does TP=2 with shared-prompt packing (its
micro-batches hold other rows, so its per-micro-batch metric means are not compared)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import torchrun
from training_data import tiny_hf_dir

WORKER = Path(__file__).with_name("grpo_step_worker.py")


@pytest.mark.slow
@pytest.mark.parametrize("aggregation", ["sequence", "token"])
def test_grpo_step_tp2_and_pp2_equal_tp1(tmp_path, aggregation):
    hf_dir = tiny_hf_dir(tmp_path)
    ranks = torchrun(WORKER, 2, ["--hf-dir", str(hf_dir), "--aggregation", aggregation], tmp_path / "out",
                     timeout=540)
    base = ranks[0]["tp1"]
    assert base["grad_norm"] > 0 and base["metrics"]["num_tokens"] > 0
    for r in ranks:
        for name in ("tp2", "pp2", "tp2_packed", "tp2_sp", "dp2_distopt"):
            got = r[name]
            assert got["same_names"]
            assert got["grad_norm"] == pytest.approx(base["grad_norm"], rel=1e-5), name
            for key in ("pg_loss", "kl_mean", "tis_weight_mean", "logprob_gap_mean", "entropy_mean"):
                if name != "tp2_packed":
                    assert got["metrics"][key] == pytest.approx(base["metrics"][key], rel=1e-4, abs=1e-6), (name, key)
            after, ref = got["logprobs_after"], base["logprobs_after"]
            assert max(abs(a - b) for ra, rb in zip(after, ref) for a, b in zip(ra, rb)) < 1e-4, name
            assert got["weight_max_abs_diff"] < 1e-5, name
