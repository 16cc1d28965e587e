"""Config dataclasses: validation names the field and the fix; recipes load; --set overrides are typed."""

import json
import subprocess
import sys

import pytest

from megatron_vr1.config import (ConfigError, GRPOConfig, ParallelConfig, RolloutConfig, RunConfig, apply_override,
                                 available_recipes, load_recipe)


def test_validation_message_names_field_and_fix():
    with pytest.raises(ConfigError, match=r"parallel\.tensor_parallel=0 is invalid: use an integer >= 1"):
        ParallelConfig(tensor_parallel=0)
    with pytest.raises(ConfigError, match=r"grpo\.num_generations=1.*at least 2"):
        GRPOConfig(num_generations=1)
    with pytest.raises(ConfigError, match=r"rollout\.top_p"):
        RolloutConfig(top_p=0.0)


def test_cross_section_validation_on_root():
    with pytest.raises(ConfigError, match=r"rollout\.temperature"):
        RunConfig(rollout=RolloutConfig(temperature=0.0))
    RunConfig(rollout=RolloutConfig(temperature=0.0), grpo=GRPOConfig(mode="sft"))  # greedy is fine for SFT


def test_builtin_recipes_resolve():
    names = available_recipes()
    assert {"tiny_cpu_demo", "qwen25vl_3b_vision_r1", "qwen25vl_7b_vision_r1"} <= set(names)
    cfg = load_recipe("qwen25vl_7b_vision_r1")
    assert (cfg.grpo.num_generations, cfg.grpo.lr, cfg.grpo.beta, cfg.rollout.temperature) == (4, 1e-6, 0.04, 1.0)


def test_overrides_are_typed_and_revalidated():
    cfg = load_recipe("qwen25vl_7b_vision_r1", ["grpo.beta=0.2", "parallel.sequence_parallel=false",
                                                "rollout.server_urls=[\"http://a:1\",\"http://b:2\"]",
                                                "reward.preset=paper"])
    assert cfg.grpo.beta == 0.2 and cfg.parallel.sequence_parallel is False
    assert cfg.rollout.server_urls == ("http://a:1", "http://b:2") and cfg.reward.preset == "paper"
    with pytest.raises(ConfigError, match="expected a number"):
        apply_override(cfg, "grpo.beta=high")
    with pytest.raises(ConfigError, match="must be one of"):
        apply_override(cfg, "reward.preset=unknown")
    with pytest.raises(ConfigError, match="has no field 'betta'"):
        apply_override(cfg, "grpo.betta=0.1")
    with pytest.raises(ConfigError, match=r"grpo\.lr=-1.0 is invalid"):
        apply_override(cfg, "grpo.lr=-1")


def test_recipe_from_user_file(tmp_path):
    f = tmp_path / "my_recipe.py"
    f.write_text("from megatron_vr1.config import load_recipe\n"
                 "def small():\n    cfg = load_recipe('tiny_cpu_demo')\n    cfg.name = 'mine'\n    return cfg\n")
    assert load_recipe(f"{f}:small").name == "mine"
    with pytest.raises(ConfigError, match="has no function"):
        load_recipe(f"{f}:missing")


def test_round_trip_through_dict():
    cfg = load_recipe("tiny_cpu_demo", ["grpo.lr=3e-5", "reward.advanced_precision_band=(0.75,0.95)"])
    again = RunConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg and again.reward.advanced_precision_band == (0.75, 0.95)  # tuple | None: a tuple again


def test_config_show_cli():
    out = subprocess.run([sys.executable, "-m", "megatron_vr1.cli", "config", "show", "--recipe", "tiny_cpu_demo",
                          "--set", "grpo.beta=0.2"], capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["grpo"]["beta"] == 0.2
    bad = subprocess.run([sys.executable, "-m", "megatron_vr1.cli", "config", "show", "--recipe", "nope"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown recipe" in bad.stderr and "Traceback" not in bad.stderr
