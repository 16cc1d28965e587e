"""How a server is launched: validated spec, loopback by default, CPU-engine flags and environment."""

from __future__ import annotations

import json

import pytest

from megatron_vr1.config.base import ConfigError
from megatron_vr1.rollout.sglang_server import CPU_LAUNCHER, SGLangServer, ServerSpec


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    return tmp_path


def test_cpu_launch_is_loopback_with_cpu_engine_and_no_stale_vision_cache(model_dir, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    server = SGLangServer(ServerSpec(model_path=str(model_dir), device="cpu", api_key="k", python="/x/python"))
    cmd = server.command()
    # SGLang's launcher plus the batched attention, run by path (it is not importable in SGLang's venv)
    assert cmd[:2] == ["/x/python", str(CPU_LAUNCHER)] and CPU_LAUNCHER.is_file()
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--device") + 1] == "cpu" and cmd[cmd.index("--dtype") + 1] == "float32"
    assert cmd[cmd.index("--attention-backend") + 1] == "torch_native"
    assert cmd[cmd.index("--api-key") + 1] == "k" and int(cmd[cmd.index("--port") + 1]) == server.port > 0
    assert cmd[cmd.index("--max-running-requests") + 1] == "128"  # whole rollout batches at once on CPU
    mine = SGLangServer(ServerSpec(model_path=str(model_dir), device="cpu", max_running_requests=16, python="/x/py"))
    assert mine.command()[mine.command().index("--max-running-requests") + 1] == "16"
    env = server.environment()
    assert env["SGLANG_USE_CPU_ENGINE"] == "1" and env["SGLANG_VLM_CACHE_SIZE_MB"] == "0"
    assert "PYTHONPATH" not in env and env["HF_HUB_OFFLINE"] == "1"
    assert server.endpoint.url == f"http://127.0.0.1:{server.port}" and server.endpoint.api_key == "k"
    assert not server.alive()
    server.stop()  # idempotent on a server that never started


def test_bad_specs_name_the_field_and_the_fix(model_dir, tmp_path):
    with pytest.raises(ConfigError, match="server.model_path.*config.json"):
        ServerSpec(model_path=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="server.port"):
        ServerSpec(model_path=str(model_dir), port=70000)


def test_kv_budget_and_memory_share_come_from_the_rollout_config(model_dir):
    from megatron_vr1.config.rollout import RolloutConfig

    def flag(cmd, name):
        return cmd[cmd.index(name) + 1] if name in cmd else None

    cpu = SGLangServer(ServerSpec(model_path=str(model_dir), device="cpu", python="/x/py")).command()
    assert flag(cpu, "--max-total-tokens") == "8192" and flag(cpu, "--mem-fraction-static") == "0.05"
    gpu = SGLangServer(ServerSpec(model_path=str(model_dir), device="cuda", python="/x/py")).command()
    assert flag(gpu, "--max-total-tokens") is None and flag(gpu, "--mem-fraction-static") is None  # SGLang sizes
    r = RolloutConfig(max_total_tokens=65536, mem_fraction_static=0.4)
    set_ = SGLangServer(ServerSpec(model_path=str(model_dir), device="cuda", python="/x/py",
                                   max_total_tokens=r.max_total_tokens, mem_fraction_static=r.mem_fraction_static))
    cmd = set_.command()
    assert flag(cmd, "--max-total-tokens") == "65536" and flag(cmd, "--mem-fraction-static") == "0.4"
    with pytest.raises(ConfigError, match="rollout.max_total_tokens"):
        RolloutConfig(max_total_tokens=100)
    with pytest.raises(ConfigError, match="rollout.mem_fraction_static"):
        RolloutConfig(mem_fraction_static=1.5)
