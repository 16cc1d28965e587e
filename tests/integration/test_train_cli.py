"""`megatron-vr1 train` in SFT mode and `megatron-vr1 plot` as real subprocesses on tiny synthetic data; the SFT
loss goes down; a user error (missing data file) prints one line, no traceback, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import REPO
from training_data import tiny_hf_dir

pytestmark = pytest.mark.slow


def _cli(*args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="2", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-m", "megatron_vr1.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_sft_train_then_plot(tmp_path):
    from megatron_vr1.data.synth import build_synth

    hf_dir = tiny_hf_dir(tmp_path)
    paths = build_synth(tmp_path / "data", n=16, seed=0, difficulty="demo", n_val=2)
    run_dir = tmp_path / "sft"
    # A 12-step linear schedule stopped at step 6 (grpo.stop_at_step: how the demo's warm start is taken).
    sets = [f"model.hf_path={hf_dir}", f"data.train_path={paths['train']}", "grpo.mode=sft", "grpo.train_steps=12",
            "grpo.stop_at_step=6", "grpo.lr_schedule=linear", "grpo.warmup_steps=0", "grpo.prompts_per_step=4",
            "grpo.lr=3e-3", "rollout.engine=hf", f"log.run_dir={run_dir}", "log.progress=false",
            "checkpoint.save_interval=4"]
    proc = _cli("train", "--recipe", "tiny_cpu_demo", *[a for s in sets for a in ("--set", s)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    from megatron_vr1.training.metrics import read_metrics

    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 7))
    nll = [r["train/nll"] for r in records]
    assert nll[-1] < nll[0], nll
    assert (run_dir / "checkpoints" / "latest").exists()
    assert records[-1]["train/lr"] == pytest.approx(3e-3 * (1 - 6 / 12), rel=0.05)  # the 12-step schedule's LR
    from megatron_vr1.checkpoint.layout import resolve

    assert resolve(run_dir / "checkpoints").name.endswith("6")  # the stop step is checkpointed
    again = _cli("train", "--recipe", "tiny_cpu_demo", "--resume", *[a for s in sets for a in ("--set", s)])
    assert again.returncode == 0, again.stderr[-4000:]
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 7))  # resuming at the stop step trains none

    # GRPO warm-started from the SFT checkpoint: the engine (loaded from the random HF dir) is synced to the
    # SFT weights before the first rollout, so the train/rollout logprob gap is float noise.
    grpo_dir = tmp_path / "grpo"
    sets = [s for s in sets if not s.startswith(("grpo.mode", "grpo.train_steps", "grpo.stop_at_step", "log.run_dir",
                                                 "grpo.lr"))]
    sets += ["grpo.train_steps=1", "grpo.num_generations=2", "grpo.prompts_per_step=2", "grpo.beta=0.04",
             "rollout.max_new_tokens=8", f"log.run_dir={grpo_dir}", f"checkpoint.init_from={run_dir / 'checkpoints'}"]
    proc = _cli("train", "--recipe", "tiny_cpu_demo", *[a for s in sets for a in ("--set", s)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    (rec,) = read_metrics(grpo_dir)
    assert rec["weight_version"] == 2 and rec["train/logprob_gap_abs_mean"] < 1e-4
    assert rec["train/kl_mean"] == pytest.approx(0.0, abs=1e-6)  # the reference is the SFT model too

    plot = _cli("plot", str(run_dir))
    assert plot.returncode == 0, plot.stderr
    pngs = sorted(p.name for p in (run_dir / "plots").glob("*.png"))
    assert "loss.png" in pngs and all((run_dir / "plots" / p).stat().st_size > 1000 for p in pngs)


def test_train_user_error_is_one_line(tmp_path):
    hf_dir = tiny_hf_dir(tmp_path)
    proc = _cli("train", "--recipe", "tiny_cpu_demo", "--set", f"model.hf_path={hf_dir}", "--set",
                f"data.train_path={tmp_path / 'missing.jsonl'}", "--set", "rollout.engine=hf", timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "missing.jsonl" in proc.stderr
