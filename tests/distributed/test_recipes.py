"""Every built-in recipe runs with its own parallel settings (TP, PP, SP, DP, the distributed optimizer, packing,
micro-batch size): two GRPO (or SFT) steps of `megatron-vr1 train` under torchrun on gloo, on a tiny random
Qwen2.5-VL whose heads and layers fit every layout (tests/training_data.py: layout_hf_dir), ending in a checkpoint.
Only what is not the layout is overridden: the model and data paths, the image size, the step count, the rollout
engine (in-process, short completions). Also the 7B recipe at TP=2 x PP=2 with uneven stages (1 + 2 layers)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO
from megatron_vr1.parallel.env import free_port
from training_data import layout_hf_dir

pytestmark = pytest.mark.slow

CASES = {
    # name: (recipe, ranks, extra overrides)
    "qwen25vl_7b_vision_r1": ("qwen25vl_7b_vision_r1", 8, []),  # TP=4 + SP, DP=2, distributed optimizer
    "qwen25vl_3b_vision_r1": ("qwen25vl_3b_vision_r1", 4, []),  # TP=2 + SP, DP=2, distributed optimizer
    "tiny_cpu_demo": ("tiny_cpu_demo", 1, ["grpo.warmup_steps=0"]),  # packed micro-batches of 128 completions
    "tiny_cpu_demo_sft_control": ("tiny_cpu_demo_sft_control", 1, []),
    "tiny_cpu_warmstart": ("tiny_cpu_warmstart", 1, ["grpo.stop_at_step=0", "grpo.warmup_steps=0"]),
    "7b_uneven_pp": ("qwen25vl_7b_vision_r1", 4, ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2",
                                                 "parallel.pipeline_first_stage_layers=1",
                                                 "parallel.pipeline_last_stage_layers=2"]),
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from megatron_vr1.data.synth import build_synth

    root = tmp_path_factory.mktemp("recipes")
    return layout_hf_dir(root), build_synth(root / "data", n=64, seed=0, difficulty="demo", n_val=2)["train"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_recipe_runs_with_its_layout(assets, tmp_path, name):
    recipe, ranks, extra = CASES[name]
    hf_dir, train = assets
    run_dir = tmp_path / "run"
    sets = [*extra, f"model.hf_path={hf_dir}", f"data.train_path={train}", "data.min_pixels=3136",
            "data.max_pixels=3136", "grpo.train_steps=2", "rollout.engine=hf", "rollout.max_new_tokens=8",
            f"log.run_dir={run_dir}", "log.progress=false", "checkpoint.save_interval=2", "parallel.backend=gloo"]
    launch = [sys.executable]
    if ranks > 1:
        launch += ["-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
                   f"--master_port={free_port()}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    proc = subprocess.run([*launch, "-m", "megatron_vr1.cli", "train", "--recipe", recipe,
                           *[a for s in sets for a in ("--set", s)]], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    from megatron_vr1.config import load_recipe
    from megatron_vr1.training.metrics import read_metrics

    cfg = load_recipe(recipe, tuple(sets))
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(v) for r in records for k, v in r.items() if k.startswith("train/")), records
    if cfg.grpo.mode == "grpo":
        assert records[-1]["weight_version"] == 2  # each update synced into the rollout engine
    meta = json.loads((run_dir / "checkpoints" / "iter_0000002" / "train_state.json").read_text())
    p = cfg.parallel
    assert meta["layout"] == {"world_size": ranks, "tensor_parallel": p.tensor_parallel,
                              "pipeline_parallel": p.pipeline_parallel,
                              "data_parallel": ranks // (p.tensor_parallel * p.pipeline_parallel),
                              "distributed_optimizer": p.distributed_optimizer}
    if name == "7b_uneven_pp":
        # the uneven-stage checkpoint's weights start a run at another layout (one process, TP=1 x PP=1)
        warm = [s for s in sets if not s.startswith(("parallel.", "log.run_dir"))]
        warm += ["parallel.sequence_parallel=false", "parallel.tensor_parallel=1", "parallel.pipeline_parallel=1",
                 "parallel.distributed_optimizer=false", "grpo.train_steps=1", f"log.run_dir={tmp_path / 'warm'}",
                 f"checkpoint.init_from={run_dir / 'checkpoints'}"]
        proc = subprocess.run([sys.executable, "-m", "megatron_vr1.cli", "train", "--recipe", recipe,
                               *[a for s in warm for a in ("--set", s)]], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        assert read_metrics(tmp_path / "warm")[-1]["weight_version"] == 2  # 1: warm-started weights synced
