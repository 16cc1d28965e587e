"""`megatron-vr1 train` with the real SGLang CPU server as the rollout engine: the policy's weights reach the
server through the exporter and the configured transport after every step (weight_version checked on the
server), and the server samples with exactly the policy's weights (train/rollout logprob gap is float noise)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import REPO
from training_data import tiny_hf_dir

pytestmark = [pytest.mark.slow, pytest.mark.integration,
              pytest.mark.skipif(not (REPO / ".venv-sglang" / "bin" / "python").exists()
                                 and not os.environ.get("MEGATRON_VR1_SGLANG_PYTHON"),
                                 reason="SGLang is not installed: run `make sglang-venv` (make test does)")]


def test_grpo_steps_with_sglang_rollout(tmp_path):
    from megatron_vr1.data.synth import build_synth
    from megatron_vr1.training.metrics import read_metrics

    hf_dir = tiny_hf_dir(tmp_path)
    paths = build_synth(tmp_path / "data", n=8, seed=0, difficulty="demo", n_val=2)
    run_dir = tmp_path / "grpo"
    sets = [f"model.hf_path={hf_dir}", f"data.train_path={paths['train']}", "rollout.engine=sglang",
            "rollout.sync_transport=tensor", "grpo.train_steps=2", "grpo.warmup_steps=0", "grpo.num_generations=2",
            "grpo.prompts_per_step=2", "grpo.beta=0.04", "rollout.max_new_tokens=8", f"log.run_dir={run_dir}",
            "log.progress=false", "checkpoint.save_interval=2"]
    # The recipe samples at T=0.7 and scores tokens at that temperature (grpo.logprob_temperature=rollout), the
    # distribution SGLang reports logprobs of: the engines' parity below holds at the recipe's own temperature.
    env = dict(os.environ, OMP_NUM_THREADS="2", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "megatron_vr1.cli", "train", "--recipe", "tiny_cpu_demo",
                           *[a for s in sets for a in ("--set", s)]], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-6000:]
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2]
    assert [r["weight_version"] for r in records] == [1, 2]  # one verified sync per step
    # Step 1 samples from the server's initial weights = the policy's; step 2 from the synced step-1 weights.
    for r in records:
        assert r["train/logprob_gap_abs_mean"] < 1e-4, r
        assert r["rollout/weight_version_lag"] == 0.0
    assert (run_dir / "sglang").is_dir() and list((run_dir / "sglang").glob("sglang-*.log"))
