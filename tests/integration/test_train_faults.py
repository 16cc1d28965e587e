"""A GRPO run meets what a cluster does to it, end to end: `megatron-vr1 train` under torchrun (TP=2 on gloo)
with the real SGLang CPU server as its rollout engine.

1. The rollout server is SIGKILLed while the Megatron update runs (right after the step's rollouts are logged; the
   next call to the server is then the weight sync's pause), and again at a random moment of step 3 or 4.
   Each time it is restarted and brought to the current weights, and the step goes on.
2. Then the whole job is SIGKILLed (torchrun and both ranks at once: a node failure, the OOM killer, scancel after
   its grace period). Nothing it started may survive it: reward worker, checkpoint writer's queue manager, the
   SGLang server and its scheduler, resource trackers.
3. A --resume finishes the run. Across all of it, every sample is trained exactly once (the sampler's order, no
   group lost or repeated), every completion once, sampled by the weights of its step; the train/rollout logprob
   gap stays at float noise (the restarted servers hold exactly the trainer's weights); metrics and rollouts hold
   each step once.

This replaces the plain "train with SGLang" test: every assertion of that one is made here too.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, TAG_VAR, tagged_processes as tagged, wait_until_gone
from megatron_vr1.parallel.env import free_port
from training_data import layout_hf_dir

pytestmark = [pytest.mark.slow, pytest.mark.integration,
              pytest.mark.skipif(not (REPO / ".venv-sglang" / "bin" / "python").exists()
                                 and not os.environ.get("MEGATRON_VR1_SGLANG_PYTHON"),
                                 reason="SGLang is not installed: run `make sglang-venv` (make test does)")]

STEPS, PROMPTS, G = 8, 2, 2  # a step takes about a second here: enough of them that the kills land mid-run


def kill_rollout_server(tag: str) -> int:
    """SIGKILL the SGLang server's whole process group (its launcher leads its own session)."""
    leaders = [pid for pid, cmd in tagged(tag) if "sglang" in cmd and os.getpgid(pid) == pid]
    assert len(leaders) == 1, f"expected one rollout server, found {tagged(tag)}"
    os.killpg(leaders[0], signal.SIGKILL)
    return leaders[0]


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def wait_for(predicate, proc, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run exited with {proc.returncode} while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_run_survives_server_kills_and_a_killed_job(tmp_path):
    from megatron_vr1.config import load_recipe
    from megatron_vr1.data.dataset import LocalizationDataset
    from megatron_vr1.data.synth import build_synth

    hf_dir = layout_hf_dir(tmp_path)
    data = build_synth(tmp_path / "data", n=16, seed=0, difficulty="demo", n_val=2)["train"]
    run_dir = tmp_path / "run"
    sets = [f"model.hf_path={hf_dir}", f"data.train_path={data}", "data.min_pixels=3136", "data.max_pixels=3136",
            "rollout.engine=sglang", "rollout.sync_transport=tensor", f"grpo.train_steps={STEPS}",
            "grpo.warmup_steps=0", f"grpo.num_generations={G}", f"grpo.prompts_per_step={PROMPTS}",
            "grpo.beta=0.04", "rollout.max_new_tokens=8", f"log.run_dir={run_dir}", "log.progress=false",
            "log.tensorboard=false", "log.rollouts=true", "checkpoint.save_interval=1",
            "parallel.tensor_parallel=2", "parallel.backend=gloo"]
    tag = f"faults-{os.getpid()}-{time.monotonic_ns()}"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO), **{TAG_VAR: tag})

    def launch(*extra: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", "-m", "megatron_vr1.cli", "train", "--recipe", "tiny_cpu_demo",
               *[a for s in sets for a in ("--set", s)], *extra]
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(tmp_path / "job.log", "a"),
                                stderr=subprocess.STDOUT, start_new_session=True)

    metrics, rollouts = run_dir / "metrics.jsonl", run_dir / "rollouts.jsonl"
    steps_logged = lambda path: {r["step"] for r in lines(path)}  # noqa: E731

    def launches() -> int:  # the server's starts: each is logged to RUN_DIR/sglang/sglang-PORT.log
        return sum(p.read_text(errors="replace").count("=== launch") for p in (run_dir / "sglang").glob("*.log"))
    proc = launch()
    try:
        # 1a. During the Megatron update of step 1: its rollouts are logged, its metrics not yet.
        wait_for(lambda: 1 in steps_logged(rollouts), proc, "step 1's rollouts")
        killed = [kill_rollout_server(tag)]
        # 1b. At a random moment of step 3 or 4 (generation, reward, update or sync).
        wait_for(lambda: 2 in steps_logged(metrics), proc, "step 2's metrics")
        time.sleep(random.Random(os.getpid()).uniform(0.0, 1.5))
        killed.append(kill_rollout_server(tag))
        # 2. The whole job, once the server is back and one more step is checkpointed.
        wait_for(lambda: launches() >= 3, proc, "the second restart of the server")
        after = max(steps_logged(metrics))
        latest = run_dir / "checkpoints" / "latest"
        wait_for(lambda: latest.exists() and int(latest.read_text().strip()[5:]) > after, proc, "a checkpoint")
        job = [pid for pid, cmd in tagged(tag) if "megatron_vr1.cli train" in cmd or "torch.distributed.run" in cmd]
        for pid in job:
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=60)
        left = wait_until_gone(tag)
        assert left == [], f"processes of the killed job are still running: {left}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid, _ in tagged(tag):
            os.kill(pid, signal.SIGKILL)
    log = (tmp_path / "job.log").read_text(errors="replace")
    assert log.count("restarting") >= 1, log[-4000:]  # the sync found the server dead and restarted it

    # 3. Resume to the end.
    proc = launch("--resume")
    assert proc.wait(timeout=900) == 0, (tmp_path / "job.log").read_text(errors="replace")[-6000:]
    assert wait_until_gone(tag) == []

    records = lines(metrics)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # one record per step
    assert [r["weight_version"] for r in records] == list(range(1, STEPS + 1))  # one verified sync per step
    for r in records:
        assert r["train/logprob_gap_abs_mean"] < 1e-4, r  # every server sampled with the trainer's weights
        assert r["rollout/weight_version_lag"] == 0.0
    groups = lines(rollouts)
    assert [g["step"] for g in groups] == [s for s in range(1, STEPS + 1) for _ in range(PROMPTS)]
    for g in groups:
        ids = [c["id"] for c in g["completions"]]
        assert len(ids) == G and len(set(ids)) == G, g
        assert {c["weight_version"] for c in g["completions"]} == {g["step"] - 1}, g
    # The samples, in the order an uninterrupted run draws them.
    cfg = load_recipe("tiny_cpu_demo", [f"data.train_path={data}", "data.min_pixels=3136", "data.max_pixels=3136"])
    stream = iter(LocalizationDataset.from_config(cfg.data, data))
    assert [g["sample_id"] for g in groups] == [next(stream).sample_id for _ in range(STEPS * PROMPTS)]
    assert launches() == 4  # the first start, two restarts, the resumed run's start
