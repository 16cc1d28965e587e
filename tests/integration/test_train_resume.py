"""Resume exactness: a GRPO run killed with SIGKILL mid-run and restarted with --resume logs the same metrics as an
uninterrupted run (CPU, HFEngine rollout, checkpoint every 2 steps: model, Adam, LR schedule, RNG, data position,
reward stage, weight version)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO
from training_data import tiny_hf_dir

pytestmark = pytest.mark.slow
TIMING = ("time", "time/step_s", "time/train_s", "time/sync_s", "rollout/time_s", "throughput/tokens_per_s")


def _cmd(hf_dir, data, run_dir, *extra):
    sets = [f"model.hf_path={hf_dir}", f"data.train_path={data}", "rollout.engine=hf", f"log.run_dir={run_dir}",
            "log.progress=false", "log.tensorboard=false", "grpo.train_steps=4", "grpo.prompts_per_step=2",
            "grpo.num_generations=2", "rollout.max_new_tokens=8", "grpo.lr=1e-3", "grpo.beta=0.04",
            "checkpoint.save_interval=2"]
    return [sys.executable, "-m", "megatron_vr1.cli", "train", "--recipe", "tiny_cpu_demo",
            *[a for s in sets for a in ("--set", s)], *extra]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="2", CUDA_VISIBLE_DEVICES="")


def _strip(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    from megatron_vr1.data.synth import build_synth
    from megatron_vr1.training.metrics import read_metrics

    hf_dir = tiny_hf_dir(tmp_path)
    data = build_synth(tmp_path / "data", n=12, seed=0, difficulty="demo", n_val=2)["train"]
    full = subprocess.run(_cmd(hf_dir, data, tmp_path / "full"), cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=900)
    assert full.returncode == 0, full.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(hf_dir, data, killed_dir), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = killed_dir / "metrics.jsonl"
    deadline = time.time() + 900
    # Kill during step 3: step 2 is logged and its checkpoint published.
    while time.time() < deadline and proc.poll() is None:
        if (killed_dir / "checkpoints" / "latest").exists() and metrics.exists() and \
                len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed; raise grpo.train_steps"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(read_metrics(killed_dir)) < 4
    resumed = subprocess.run(_cmd(hf_dir, data, killed_dir, "--resume"), cwd=REPO, env=_env(), capture_output=True,
                             text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _strip(read_metrics(killed_dir)) == _strip(read_metrics(tmp_path / "full"))
