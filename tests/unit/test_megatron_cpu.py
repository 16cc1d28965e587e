"""A tiny megatron-core GPTModel (local spec) runs forward, backward and an optimizer step on CPU, through
megatron DDP, get_megatron_optimizer and get_forward_backward_func, in a world of one gloo process."""

import subprocess
import sys

import pytest


def test_tiny_gpt_train_step_on_cpu():
    # Own process: the CPU compatibility layer patches torch process-wide.
    code = ("from megatron_vr1.config.parallel import ParallelConfig\n"
            "from megatron_vr1.parallel import state, cpu_compat\n"
            "from megatron_vr1.training.smoke import run_smoke\n"
            "import json, torch\n"
            "cfg = ParallelConfig(); state.initialize(cfg)\n"
            "assert cpu_compat.is_applied() and not torch.cuda.is_available()\n"
            "r = run_smoke(cfg, steps=3, lr=1e-2)\n"
            "print(json.dumps({'losses': r.losses, 'norms': r.grad_norms, 'eval': r.eval_loss}))\n"
            "state.destroy()\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    import json

    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(out["losses"]) == 3 and all(n > 0 for n in out["norms"])
    assert abs(out["losses"][0] - 4.852) < 0.1  # ~ln(128) for a random init
    assert out["eval"] < out["losses"][0]  # three steps at lr 1e-2 lower the loss


def test_cpu_layer_refuses_other_megatron_versions(monkeypatch):
    import importlib.metadata

    from megatron_vr1.parallel import cpu_compat

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.20.0")
    with pytest.raises(cpu_compat.UnsupportedMegatronVersion, match="pip install megatron-core==0.19.2"):
        cpu_compat.check_version()
