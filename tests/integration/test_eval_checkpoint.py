"""`megatron-vr1 eval --model <training run's checkpoints>`: the Megatron checkpoint is converted to HF (through
the one converter) and evaluated; without --hf-config the user gets a one-line error."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from helpers import REPO
from training_data import tiny_hf_dir

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _cli(*args, timeout=900):
    env = dict(os.environ, OMP_NUM_THREADS="2", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-m", "megatron_vr1.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_eval_a_training_checkpoint(tmp_path):
    from megatron_vr1.data.synth import build_synth

    hf_dir = tiny_hf_dir(tmp_path)
    data = build_synth(tmp_path / "data", n=8, seed=0, difficulty="demo", n_val=4)
    run_dir = tmp_path / "sft"
    sets = [f"model.hf_path={hf_dir}", f"data.train_path={data['train']}", "grpo.mode=sft", "grpo.train_steps=2",
            "grpo.warmup_steps=0", "grpo.prompts_per_step=2", "grpo.lr=1e-2", "rollout.engine=hf",
            f"log.run_dir={run_dir}", "log.progress=false"]
    train = _cli("train", "--recipe", "tiny_cpu_demo", *[a for s in sets for a in ("--set", s)])
    assert train.returncode == 0, train.stderr[-3000:]

    base = ["eval", "--model", str(run_dir / "checkpoints"), "--data", str(data["val"]), "--gt", str(data["val_gt"]),
            "--max-new-tokens", "16"]
    missing = _cli(*base, "--out", str(tmp_path / "e0"))
    assert missing.returncode == 2 and "--hf-config" in missing.stderr and "Traceback" not in missing.stderr

    out = tmp_path / "eval"
    proc = _cli(*base, "--hf-config", str(hf_dir), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert "AP" in json.dumps(metrics)
    trained = load_file(next((out / "hf_model").glob("*.safetensors")))
    initial = load_file(next(hf_dir.glob("*.safetensors")))
    assert trained.keys() == initial.keys()
    assert any(not trained[k].equal(initial[k]) for k in trained)  # the SFT steps' weights were evaluated

    # Evaluating again into the same --out (a rerun of `make demo`) replaces eval's own converted copy.
    again = _cli(*base, "--hf-config", str(hf_dir), "--out", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert load_file(next((out / "hf_model").glob("*.safetensors"))).keys() == trained.keys()
