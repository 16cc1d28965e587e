"""Resume exactness: a GRPO run killed with SIGKILL mid-run and restarted with --resume logs the same metrics as an
uninterrupted run (CPU, HFEngine rollout, checkpoint every 2 steps: model, Adam, LR schedule, RNG, data position,
reward stage, weight version), and the SIGKILL leaves none of the processes the trainer started running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO, TAG_VAR, tagged_processes, wait_until_gone
from training_data import tiny_hf_dir

pytestmark = pytest.mark.slow
STEPS = 6  # checkpoints at 2 and 4: a kill anywhere before the end leaves steps to resume
TIMING = ("time", "time/step_s", "time/train_s", "time/sync_s", "time/elapsed_s", "time/scatter_s", "rollout/time_s",
          "throughput/tokens_per_s")


def _cmd(hf_dir, data, run_dir, *extra):
    sets = [f"model.hf_path={hf_dir}", f"data.train_path={data}", "rollout.engine=hf", f"log.run_dir={run_dir}",
            "log.progress=false", "log.tensorboard=false", f"grpo.train_steps={STEPS}", "grpo.warmup_steps=0",
            "grpo.prompts_per_step=2", "grpo.num_generations=2", "rollout.max_new_tokens=8", "grpo.lr=1e-3",
            "grpo.beta=0.04", "checkpoint.save_interval=2"]
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
    tag = f"resume-{os.getpid()}-{time.monotonic_ns()}"
    proc = subprocess.Popen(_cmd(hf_dir, data, killed_dir), cwd=REPO, env=dict(_env(), **{TAG_VAR: tag}),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed_dir / "metrics.jsonl"
    deadline = time.time() + 900
    # Kill as soon as a checkpoint is published and two steps are logged. Steps take under a second here, so
    # where exactly the kill lands varies; any point before the end is a valid test.
    while time.time() < deadline and proc.poll() is None:
        if (killed_dir / "checkpoints" / "latest").exists() and metrics.exists() and \
                len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed; raise STEPS"
    started = {cmd for _, cmd in tagged_processes(tag)}
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # Nothing the trainer started outlives it: the reward worker, the checkpoint writer's queue manager, their
    # resource tracker (all spawned children; they used to live on under PID 1).
    left = wait_until_gone(tag)
    for pid, _ in left:
        os.kill(pid, signal.SIGKILL)
    assert left == [], f"started by the trainer: {started}; still running after it was killed: {left}"
    resumed_from = (killed_dir / "checkpoints" / "latest").read_text().strip()
    assert resumed_from in {f"iter_{k:07d}" for k in range(2, STEPS, 2)}, resumed_from
    assert len(read_metrics(killed_dir)) < STEPS
    resumed = subprocess.run(_cmd(hf_dir, data, killed_dir, "--resume"), cwd=REPO, env=_env(), capture_output=True,
                             text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _strip(read_metrics(killed_dir)) == _strip(read_metrics(tmp_path / "full"))
    # The file itself, not just read_metrics, holds each step once: steps the killed run logged after its last
    # checkpoint were moved to metrics.rewoundN.jsonl when the resumed run redid them.
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert logged == list(range(1, STEPS + 1)), logged
