"""A full training checkpoint written at TP=2 resumes at TP=1 (real torchrun, gloo): weights AND the megatron
optimizer's Adam moments and step counts are resharded by dist_checkpointing, the LR schedule continues, and
the next steps match the uninterrupted TP=2 run. RNG states are (by design) not carried across world sizes."""

import json
import shutil
from pathlib import Path

import pytest

from helpers import torchrun

WORKER = Path(__file__).with_name("ckpt_worker.py")
STEPS, SAVE_AT = 4, 2
REL = 1e-5

pytestmark = pytest.mark.slow


def _metrics(out: Path, rank: int = 0) -> list[dict]:
    return [json.loads(line) for line in (out / f"metrics_rank{rank}.jsonl").read_text().splitlines()]


def _close(a: float, b: float, rel: float = REL) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    common = ["--steps", str(STEPS), "--save-interval", str(SAVE_AT), "--keep-last", "2"]
    torchrun(WORKER, 2, ["--tp", "2", "--save-dir", str(root / "ckpt"), *common], root / "tp2", timeout=500)
    (root / "ckpt" / "latest").write_text(f"iter_{SAVE_AT:07d}\n")  # resume from the middle of the TP=2 run
    shutil.copytree(root / "ckpt", root / "ckpt_nomom")
    torchrun(WORKER, 1, ["--tp", "1", "--save-dir", str(root / "ckpt"), "--resume", *common], root / "tp1",
             timeout=500)
    torchrun(WORKER, 1, ["--tp", "1", "--save-dir", str(root / "ckpt_nomom"), "--resume", "--no-load-optim",
                         *common], root / "tp1_nomom", timeout=500)
    return root


def test_optimizer_state_is_resharded_tp2_to_tp1(runs):
    saved = [json.loads((runs / "tp2" / f"moments_saved_rank{r}_step{SAVE_AT}.json").read_text()) for r in (0, 1)]
    loaded = json.loads((runs / "tp1" / "moments_loaded_rank0.json").read_text())
    assert loaded["saved_layout"]["tensor_parallel"] == 2 and loaded["step"] == SAVE_AT
    assert not loaded["rng_restored"]  # world size 2 -> 1: per-rank RNG streams do not carry over
    assert saved[0]["exp_avg_sq_norm"] == saved[1]["exp_avg_sq_norm"] > 0  # reduced over the TP group
    for key in ("exp_avg_sq_norm", "exp_avg_sq_sq_norm"):
        assert _close(loaded[key], saved[0][key], 1e-9), (key, loaded[key], saved[0][key])
    assert loaded["steps"] == [float(SAVE_AT)]
    assert _close(loaded["lr"], _metrics(runs / "tp2")[SAVE_AT - 1]["lr"], 1e-12)  # scheduler restored


def test_tp1_continues_the_tp2_run(runs):
    tp2, tp1 = _metrics(runs / "tp2"), _metrics(runs / "tp1")
    assert [m["step"] for m in tp1] == list(range(SAVE_AT + 1, STEPS + 1))
    for got, want in zip(tp1, tp2[SAVE_AT:]):
        assert _close(got["loss"], want["loss"]), (got, want)
        assert _close(got["grad_norm"], want["grad_norm"]), (got, want)
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-12)


def test_without_the_optimizer_state_the_run_diverges(runs):
    tp2, nomom = _metrics(runs / "tp2"), _metrics(runs / "tp1_nomom")
    assert _close(nomom[0]["loss"], tp2[SAVE_AT]["loss"])  # same weights: same first loss
    assert not _close(nomom[1]["loss"], tp2[SAVE_AT + 1]["loss"], 1e-4)  # fresh Adam moments: a different update


def test_pp2_checkpoint_resumes_at_pp1(tmp_path):
    """The same across pipeline stages: each PP=2 stage saves its layers (and their Adam moments); PP=1 loads
    them all and continues the run."""
    common = ["--steps", str(STEPS), "--save-interval", str(SAVE_AT), "--keep-last", "2"]
    torchrun(WORKER, 2, ["--pp", "2", "--save-dir", str(tmp_path / "ckpt"), *common], tmp_path / "pp2", timeout=500)
    (tmp_path / "ckpt" / "latest").write_text(f"iter_{SAVE_AT:07d}\n")
    torchrun(WORKER, 1, ["--save-dir", str(tmp_path / "ckpt"), "--resume", *common], tmp_path / "pp1", timeout=500)
    saved = json.loads((tmp_path / "pp2" / f"moments_saved_rank0_step{SAVE_AT}.json").read_text())
    loaded = json.loads((tmp_path / "pp1" / "moments_loaded_rank0.json").read_text())
    assert loaded["saved_layout"]["pipeline_parallel"] == 2 and loaded["steps"] == [float(SAVE_AT)]
    for key in ("exp_avg_sq_norm", "exp_avg_sq_sq_norm"):
        assert _close(loaded[key], saved[key], 1e-9), (key, loaded[key], saved[key])
    pp2_last_stage, pp1 = _metrics(tmp_path / "pp2", rank=1), _metrics(tmp_path / "pp1")
    for got, want in zip(pp1, pp2_last_stage[SAVE_AT:]):
        assert _close(got["loss"], want["loss"]) and _close(got["grad_norm"], want["grad_norm"]), (got, want)
