"""The trainer on CUDA GPUs: the GRPO train step of ``Policy`` (reference and policy logprobs, forward, backward,
optimizer step, weight export) in fp32 and bf16 against transformers on the same GPU; FP8 with the default
(delayed) recipe when Transformer Engine imports; TP=2 and PP=2 against TP=1 over NCCL when two GPUs exist.
Skipped without CUDA (the suite hides GPUs: run ``CUDA_VISIBLE_DEVICES=0,1 pytest tests/gpu``). The CPU suite
checks the same placement on an emulated device (tests/unit/test_device_placement.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

WORKER = Path(__file__).parents[1] / "distributed" / "grpo_step_worker.py"
COMPLETIONS = [[40, 41, 42, 43, 44], [50, 51], [60, 61, 62], [70]]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from training_data import tiny_hf_dir

    return tiny_hf_dir(tmp_path_factory.mktemp("gpu-policy"))


@pytest.fixture
def world():
    from megatron_vr1.config.parallel import ParallelConfig
    from megatron_vr1.parallel import state

    state.initialize(ParallelConfig())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    state.destroy()


def _batch(hf_dir):
    from training_data import completion_batch

    batch, prep, _tok = completion_batch(hf_dir, COMPLETIONS, [1.0, -1.0, 0.5, -0.5], eos=False, logprob=-2.0,
                                         finish_reason="length")
    return batch, prep


def _transformers_logprobs(hf_dir, batch, prep, dtype):
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=dtype,
                                                            attn_implementation="sdpa").cuda().eval()
    p, out = len(prep.prompt_ids), []
    for b, ids_list in enumerate(COMPLETIONS):
        ids = batch.input_ids[b:b + 1, :int(batch.lengths[b])].cuda()
        with torch.no_grad():
            logits = hf(input_ids=ids, pixel_values=prep.pixel_values.cuda(),
                        image_grid_thw=batch.image_grid_thw[int(batch.group_ids[b])][None].cuda(),
                        mm_token_type_ids=(ids == hf.config.image_token_id).int()).logits.float()
        lp = torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0].cpu()
        out.append(lp[p - 1:p - 1 + len(ids_list)])
    return out


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 0.1)])
def test_grpo_train_step_on_gpu(world, hf_dir, tmp_path, dtype, tol):
    from training_data import run_config

    from megatron_vr1.training.policy import Policy, grpo_loss_fn

    cfg = run_config(hf_dir, tmp_path / "run", beta=0.04, tis=True, lr=1e-3, lr_schedule="constant")
    cfg.model.dtype = dtype
    policy = Policy(cfg)
    assert {p.device.type for p in policy.model.parameters()} == {"cuda"}
    batch, prep = _batch(hf_dir)
    batch.ref_logprobs = policy.logprobs(batch, reference=True)
    before = batch.old_logprobs = policy.logprobs(batch)
    p = len(prep.prompt_ids)
    for row, ref in enumerate(_transformers_logprobs(hf_dir, batch, prep, getattr(torch, dtype))):
        ours = before[row, p:p + len(COMPLETIONS[row])]
        assert (ours - ref).abs().max() < tol, (row, ours, ref)
    step = policy.train_step(batch, grpo_loss_fn(cfg))
    assert math.isfinite(step.grad_norm) and step.grad_norm > 0
    after = policy.logprobs(batch)
    seq = lambda lp, b: float((lp[b] * batch.loss_mask[b]).sum())  # noqa: E731
    assert seq(after, 0) > seq(before, 0), "the positive-advantage completion must become more likely"
    assert seq(after, 1) < seq(before, 1), "the negative-advantage completion must become less likely"
    exported = [t for bucket in policy.export_buckets(1 << 20) for _, t in bucket]
    assert {t.device.type for t in exported} == {"cuda"}


def test_fp8_delayed_train_step(world, hf_dir, tmp_path):
    """FP8 with the default (delayed) recipe: the odd-length rows are padded to TE's alignment by the trainer."""
    from training_data import run_config

    from megatron_vr1.models.specs import have_transformer_engine
    from megatron_vr1.training.policy import Policy, grpo_loss_fn

    if not have_transformer_engine():
        pytest.skip("Transformer Engine is not installed")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs Ada / Hopper or newer")
    results = {}
    for fp8 in ("none", "hybrid"):
        cfg = run_config(hf_dir, tmp_path / fp8, beta=0.0, lr=1e-3, lr_schedule="constant")
        cfg.model.dtype, cfg.model.transformer_impl, cfg.model.fp8 = "bfloat16", "transformer_engine", fp8
        assert cfg.model.fp8_recipe == "delayed"
        policy = Policy(cfg)
        assert policy.length_multiple == (16 if fp8 != "none" else 1)
        batch, _ = _batch(hf_dir)
        lp = policy.logprobs(batch)
        step = policy.train_step(batch, grpo_loss_fn(cfg))
        assert math.isfinite(step.grad_norm) and all(math.isfinite(v) for v in step.metrics.values())
        results[fp8] = lp
    # FP8 on a 64-wide toy model is a smoke test of the path; accuracy on real shapes: tools/gpu_acceptance.sh.
    mask = batch.loss_mask > 0
    assert (results["hybrid"][mask] - results["none"][mask]).abs().max() < 0.5


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("aggregation", ["sequence", "token"])
def test_tp2_and_pp2_equal_tp1_over_nccl(tmp_path, hf_dir, aggregation):
    from helpers import torchrun

    layouts = "tp1,tp2,pp2,dp2_distopt"  # SP on a GPU needs TE's norm; the worker's layouts use the local spec
    ranks = torchrun(WORKER, 2, ["--hf-dir", str(hf_dir), "--aggregation", aggregation, "--layouts", layouts],
                     tmp_path / "out", timeout=600, gpus=True)
    base = ranks[0]["tp1"]
    for r in ranks:
        for name in layouts.split(",")[1:]:
            got = r[name]
            assert got["grad_norm"] == pytest.approx(base["grad_norm"], rel=1e-4), name
            assert got["weight_max_abs_diff"] < 1e-4, name
