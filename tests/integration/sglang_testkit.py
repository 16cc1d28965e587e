"""What the real-SGLang-server test modules share: the tiny model and image, the request pair, new weights that
visibly move the outputs, and the logprob gap against the in-process reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tiny_vl
from megatron_vr1.rollout.engine import GenerationRequest, SamplingParams
from megatron_vr1.rollout.sglang_server import SGLangNotInstalled, find_sglang_python
from megatron_vr1.weight_sync.buckets import iter_safetensors


def build_assets(root: Path) -> dict:
    """The tiny Qwen2.5-VL and a test image under ``root``; skips the module when SGLang is not installed."""
    try:
        find_sglang_python()
    except SGLangNotInstalled as e:
        pytest.skip(str(e))
    model_dir = tiny_vl.build(root / "tiny")
    image = root / "img.png"
    image.write_bytes(tiny_vl.png_bytes())
    return {"root": root, "model_dir": model_dir, "image": str(image)}


def requests_for(image: str, *, n: int = 2, max_new_tokens: int = 6, tag: str = "") -> list[GenerationRequest]:
    return [
        GenerationRequest(request_id=f"img{tag}", sample_id="s-img", prompt=tiny_vl.IMAGE_PROMPT, image=image,
                          sampling=SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, n=n, seed=11)),
        GenerationRequest(request_id=f"txt{tag}", sample_id="s-txt", prompt=tiny_vl.TEXT_PROMPT,
                          sampling=SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, n=1, seed=5)),
    ]


def max_logprob_gap(groups, requests, reference) -> float:
    """The largest |server - reference| logprob over every token of every completion, none skipped.

    SGLang's CPU engine ignores ``sampling_seed`` (it needs --enable-deterministic-inference), so the sampled
    tokens differ from run to run, and now and then one is ``<|image_pad|>``: the server scores it like any other
    token, and so must both sides here (issue #7 was the engine overwriting that logprob with 0.0, a gap of
    -logprob, e.g. 1.04, in one run of a few)."""
    gap = 0.0
    for req, group in zip(requests, groups):
        for c in group:
            ref = reference.teacher_forced_logprobs(req.prompt, req.image, c.token_ids)
            gap = max(gap, max(abs(a - b) for a, b in zip(c.logprobs, ref)))
    return gap


def perturbed(model_dir, seed: int) -> dict[str, torch.Tensor]:
    """New weights that visibly move the output distribution (what a training step would do, but larger)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in iter_safetensors(model_dir):
        noise = torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype)
        out[name] = t + (0.5 * noise * t.float().std().clamp_min(1e-3)).to(t.dtype) if t.ndim > 1 else t
    out["lm_head.weight"] = out["lm_head.weight"] * 30.0  # sharpen: near-uniform logits would hide differences
    return out
