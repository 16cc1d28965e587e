"""A checkpoint save that runs out of room fails with one clear, recoverable CheckpointError, made the way it
happens: a real, small tmpfs that the second checkpoint does not fit, and a file-size limit (RLIMIT_FSIZE, in a
child process so pytest's own files are not limited). The error names the directory and the sizes, the partial
``.tmp-iter_`` directory is gone, ``latest`` still names the earlier checkpoint and it loads, and once there is
room again a save succeeds. A resume removes partial directories that an earlier save left behind (they would
keep the space taken, and a requeued job would fail the same way again). The trainer CLI reports such a failure
in one line with exit code 2 and resumes once the disk is larger.

Run as a script under torchrun (``test_checkpoint_disk_full.py fsize-child SAVE_DIR OUT``) it is that child."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ when run as the child script

from helpers import REPO  # noqa: E402
from megatron_vr1.parallel.env import free_port  # noqa: E402
from training_data import world_of_one  # noqa: E402

SIZE_RE = re.compile(r"about \d+(\.\d+)? (kB|MB|GB)")


@contextlib.contextmanager
def tmpfs(mountpoint: Path, size_bytes: int):
    """A tmpfs of ``size_bytes`` at ``mountpoint``; unmounted afterwards. Skips where mounting is not allowed."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes // 1024}k", "tmpfs", str(mountpoint)],
                              capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no `mount` command: cannot make a small filesystem to fill")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def resize(mountpoint: Path, size_bytes: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_bytes // 1024}k", str(mountpoint)], check=True)


def _trainer():
    """The tiny megatron GPT under DDP with megatron's Adam, stepped once so the checkpoint holds Adam moments."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_vr1.config.parallel import ParallelConfig
    from megatron_vr1.training.smoke import TinyGPTShape, build_tiny_gpt

    model = build_tiny_gpt(TinyGPTShape(), ParallelConfig())
    ddp = DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(), module=model)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3), [ddp])
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    optimizer.step()
    return ddp, optimizer


def _weights(ddp) -> list:
    return [p.detach().clone() for p in ddp.parameters()]


def _same(a: list, b: list) -> bool:
    return all(bool((x == y).all()) for x, y in zip(a, b, strict=True))


def _perturb(ddp) -> None:
    import torch

    with torch.no_grad():
        for p in ddp.parameters():
            p.add_(0.5)


def fault_then_recover(save_dir: Path, ddp, optimizer, *, break_disk, mend_disk) -> dict:
    """Save step 1, break the disk, save step 2 (must fail), look at what is left, load, mend the disk, save
    step 2 again and load it. Returns what was seen (JSON-able), for the test to judge."""
    from megatron_vr1.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    save_checkpoint(save_dir=save_dir, step=1, model=ddp, optimizer=optimizer, state={"at": 1})
    first = _weights(ddp)
    _perturb(ddp)
    seen: dict = {"error": None}
    break_disk()
    try:
        save_checkpoint(save_dir=save_dir, step=2, model=ddp, optimizer=optimizer, state={"at": 2})
    except CheckpointError as e:
        seen |= {"error": type(e).__name__, "message": str(e), "cause": repr(e.__cause__)[:300]}
    finally:
        seen["left"] = sorted(os.listdir(save_dir))
        seen["latest"] = (save_dir / "latest").read_text().strip()
    info = load_checkpoint(load_dir=save_dir, model=ddp, optimizer=optimizer)
    seen |= {"loaded_step": info.step, "loaded_state": info.state, "loaded_first": _same(_weights(ddp), first)}
    mend_disk()
    _perturb(ddp)
    second = _weights(ddp)
    published = save_checkpoint(save_dir=save_dir, step=2, model=ddp, optimizer=optimizer, state={"at": 2})
    _perturb(ddp)
    info = load_checkpoint(load_dir=save_dir, model=ddp, optimizer=optimizer)
    seen |= {"resaved": published.name, "latest_after": (save_dir / "latest").read_text().strip(),
             "reloaded_step": info.step, "loaded_second": _same(_weights(ddp), second),
             "left_after": sorted(os.listdir(save_dir))}
    return seen


def check_recovered(seen: dict, save_dir: Path, reason: str) -> None:
    assert seen["error"] == "CheckpointSpaceError", seen
    message = seen["message"]
    assert str(save_dir) in message and reason in message, message
    assert SIZE_RE.search(message) and " are free there" in message, message
    assert "`latest` still names iter_0000001" in message, message
    assert seen["left"] == ["iter_0000001", "latest"], seen["left"]  # no .tmp-iter_0000002 holding the space
    assert seen["latest"] == "iter_0000001"
    assert (seen["loaded_step"], seen["loaded_state"], seen["loaded_first"]) == (1, {"at": 1}, True)
    assert seen["resaved"] == seen["latest_after"] == "iter_0000002" and seen["reloaded_step"] == 2
    assert seen["loaded_second"], "the save after the disk was mended did not round-trip"
    assert seen["left_after"] == ["iter_0000001", "iter_0000002", "latest"]


@pytest.fixture(scope="module")
def trainer():
    with world_of_one():
        yield _trainer()


def _checkpoint_bytes(tmp_path: Path, ddp, optimizer) -> int:
    from megatron_vr1.checkpoint import save_checkpoint
    from megatron_vr1.checkpoint.layout import tree_bytes

    return tree_bytes(save_checkpoint(save_dir=tmp_path / "measure", step=1, model=ddp, optimizer=optimizer))


def test_full_disk_fails_cleanly_and_recovers(trainer, tmp_path):
    ddp, optimizer = trainer
    size = _checkpoint_bytes(tmp_path, ddp, optimizer)
    with tmpfs(tmp_path / "mnt", size * 3 // 2) as mnt:  # the first checkpoint fits, the second does not
        save_dir = mnt / "checkpoints"
        seen = fault_then_recover(save_dir, ddp, optimizer, break_disk=lambda: None,
                                  mend_disk=lambda: resize(mnt, size * 4))
    check_recovered(seen, save_dir, "the filesystem is full")
    assert "point checkpoint.save_dir at a larger filesystem" in seen["message"]
    assert "keep_last" not in seen["message"]  # one checkpoint left: a lower keep_last would free nothing


def test_file_size_limit_on_one_rank_fails_every_rank_the_same(tmp_path):
    """Two data-parallel ranks under torchrun; only rank 0 (which writes the replicated weights) has the limit.
    Both ranks raise the same CheckpointSpaceError (neither waits in a barrier for the other) and recover."""
    save_dir, out = tmp_path / "checkpoints", tmp_path / "seen"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", __file__, "fsize-child", str(save_dir), str(out)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    seen = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]
    for rank_seen in seen:
        check_recovered(rank_seen, save_dir, "file-size limit")
    assert seen[0]["message"] == seen[1]["message"] and "ulimit -f" in seen[0]["message"]


def _fsize_child(save_dir: Path, out: str) -> None:
    """Rank 0 under a file-size limit of a quarter of the checkpoint (SIGXFSZ ignored: writes fail with EFBIG)."""
    import torch.distributed as dist

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    with world_of_one():  # torchrun's world here: parallel.state reads RANK / WORLD_SIZE
        rank = dist.get_rank()
        ddp, optimizer = _trainer()
        from megatron_vr1.checkpoint.save_agreement import saved_bytes
        from megatron_vr1.checkpoint.training_state import _chunks, _sharded_state

        limit = saved_bytes(_sharded_state(_chunks(ddp), optimizer, is_loading=False)) // 4
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        seen = fault_then_recover(
            save_dir, ddp, optimizer,
            break_disk=lambda: rank == 0 and resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard)),
            mend_disk=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard)))
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(seen))


def _train(hf_dir: Path, data: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """``megatron-vr1 train`` for 2 GRPO steps with a checkpoint after each (the overrides of test_train_resume)."""
    sets = [f"model.hf_path={hf_dir}", f"data.train_path={data}", "rollout.engine=hf", f"log.run_dir={run_dir}",
            "log.progress=false", "log.tensorboard=false", "grpo.train_steps=2", "grpo.warmup_steps=0",
            "grpo.prompts_per_step=2", "grpo.num_generations=2", "rollout.max_new_tokens=8",
            "checkpoint.save_interval=1"]
    cmd = [sys.executable, "-m", "megatron_vr1.cli", "train", "--recipe", "tiny_cpu_demo",
           *[a for s in sets for a in ("--set", s)], *extra]
    env = dict(os.environ, OMP_NUM_THREADS="2", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_train_cli_full_disk_is_one_line_then_resume_finishes(tmp_path):
    from megatron_vr1.data.synth import build_synth
    from training_data import tiny_hf_dir

    hf_dir = tiny_hf_dir(tmp_path)
    data = build_synth(tmp_path / "data", n=8, seed=0, difficulty="demo", n_val=2)["train"]
    # A checkpoint holds the fp32 weights and two Adam moments: ~3.25x the HF weights file (measured: 4.6 MB for
    # the 1.4 MB test preset). The disk takes the first and not the second.
    checkpoint = int((hf_dir / "model.safetensors").stat().st_size * 3.25)
    with tmpfs(tmp_path / "mnt", checkpoint * 3 // 2) as mnt:
        run_dir = mnt / "run"
        failed = _train(hf_dir, data, run_dir)
        ours = [line for line in failed.stderr.splitlines() if line.startswith("megatron-vr1 train:")]
        assert failed.returncode == 2, failed.stderr[-4000:]
        assert "Traceback" not in failed.stderr, failed.stderr[-4000:]
        assert len(ours) == 1 and str(run_dir / "checkpoints") in ours[0], failed.stderr[-4000:]
        assert "the filesystem is full" in ours[0] and SIZE_RE.search(ours[0]), ours[0]
        assert sorted(os.listdir(run_dir / "checkpoints")) == ["iter_0000001", "latest"]
        resize(mnt, checkpoint * 4)
        resumed = _train(hf_dir, data, run_dir, "--resume")
        assert resumed.returncode == 0, resumed.stderr[-4000:]
        assert "finished step 2" in resumed.stdout
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000002"


def test_resume_removes_partial_saves(trainer, tmp_path, caplog):
    """A save killed mid-write leaves ``.tmp-iter_X``; an interrupted re-save leaves ``.tmp-replaced-iter_X``. A resume removes both and says how much it freed; a set-aside copy whose
    ``iter_X`` is missing is the only copy of that checkpoint and is put back instead."""
    from megatron_vr1.checkpoint import load_checkpoint, save_checkpoint

    ddp, optimizer = trainer
    save_dir = tmp_path / "checkpoints"
    save_checkpoint(save_dir=save_dir, step=1, model=ddp, optimizer=optimizer)
    stale = save_dir / ".tmp-iter_0000002" / "model_optim"
    stale.mkdir(parents=True)
    (stale / "__0_0.distcp").write_bytes(b"\0" * 300_000)
    (save_dir / ".tmp-replaced-iter_0000001").mkdir()
    orphan = save_dir / ".tmp-replaced-iter_0000000"  # its iter_0000000 is gone: the only copy
    orphan.mkdir()
    (save_dir / "notes").mkdir()  # not ours: left alone
    with caplog.at_level(logging.WARNING, logger="megatron_vr1.checkpoint"):
        info = load_checkpoint(load_dir=save_dir, model=ddp, optimizer=optimizer)
    assert info.step == 1
    assert sorted(os.listdir(save_dir)) == ["iter_0000000", "iter_0000001", "latest", "notes"]
    assert re.search(r"removed .*\.tmp-iter_0000002 .*freeing 30\d\.\d kB", caplog.text), caplog.text
    assert "restored" in caplog.text and ".tmp-replaced-iter_0000000" in caplog.text
    # A weights-only load (checkpoint.init_from: maybe another run's directory, maybe saving) leaves it alone.
    stale.mkdir(parents=True)
    load_checkpoint(load_dir=save_dir, model=ddp, load_rng=False)
    assert stale.is_dir()


def test_space_message_suggests_keep_last_when_it_frees_space(tmp_path):
    from megatron_vr1.checkpoint import layout, space

    for step in (1, 2):
        path = tmp_path / layout.iter_name(step)
        path.mkdir()
        (path / "shard").write_bytes(b"x" * 50_000)
    (tmp_path / "latest").write_text("iter_0000002\n")
    message = space.space_message(errno.ENOSPC, save_dir=tmp_path, step=3, needed=49_000, removed=True)
    assert message.startswith(f"saving checkpoint step 3 into {tmp_path} failed: the filesystem is full.")
    assert "about 49.0 kB (the tensors it saves; iter_0000002 takes 5" in message, message
    assert "lower checkpoint.keep_last (2 complete checkpoints there use 10" in message, message
    assert "`latest` still names iter_0000002" in message
    quota = space.space_message(errno.EDQUOT, save_dir=tmp_path, step=3, needed=49_000, removed=False)
    assert "quota" in quota and "could not be removed: delete it" in quota


def test_space_errno_reads_the_failure_chain(tmp_path):
    """The errno survives a wrapping; where megatron's writer drops it, an unrelated failure with room to
    spare is not called a space problem."""
    from megatron_vr1.checkpoint.space import space_errno

    try:
        try:
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        except OSError as e:
            raise RuntimeError("Worker failure") from e
    except RuntimeError as wrapped:
        assert space_errno(wrapped, tmp_path / ".tmp-iter_0000001", needed=1000) == errno.EDQUOT
    hidden = RuntimeError("Worker failure: An error is caught while starting worker 0, error: <class 'OSError'>")
    assert space_errno(hidden, tmp_path / ".tmp-iter_0000001", needed=1000) is None


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "fsize-child":
    _fsize_child(Path(sys.argv[2]), sys.argv[3])
