"""tools/gpu_acceptance.sh --cpu: the GPU acceptance run's own code at a tiny shape on the CPU, so that the script a
GPU machine runs cannot rot (parity with transformers in fp32 and bf16, GRPO steps of `megatron-vr1 train`, the
train-step kernels, TP=2 on two gloo processes; the TE / FP8 rows are skipped with their reason)."""

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_acceptance_run_on_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run(["bash", str(REPO / "tools" / "gpu_acceptance.sh"), "--cpu", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    rows = {(r["section"], r["check"]): r for r in report["rows"]}
    status = {key: r["status"] for key, r in rows.items()}
    for dtype in ("float32", "bfloat16"):
        assert status[("parity", f"logprobs vs transformers, {dtype}")] == "PASS"
        assert status[("parity", f"logits vs transformers, {dtype}")] == "PASS"
    assert status[("grpo", "3 steps of megatron-vr1 train (HF rollout engine)")] == "PASS"
    assert status[("kernels", "local spec (unfused, CPU)")] == "PASS"
    assert status[("tp2", "TP=2 vs TP=1: logprobs, grad norm")] == "PASS"
    for name in ("TE bf16", "TE FP8 delayed", "TE FP8 tensorwise"):
        assert status[("kernels", name)] == "SKIP" and rows[("kernels", name)]["note"]
    assert "| parity " in proc.stdout and "MFU" in proc.stdout  # the printed table
