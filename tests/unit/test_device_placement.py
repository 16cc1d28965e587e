"""The trainer's device placement, checked on a CPU: the tiny Qwen2.5-VL policy with its parameters on an emulated
``cuda:0`` (tests/emulated_cuda.py), so that any tensor the trainer leaves on the CPU next to a device tensor, or
hands to an NCCL collective, fails here with the op that mixed them, as it would fail on the first step of a GPU
job.

- a world of one: reference and policy logprobs, a real GRPO train step (forward, backward, optimizer step, the
  loss with KL, TIS and PPO ratios), the weight export; padded and shared-prompt-packed micro-batches; the
  logprobs equal plain transformers' on the CPU;
- ``megatron-vr1 train``'s own loop (``commands.train.train``) for two GRPO steps with the in-process rollout
  engine on the device: rollout, reward, update, weight sync into the engine;
- two ranks under torchrun (gloo carries the data): DP=2 (overlapped gradient all-reduce), TP=2 (the replicated
  vision tower is broadcast on the device) and PP=2 (pipeline receive buffers, the last stage's broadcasts, the
  exporter's stage broadcasts) give the same gradient norm.

The workers run in fresh processes: the CPU compatibility layer other tests apply patches torch for good, and the
emulated device must see torch as shipped.

On the code before the run-device boundary (main at 3542425) the first test stopped at the first forward:
``device mix in aten.embedding.default: cpu tensor(s) of shape [(3, 60)] with cuda:0 tensors`` (the micro-batch's
token ids, rebuilt on the CPU by ``Policy.micro_batches``). With only the exporter's or the metrics' CPU buffer
put back, PP=2 stops at ``torch.distributed.broadcast got cpu tensor(s)``; with the vision tower broadcast before
it is placed, TP=2 stops the same way.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run_worker(args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=600,
                          cwd=TESTS.parent, env=env)


def test_grpo_step_and_loop_on_emulated_cuda(tmp_path):
    proc = _run_worker(["--out", str(tmp_path), "--mode", "one"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    report = json.loads((tmp_path / "rank0.json").read_text())
    for layout in ("padded", "packed", "bf16"):
        r = report[layout]
        assert r["param_devices"] == ["cuda:0"] and r["all_params_emulated"], r["param_devices"]
        assert r["grad_buffer_devices"] == ["cuda:0"]
        assert r["logprobs_device"] == "cpu"  # results come back to the host TrainBatch
        # Same numbers as transformers (fp32) on the CPU: SDPA vs eager attention differ by ~1e-6 here; bf16
        # rounds to 8 mantissa bits.
        assert r["max_gap_vs_transformers"] < (0.1 if layout == "bf16" else 1e-4), r
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
    loop = report["loop"]
    assert loop["steps"] == 2 and loop["weight_version"] == 2  # two updates, each synced into the engine
    assert loop["engine_device"] == "cuda:0" and loop["engine_weight_version"] == 2
    assert all(math.isfinite(v) for v in loop["last"].values())
    # after each weight sync the trainer scores the engine's own samples as the engine did
    assert loop["last"]["train/logprob_gap_abs_mean"] < 1e-4


def test_parallel_layouts_on_emulated_cuda(tmp_path):
    sys.path.insert(0, str(TESTS))
    from helpers import torchrun
    from training_data import tiny_hf_dir

    tiny_hf_dir(tmp_path)  # built once, before the ranks start
    ranks = torchrun(Path(__file__), 2, ["--mode", "ranks"], tmp_path, timeout=600)
    base = ranks[0]["dp2"]
    assert base["param_devices"] == ["cuda:0"] and base["grad_norm"] > 0
    for r in ranks:
        for name in ("dp2", "tp2", "pp2"):
            got = r[name]
            assert got["param_devices"] == ["cuda:0"], name
            assert got["grad_norm"] == pytest.approx(base["grad_norm"], rel=1e-5), name
            assert got["exported_tensors"] == base["exported_tensors"] and got["exported_devices"] == ["cuda:0"]


# ---- the workers (fresh processes) -------------------------------------------------------------------------------

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
            logits = hf(input_ids=ids, pixel_values=prep.pixel_values, image_grid_thw=batch.image_grid_thw[int(batch.group_ids[b])][None],
                        mm_token_type_ids=(ids == hf.config.image_token_id).int()).logits.float()
        lp = torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
        out.append(lp[p - 1:].tolist())
    return out


def _batch(hf_dir, completions, advantages):
    from training_data import completion_batch

    batch, prep, _tok = completion_batch(hf_dir, completions, advantages, eos=False, logprob=-2.0,
                                         finish_reason="length")
    return batch, prep


def _step_report(policy, batch, cfg) -> dict:
    """Reference and policy logprobs, one GRPO step and an export, with where everything lived."""
    import torch

    from emulated_cuda import on_emulated_device
    from megatron_vr1.training.policy import grpo_loss_fn

    from megatron.core import parallel_state

    from megatron_vr1.training.sharding import shard_batch

    params = list(policy.model.parameters())
    batch.ref_logprobs = policy.logprobs(batch, reference=True)
    batch.old_logprobs = policy.logprobs(batch)
    before = [t.detach().clone() for t in params[:4]]
    # as the loop does: this data-parallel rank's shard, the mini-batch totals over all ranks
    shard = shard_batch(batch, parallel_state.get_data_parallel_world_size())[parallel_state.get_data_parallel_rank()]
    result = policy.train_step(shard.batch, grpo_loss_fn(cfg), rows=shard.minibatches[0], totals=shard.totals[0])
    exported = [t for bucket in policy.export_buckets(1 << 20) for _name, t in bucket]
    return {
        "param_devices": sorted({str(t.device) for t in params}),
        "all_params_emulated": all(on_emulated_device(t) for t in params),
        "grad_buffer_devices": sorted({str(buf.grad_data.device) for buf in policy.model.buffers}),
        "logprobs_device": str(batch.old_logprobs.device),
        "reference_equals_policy_before_step": bool(torch.equal(batch.ref_logprobs, batch.old_logprobs)),
        "metrics": result.metrics, "grad_norm": result.grad_norm,
        "weights_changed": any(not torch.equal(x.cpu(), y.detach().cpu()) for x, y in zip(before, params)),
        "exported_devices": sorted({str(t.device) for t in exported}), "exported_tensors": len(exported),
        "fusions": {k: getattr(policy.model.config, k) for k in (
            "bias_activation_fusion", "bias_dropout_fusion", "apply_rope_fusion", "gradient_accumulation_fusion",
            "masked_softmax_fusion")},
    }


COMPLETIONS = [[40, 41, 42, 43, 44], [50, 51], [60, 61, 62], [70]]
ADVANTAGES = [1.0, -1.0, 0.5, -0.5]


def _world_of_one(out: Path) -> dict:
    import torch

    from emulated_cuda import DeviceMixError, emulated_cuda
    from training_data import run_config, tiny_hf_dir

    hf_dir = tiny_hf_dir(out)
    batch, prep = _batch(hf_dir, COMPLETIONS, ADVANTAGES)
    reference = _transformers_logprobs(hf_dir, batch, prep)
    report: dict = {}
    with emulated_cuda():
        from megatron_vr1.commands.train import train
        from megatron_vr1.data.synth import build_synth
        from megatron_vr1.parallel import state
        from megatron_vr1.training.policy import Policy, grpo_loss_fn

        assert torch.cuda.is_available()
        for layout, parallel in (("padded", {"micro_batch_size": 3}),
                                 ("packed", {"micro_batch_size": 4, "pack_groups": True}),
                                 ("bf16", {"micro_batch_size": 3})):
            # KL to a reference model, truncated importance sampling and PPO ratios: every loss input is used.
            cfg = run_config(hf_dir, out / layout, beta=0.04, tis=True, lr=1e-3, lr_schedule="constant")
            cfg.parallel.backend = "gloo"  # one process: gloo carries the emulated device's data
            if layout == "bf16":  # megatron's mixed-precision optimizer (fp32 main params) and casts
                cfg.model.dtype = "bfloat16"
            for key, value in parallel.items():
                setattr(cfg.parallel, key, value)
            state.initialize(cfg.parallel)
            try:
                policy = Policy(cfg)
                report[layout] = _step_report(policy, batch, cfg)
                p = len(prep.prompt_ids)
                report[layout]["max_gap_vs_transformers"] = max(
                    float((batch.old_logprobs[row, p:p + len(ids)] - torch.tensor(ref[:len(ids)])).abs().max())
                    for row, (ids, ref) in enumerate(zip(COMPLETIONS, reference)))
                if layout == "packed":
                    def leaky_loss(**kw):  # a loss that builds a CPU tensor, as the old trainer's inputs were
                        loss, metrics = grpo_loss_fn(cfg)(**kw)
                        return loss + (kw["logprobs"] * torch.ones(kw["logprobs"].shape)).sum() * 0, metrics

                    try:
                        policy.train_step(batch, leaky_loss)
                        report["stray_cpu_tensor_error"] = "none raised"
                    except DeviceMixError as e:
                        report["stray_cpu_tensor_error"] = str(e)
                batch.ref_logprobs = batch.old_logprobs = None
            finally:
                state.destroy()

        # The trainer's own loop, rollout engine on the device (no checkpoint: dist_checkpointing writes real
        # storage, which the emulated tensors' meta wrappers do not have).
        paths = build_synth(out / "data", n=8, seed=0)
        cfg = run_config(hf_dir, out / "loop", train_steps=2, beta=0.04)
        cfg.parallel.backend, cfg.checkpoint.save_interval = "gloo", 0
        cfg.rollout.max_new_tokens = 6
        cfg.data.train_path = str(paths["train"])
        engines = []
        from megatron_vr1.training import engines as engine_module

        build = engine_module.build_engine
        engine_module.build_engine = lambda *a, **k: engines.append(build(*a, **k)) or engines[-1]
        try:
            records = train(cfg)
        finally:
            engine_module.build_engine = build
        engine = engines[0]
        report["loop"] = {"steps": len(records), "weight_version": records[-1]["weight_version"],
                          "engine_weight_version": engine.weight_version,
                          "engine_device": str(next(iter(engine._params.values())).device) if engine.model is None
                          else str(next(engine.model.parameters()).device),
                          "last": {k: v for k, v in records[-1].items() if isinstance(v, float)}}
    return report


LAYOUTS = {"dp2": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}


def _two_ranks(out: Path) -> dict:
    from emulated_cuda import emulated_cuda
    from training_data import run_config, tiny_hf_dir

    hf_dir = tiny_hf_dir(out)
    report = {}
    with emulated_cuda():
        from megatron_vr1.parallel import state
        from megatron_vr1.training.policy import Policy

        for name, (tp, pp) in LAYOUTS.items():
            batch, _prep = _batch(hf_dir, COMPLETIONS, ADVANTAGES)
            cfg = run_config(hf_dir, out / name, beta=0.04, tis=True, lr=1e-3, lr_schedule="constant")
            cfg.parallel.backend, cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel = "gloo", tp, pp
            state.initialize(cfg.parallel)
            report[name] = _step_report(Policy(cfg), batch, cfg)
        state.destroy()  # once: re-initialising after a destroy desynchronises the ranks' group creation
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", choices=["one", "ranks"], required=True)
    args = parser.parse_args()
    sys.path.insert(0, str(TESTS))
    out = Path(args.out)
    report = _world_of_one(out) if args.mode == "one" else _two_ranks(out)
    (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
