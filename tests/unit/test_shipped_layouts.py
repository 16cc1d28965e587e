"""Every layout the repository ships or prints is one the trainer accepts (config.parallel.check_layout, the check
the trainer itself runs): the built-in recipes for their models and GPU counts, the scaling job array's default
layouts, the tables of docs/scaling.md (which tools/scaling_model.py prints)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_vr1.config import load_recipe
from megatron_vr1.config.base import ConfigError
from megatron_vr1.config.parallel import ParallelConfig, check_layout, stage_layers

REPO = Path(__file__).resolve().parents[2]
QWEN25VL_7B = dict(num_heads=28, num_kv_heads=4, num_layers=28)
QWEN25VL_3B = dict(num_heads=16, num_kv_heads=2, num_layers=36)


def _warmstart_dims() -> dict:
    text = json.loads((REPO / "assets" / "warmstart" / "config.json").read_text())["text_config"]
    return dict(num_heads=text["num_attention_heads"], num_kv_heads=text["num_key_value_heads"],
                num_layers=text["num_hidden_layers"])


@pytest.mark.parametrize("recipe,dims,gpus", [
    ("qwen25vl_7b_vision_r1", QWEN25VL_7B, 16), ("qwen25vl_3b_vision_r1", QWEN25VL_3B, 8),
    ("tiny_cpu_demo", None, 1), ("tiny_cpu_demo_sft_control", None, 1), ("tiny_cpu_warmstart", None, 1)])
def test_builtin_recipes_fit_their_models(recipe, dims, gpus):
    cfg = load_recipe(recipe)
    check_layout(cfg.parallel, world_size=gpus, **(dims or _warmstart_dims()))


def test_cluster_recipes_use_the_distributed_optimizer():
    for name in ("qwen25vl_7b_vision_r1", "qwen25vl_3b_vision_r1"):
        assert load_recipe(name).parallel.distributed_optimizer


def test_scaling_job_array_layouts_are_valid():
    text = (REPO / "examples" / "slurm" / "scaling_bench.sbatch").read_text()
    default = re.search(r"LAYOUTS=\(\$\{LAYOUTS:-([^}]*)\}\)", text).group(1)
    for entry in default.split():
        nodes, tp, pp = (int(v) for v in entry.split(":"))
        check_layout(ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp), world_size=8 * nodes, **QWEN25VL_7B)


def test_docs_scaling_tables_are_the_model_output_and_valid():
    printed = subprocess.run([sys.executable, str(REPO / "tools" / "scaling_model.py")], capture_output=True,
                             text=True, check=True).stdout
    doc = (REPO / "docs" / "scaling.md").read_text()
    rows = [line for line in printed.splitlines() if re.match(r"\| \d+ \|", line)]
    assert rows and all(row in doc for row in rows), "docs/scaling.md is not tools/scaling_model.py's output"
    for line in (line for line in doc.splitlines() if re.match(r"\| \d+ \| \d+ \| \d+ x \d+ x \d+ \|", line)):
        _, nodes, gpus, layout = (c.strip() for c in line.split("|")[:4])
        tp, pp, dp = (int(v) for v in layout.split(" x "))
        assert tp * pp * dp == int(gpus)
        check_layout(ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp), world_size=int(gpus), **QWEN25VL_7B)


def test_invalid_layouts_are_refused_with_a_fix():
    with pytest.raises(ConfigError, match="choose a divisor of 4"):
        check_layout(ParallelConfig(tensor_parallel=8), **QWEN25VL_7B)
    with pytest.raises(ConfigError, match="pipeline_first_stage_layers=9 parallel.pipeline_last_stage_layers=9"):
        check_layout(ParallelConfig(pipeline_parallel=3), **QWEN25VL_7B)
    # the suggestion is one megatron builds: 9 + 10 + 9
    assert check_layout(ParallelConfig(pipeline_parallel=3, pipeline_first_stage_layers=9,
                                       pipeline_last_stage_layers=9), **QWEN25VL_7B) == (9, 10, 9)
    assert stage_layers(80, 8, 10, 10) == (10,) * 8  # 72B: 80 layers on 8 stages
    with pytest.raises(ConfigError, match="must share them evenly"):
        stage_layers(28, 4, 5, 0)  # 23 layers for 3 middle stages
    with pytest.raises(ConfigError, match="multiple of TP x PP"):
        check_layout(ParallelConfig(tensor_parallel=4), world_size=6, **QWEN25VL_7B)
    with pytest.raises(ConfigError, match="need pipeline_parallel > 1"):
        ParallelConfig(pipeline_first_stage_layers=3)
