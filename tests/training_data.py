"""Test-only inputs for the training tests: a tiny HF Qwen2.5-VL directory, synthetic one-object Samples
(PNG bytes drawn here) and a RunConfig sized for seconds-long CPU runs."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import random
from pathlib import Path

from megatron_vr1.types import GroundTruth, Sample

LABELS = ("circle", "square", "triangle")
PROBLEM = ("Locate every item from the category list in the image and output the coordinates in JSON format. "
           "The category set includes circle, square, triangle.")


def tiny_hf_dir(root: Path, preset: str = "test") -> Path:
    from megatron_vr1.data.tiny_model import build_tiny_model

    out = Path(root) / f"tiny-{preset}"
    if not (out / "config.json").is_file():
        build_tiny_model(out, preset=preset, seed=0)
    return out


def make_sample(i: int, size: int = 56) -> Sample:
    """One square in a plain image; the box is in original pixels (= input pixels at 56x56)."""
    from PIL import Image, ImageDraw

    rng = random.Random(i)
    side = rng.randint(12, 24)
    x, y = rng.randint(0, size - side), rng.randint(0, size - side)
    im = Image.new("RGB", (size, size), (220, 220, 220))
    ImageDraw.Draw(im).rectangle([x, y, x + side, y + side], fill=(200, 30, 30))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return Sample(sample_id=f"synthetic-{i}", problem=PROBLEM, image=buf.getvalue(),
                  solution=(GroundTruth(label="square", box=(x, y, x + side, y + side)),), width=size, height=size,
                  input_width=size, input_height=size, num_instances=1,
                  target_id_maps={"circle": 1, "square": 2, "triangle": 3}, source="test")


def run_config(hf_dir: Path, run_dir: Path, **grpo):
    from megatron_vr1.config.run import RunConfig

    cfg = RunConfig.from_dict({
        "name": "test", "model": {"hf_path": str(hf_dir), "dtype": "float32", "transformer_impl": "local"},
        "rollout": {"engine": "hf", "max_new_tokens": 12, "temperature": 1.0, "sync_transport": "tensor"},
        "grpo": {"num_generations": 2, "prompts_per_step": 2, "train_steps": 3, "lr": 1e-3, **grpo},
        "data": {"min_pixels": 56 * 56, "max_pixels": 56 * 56},
        "checkpoint": {"save_interval": 100},
        "log": {"run_dir": str(run_dir), "progress": False}})
    return cfg


@contextlib.contextmanager
def world_of_one():
    """megatron-core's parallel state for this one process. parallel.state picks its own free port; exporting
    RANK/WORLD_SIZE here instead would leak into every child process of the test session and make it act as a
    torchrun rank."""
    from megatron_vr1.config.parallel import ParallelConfig
    from megatron_vr1.parallel import state

    state.initialize(ParallelConfig())
    try:
        yield
    finally:
        state.destroy()


def layout_hf_dir(root: Path) -> Path:
    """A tiny Qwen2.5-VL that every shipped layout fits: 8 attention / 4 key-value heads (TP 1, 2, 4) and an odd
    3 layers (PP 2 or 3 only with uneven stages)."""
    from megatron_vr1.data.tiny_model import PRESETS, build_model_dir

    out = Path(root) / "tiny-layouts"
    if not (out / "config.json").is_file():
        spec = dataclasses.replace(PRESETS["test"], num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=4)
        build_model_dir(out, spec, seed=0)
    return out


def completion_batch(hf_dir: Path, completions: list[list[int]], advantages: list[float], *, eos: bool = True,
                     logprob: float = -1.0, finish_reason: str = "stop"):
    """(TrainBatch, PreparedPrompt, tokenizer): one group of ``completions`` (token ids) behind make_sample(0)'s
    prompt, rollout logprobs all ``logprob``; ``eos``: the loss stops at <|im_end|>."""
    import torch
    from transformers import AutoTokenizer

    from megatron_vr1.training.batch import build_train_batch, prepare_prompt
    from megatron_vr1.types import Completion, RolloutGroup

    tok = AutoTokenizer.from_pretrained(hf_dir)
    prep = prepare_prompt(make_sample(0), tok, min_pixels=56 * 56, max_pixels=56 * 56)
    comps = tuple(Completion(sample_id="s", request_id=f"r{i}", text="", token_ids=tuple(ids),
                             logprobs=tuple([logprob] * len(ids)), finish_reason=finish_reason, weight_version=0)
                  for i, ids in enumerate(completions))
    group = RolloutGroup(sample=prep.sample, completions=comps)
    eos_ids = [tok.convert_tokens_to_ids("<|im_end|>")] if eos else []
    return build_train_batch([group], [prep], torch.tensor(advantages), eos_ids=eos_ids), prep, tok
