"""Bit-exact resume on CPU: a run SIGKILLed in the middle of step k+1 and resumed from `latest` reproduces the
uninterrupted run's per-step losses, grad norms, learning rates and final weights exactly, with dropout and
data drawn from the python / numpy / torch RNGs. The Adam moments after load equal those at save (NeMo-RL
#3171: a resume that silently resets them would still "work"), and a resume without them diverges.
Two setups: a world of one, and two data-parallel ranks under torchrun with megatron's distributed optimizer
(the Adam state sharded over the ranks; the whole torchrun process group is killed)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO
from megatron_vr1.parallel.env import free_port

WORKER = Path(__file__).with_name("ckpt_worker.py")
STEPS, SAVE_AT = 6, 3
COMMON = ["--steps", str(STEPS), "--save-interval", str(SAVE_AT), "--dropout", "0.1", "--rng-data"]

pytestmark = pytest.mark.slow


SETUPS = {"world_of_one": (1, []), "dp2_distributed_optimizer": (2, ["--dist-opt"])}
"""name: (ranks, worker flags)."""


def _start(out: Path, *extra: str, ranks: int = 1, started: list | None = None) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):  # a world of one, not torchrun's
        env.pop(var, None)
    log = open(out / "log.txt", "w")
    launch = [sys.executable]
    if ranks > 1:
        launch += ["-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
                   f"--master_port={free_port()}"]
    # Own session: after the SIGKILL we also reap anything the worker spawned (dist_checkpointing's writer,
    # torchrun's ranks).
    proc = subprocess.Popen([*launch, str(WORKER), "--out", str(out), *COMMON, *extra], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    if started is not None:
        started.append(proc)
    return proc


def _finish(proc: subprocess.Popen, out: Path, timeout: float = 400) -> None:
    rc = proc.wait(timeout=timeout)
    assert rc == 0, (out / "log.txt").read_text()[-5000:]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics_rank0.jsonl").read_text().splitlines()]


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module", params=sorted(SETUPS))
def runs(tmp_path_factory, request):
    started: list[subprocess.Popen] = []
    ranks, flags = SETUPS[request.param]
    try:
        yield _run_all(tmp_path_factory.mktemp("resume"), started, ranks, flags)
    finally:
        for proc in started:  # a failed assertion must not leave our workers running
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _run_all(root: Path, started: list, ranks: int, flags: list[str]) -> dict:
    full_out, cut_out, nomom_out = root / "full", root / "cut", root / "nomom"
    save = root / "ckpt"
    full = _start(full_out, "--save-dir", str(root / "ckpt_full"), *flags, ranks=ranks, started=started)
    cut = _start(cut_out, "--save-dir", str(save), "--hang-at", str(SAVE_AT + 1), *flags, ranks=ranks,
                 started=started)
    deadline = time.time() + 400
    while not (cut_out / "hanging").exists():
        assert cut.poll() is None, (cut_out / "log.txt").read_text()[-5000:]
        assert time.time() < deadline, "the worker never reached the kill point"
        time.sleep(0.5)
    if ranks > 1:
        time.sleep(2)  # every rank is in the hang (they meet in the gradient collectives before it)
    os.kill(cut.pid, signal.SIGKILL)  # mid-step: forward/backward done, optimizer step not taken
    assert cut.wait(timeout=60) == -signal.SIGKILL
    try:
        os.killpg(cut.pid, signal.SIGKILL)  # the session we created for it: leftover children, if any
    except ProcessLookupError:
        pass
    latest_after_kill = (save / "latest").read_text().strip()
    killed_metrics = _metrics(cut_out)
    # control, in parallel: the same resume without the optimizer state, from a copy of the checkpoint
    shutil.copytree(save, root / "ckpt_nomom")
    nomom = _start(nomom_out, "--save-dir", str(root / "ckpt_nomom"), "--resume", "--no-load-optim", *flags,
                   ranks=ranks, started=started)
    resumed = _start(cut_out, "--save-dir", str(save), "--resume", *flags, ranks=ranks, started=started)
    _finish(resumed, cut_out)
    _finish(full, full_out)
    _finish(nomom, nomom_out)
    return {"full": full_out, "cut": cut_out, "nomom": nomom_out, "latest_after_kill": latest_after_kill,
            "killed_metrics": killed_metrics}


def test_killed_run_left_a_complete_checkpoint(runs):
    assert runs["latest_after_kill"] == f"iter_{SAVE_AT:07d}"
    assert [m["step"] for m in runs["killed_metrics"]] == list(range(1, SAVE_AT + 1))  # step k+1 never finished


def test_resume_is_bit_exact(runs):
    full, cut = _metrics(runs["full"]), _metrics(runs["cut"])
    assert [m["step"] for m in cut] == list(range(1, STEPS + 1))
    for a, b in zip(full, cut):  # exact float equality: losses, grad norms, learning rates
        assert a == b, (a, b)
    loaded = _json(runs["cut"] / "moments_loaded_rank0.json")
    assert loaded["rng_restored"] and loaded["step"] == SAVE_AT
    assert loaded["state"] == {"sampler_position": 2 * SAVE_AT, "weight_version": SAVE_AT, "reward_stage": "beginner"}
    assert _json(runs["cut"] / "rank0.json")["params"] == _json(runs["full"] / "rank0.json")["params"]


def test_adam_moments_are_restored_not_reset(runs):
    saved = _json(runs["cut"] / f"moments_saved_rank0_step{SAVE_AT}.json")
    loaded = _json(runs["cut"] / "moments_loaded_rank0.json")
    assert saved["exp_avg_sq_norm"] > 0 and saved["steps"] == [float(SAVE_AT)]
    assert loaded["sha256"] == saved["sha256"]  # every exp_avg / exp_avg_sq byte
    assert loaded["steps"] == saved["steps"]
    # and they matter: resuming with fresh moments gives the same first loss (same weights), then diverges
    full, nomom = _metrics(runs["full"]), _metrics(runs["nomom"])
    assert nomom[0]["step"] == SAVE_AT + 1 and nomom[0]["loss"] == full[SAVE_AT]["loss"]
    assert nomom[1]["loss"] != full[SAVE_AT + 1]["loss"]
    assert _json(runs["nomom"] / "moments_loaded_rank0.json")["exp_avg_sq_norm"] == 0.0
