"""The trainer's device placement, checked on a CPU: a real GRPO train step (reference and policy logprobs,
forward, backward, optimizer step, loss) and a weight export of the tiny Qwen2.5-VL policy, with its parameters on
an emulated ``cuda:0`` (tests/emulated_cuda.py). Any tensor the trainer leaves on the CPU next to a device tensor
fails here with the op that mixed them, as it would fail on the first step of a GPU job.

It runs in a fresh process (``python tests/unit/test_device_placement.py RUN_DIR``): the CPU compatibility layer
other tests apply patches torch for good, and the emulated device must see torch as shipped. The process also
checks the numbers: the emulated-device logprobs equal plain transformers' on the CPU.

On the code before the run-device boundary (main at 3542425) this stopped at the first forward:
``device mix in aten.embedding.default: cpu tensor(s) of shape [(3, 60)] with cuda:0 tensors`` (the micro-batch's
token ids, rebuilt on the CPU by ``Policy.micro_batches``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_grpo_step_on_emulated_cuda(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, timeout=600,
                          cwd=TESTS.parent, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    report = json.loads((tmp_path / "report.json").read_text())
    for layout in ("padded", "packed"):
        r = report[layout]
        assert r["param_devices"] == ["cuda:0"], r["param_devices"]
        assert r["grad_buffer_devices"] == ["cuda:0"]
        assert r["logprobs_device"] == "cpu"  # results come back to the host TrainBatch
        # Same numbers as transformers on the CPU (SDPA vs eager attention differ by ~1e-6 here).
        assert r["max_gap_vs_transformers"] < 1e-4, r
        assert r["reference_equals_policy_before_step"]
        assert all(math.isfinite(v) for v in r["metrics"].values()) and r["metrics"]["num_tokens"] > 0
        assert math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
        assert r["weights_changed"]
        assert r["exported_devices"] == ["cuda:0"] and r["exported_tensors"] > 10
    # The two layouts compute the same gradient (same rows, same weights, same loss inputs).
    assert report["packed"]["grad_norm"] == pytest.approx(report["padded"]["grad_norm"], rel=1e-5)
    # On a CUDA machine the jit-fused bias-SwiGLU and bias-dropout-add paths run (no TE here, so no TE fusions).
    assert report["padded"]["fusions"] == {"bias_activation_fusion": True, "bias_dropout_fusion": True,
                                           "apply_rope_fusion": False, "gradient_accumulation_fusion": False,
                                           "masked_softmax_fusion": False}
    # What the harness refuses, it refuses: a stray CPU tensor in the loss.
    assert "device mix in" in report["stray_cpu_tensor_error"]


# ---- the worker (fresh process) -----------------------------------------------------------------------------------

def _transformers_logprobs(hf_dir, batch, prep) -> list[list[float]]:
    """Each row's completion-token logprobs from plain transformers on the CPU (the reference)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = []
    p = len(prep.prompt_ids)
    for b in range(batch.input_ids.shape[0]):
        ids = batch.input_ids[b:b + 1, :int(batch.lengths[b])]
        with torch.no_grad():
            logits = hf(input_ids=ids, pixel_values=prep.pixel_values, image_grid_thw=batch.image_grid_thw[b:b + 1],
                        mm_token_type_ids=(ids == hf.config.image_token_id).int()).logits.float()
        lp = torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
        out.append(lp[p - 1:].tolist())
    return out


def _worker(run_dir: Path) -> None:
    sys.path.insert(0, str(TESTS))
    import torch
    from transformers import AutoTokenizer

    from emulated_cuda import DeviceMixError, emulated_cuda, on_emulated_device
    from training_data import make_sample, run_config, tiny_hf_dir

    from megatron_vr1.training.batch import build_train_batch, prepare_prompt
    from megatron_vr1.types import Completion, RolloutGroup

    hf_dir = tiny_hf_dir(run_dir)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    prep = prepare_prompt(make_sample(0), tok, min_pixels=56 * 56, max_pixels=56 * 56)
    completions = [[40, 41, 42, 43, 44], [50, 51], [60, 61, 62], [70]]
    comps = tuple(Completion(sample_id="s", request_id=f"r{i}", text="", token_ids=tuple(ids),
                             logprobs=tuple([-2.0] * len(ids)), finish_reason="length", weight_version=0)
                  for i, ids in enumerate(completions))
    batch = build_train_batch([RolloutGroup(sample=prep.sample, completions=comps)], [prep],
                              torch.tensor([1.0, -1.0, 0.5, -0.5]), eos_ids=[])
    reference = _transformers_logprobs(hf_dir, batch, prep)
    report: dict = {}
    with emulated_cuda():
        from megatron_vr1.parallel import state
        from megatron_vr1.training.policy import Policy, grpo_loss_fn

        assert torch.cuda.is_available()
        for layout, parallel in (("padded", {"micro_batch_size": 3}), ("packed", {"micro_batch_size": 4,
                                                                                  "pack_groups": True})):
            # KL to a reference model, truncated importance sampling and PPO ratios: every loss input is used.
            cfg = run_config(hf_dir, run_dir / layout, beta=0.04, tis=True, lr=1e-3, lr_schedule="constant")
            cfg.parallel.backend = "gloo"  # one process: gloo carries the emulated device's data
            for key, value in parallel.items():
                setattr(cfg.parallel, key, value)
            state.initialize(cfg.parallel)
            try:
                policy = Policy(cfg)
                params = list(policy.model.parameters())
                b = batch
                b.ref_logprobs = policy.logprobs(b, reference=True)
                b.old_logprobs = policy.logprobs(b)
                gap = 0.0
                p = len(prep.prompt_ids)
                for row, ref in enumerate(reference):
                    n = len(completions[row])
                    ours = b.old_logprobs[row, p:p + n]
                    gap = max(gap, float((ours - torch.tensor(ref[:n])).abs().max()))
                before = [t.detach().clone() for t in params[:4]]
                result = policy.train_step(b, grpo_loss_fn(cfg))
                exported = [t for bucket in policy.export_buckets(1 << 20) for _name, t in bucket]
                buffers = [buf.grad_data for buf in policy.model.buffers]
                report[layout] = {
                    "param_devices": sorted({str(t.device) for t in params}),
                    "grad_buffer_devices": sorted({str(t.device) for t in buffers}),
                    "logprobs_device": str(b.old_logprobs.device),
                    "max_gap_vs_transformers": gap,
                    "reference_equals_policy_before_step": bool(torch.equal(b.ref_logprobs, b.old_logprobs)),
                    "metrics": result.metrics, "grad_norm": result.grad_norm,
                    "weights_changed": any(not torch.equal(x.cpu(), y.detach().cpu()) for x, y in zip(before, params)),
                    "exported_devices": sorted({str(t.device) for t in exported}),
                    "exported_tensors": len(exported),
                    "all_params_emulated": all(on_emulated_device(t) for t in params),
                    "fusions": {k: getattr(policy.model.config, k) for k in (
                        "bias_activation_fusion", "bias_dropout_fusion", "apply_rope_fusion",
                        "gradient_accumulation_fusion", "masked_softmax_fusion")},
                }
                if layout == "packed":
                    def leaky_loss(**kw):  # a loss that builds a CPU tensor, as the old trainer's inputs were
                        loss, metrics = grpo_loss_fn(cfg)(**kw)
                        return loss + (kw["logprobs"] * torch.ones(kw["logprobs"].shape)).sum() * 0, metrics

                    try:
                        policy.train_step(b, leaky_loss)
                        report["stray_cpu_tensor_error"] = "none raised"
                    except DeviceMixError as e:
                        report["stray_cpu_tensor_error"] = str(e)
                b.ref_logprobs = b.old_logprobs = None
            finally:
                state.destroy()
    (run_dir / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
