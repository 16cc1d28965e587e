"""``convert verify``: run one image+text prompt through the HF model and the converted Megatron model (at any
TP/PP) and compare the logits, like Megatron-Bridge's compare script. A user-facing check of a conversion.

The prompt is built from the config's special token ids (no tokenizer needed): text, an image of 4x4 patches
(4 merged image tokens), text. Logits of the padded vocabulary are cut to the HF vocabulary before comparing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_vr1.convert.arch import arch_from_config, load_config
from megatron_vr1.convert.errors import ConversionError
from megatron_vr1.convert.mcore_ckpt import load_checkpoint
from megatron_vr1.convert.session import (build, check_layout, checkpoint_dtype, checkpoint_padded_vocab,
                                          ensure_parallel)


@dataclass(frozen=True, slots=True)
class Prompt:
    input_ids: torch.Tensor              # [1, S]
    pixel_values: torch.Tensor | None    # [patches, C*T*P*P]
    image_grid_thw: torch.Tensor | None  # [1, 3]


@dataclass(frozen=True, slots=True)
class VerifyResult:
    max_abs_diff: float
    max_rel_diff: float
    """max |mcore - hf| / max |hf|: the error relative to the logit scale."""
    tokens: int
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def summary(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        return (f"{verdict}: max |logit diff| = {self.max_abs_diff:.3e}, relative = {self.max_rel_diff:.3e} over "
                f"{self.tokens} tokens (tolerance {self.tolerance:.1e})")


def verification_prompt(hf_config: dict, seed: int = 0) -> Prompt:
    """A fixed image+text prompt for a Qwen2.5-VL config (text only for a Qwen2 config)."""
    arch = arch_from_config(hf_config)
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(20, arch.vocab_size, (n,), generator=g)  # noqa: E731  (skip special ids)
    if not arch.has_vision:
        return Prompt(text(24)[None], None, None)
    vision = hf_config.get("vision_config") or {}
    patch, temporal = int(vision.get("patch_size", 14)), int(vision.get("temporal_patch_size", 2))
    merge = int(vision.get("spatial_merge_size", 2))
    grid = (1, 2 * merge, 2 * merge)
    n_tokens = grid[1] * grid[2] // merge**2
    ids = torch.cat([text(8), torch.tensor([hf_config["vision_start_token_id"]]),
                     torch.full((n_tokens,), hf_config["image_token_id"]),
                     torch.tensor([hf_config["vision_end_token_id"]]), text(8)])
    pixels = torch.randn(grid[0] * grid[1] * grid[2], 3 * temporal * patch * patch, generator=g)
    return Prompt(ids[None], pixels, torch.tensor([list(grid)]))


def load_hf_model(hf_dir: str | Path, dtype: torch.dtype):
    """The transformers model of ``hf_dir``, built from its config and filled from its safetensors.

    Not ``from_pretrained``: with torch.distributed initialised, transformers 5.23's from_pretrained leaves the
    non-persistent rotary ``inv_freq`` buffers uninitialised (garbage logits; seen in this repo's CPU runs).
    Constructing the module computes them; the weights are then copied by name (in-memory layout).
    """
    import transformers

    from megatron_vr1.convert.names import to_memory_layout
    from megatron_vr1.convert.safetensors_io import SafetensorsReader

    config = load_config(hf_dir)
    arch = arch_from_config(config)
    if arch.has_vision:
        cls, cfg = transformers.Qwen2_5_VLForConditionalGeneration, transformers.Qwen2_5_VLConfig(**config)
    else:
        cls, cfg = transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**config)
    model = cls(cfg).to(dtype).eval()
    reader = SafetensorsReader(hf_dir)
    state = {to_memory_layout(n, arch.has_vision): reader.get(n).to(dtype) for n in reader.names()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (arch.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        name = (missing or unexpected)[0]
        raise ConversionError(f"{hf_dir}: tensor {name!r} is {'missing' if missing else 'unexpected'} for "
                              f"{cls.__name__}; the config.json does not match the weights")
    if arch.tie_word_embeddings:
        model.tie_weights()
    return model, config


def hf_logits(hf_dir: str | Path, prompt: Prompt, dtype: torch.dtype) -> torch.Tensor:
    """Logits [1, S, V] of the transformers model in ``hf_dir``."""
    model, config = load_hf_model(hf_dir, dtype)
    kwargs: dict[str, Any] = {}
    if prompt.pixel_values is not None:
        kwargs = dict(pixel_values=prompt.pixel_values.to(dtype), image_grid_thw=prompt.image_grid_thw,
                      mm_token_type_ids=(prompt.input_ids == config["image_token_id"]).int())
    with torch.no_grad():
        return model(input_ids=prompt.input_ids, use_cache=False, **kwargs).logits.float()


def megatron_logits(model, hf_config: dict, prompt: Prompt) -> torch.Tensor | None:
    """Full-vocabulary logits [1, S, V] of this rank's model chunk run through megatron's forward-only pipeline
    schedule; returned on global rank 0 (None elsewhere). Collective over the model-parallel group."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_vr1.models.build import mrope_position_ids

    arch = arch_from_config(hf_config)
    ids = prompt.input_ids
    if arch.has_vision:
        positions = mrope_position_ids(ids, prompt.image_grid_thw, hf_config)
    else:
        positions = torch.arange(ids.shape[1])[None]
    captured: list[torch.Tensor] = []

    def forward_step(data_iterator, chunk):
        next(data_iterator)

        def collect(output):
            full = gather_from_tensor_model_parallel_region(output)[..., :arch.vocab_size]
            captured.append(full.float().contiguous())  # the PP broadcast below needs contiguous memory
            zero = output.new_zeros(())
            return zero, {"logits": zero.clone()}

        return chunk(input_ids=ids, position_ids=positions, attention_mask=None, pixel_values=prompt.pixel_values,
                     image_grid_thw=prompt.image_grid_thw), collect

    with torch.no_grad():
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([None]), model=[model],
                                    num_microbatches=1, seq_length=ids.shape[1], micro_batch_size=1,
                                    forward_only=True)
    logits = captured[0] if captured else torch.empty(1, ids.shape[1], arch.vocab_size)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(logits, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return logits if dist.get_rank() == 0 else None


def compare(mcore: torch.Tensor, hf: torch.Tensor, tolerance: float) -> VerifyResult:
    diff = (mcore - hf).abs()
    scale = hf.abs().max().clamp_min(1e-30)
    return VerifyResult(float(diff.max()), float(diff.max() / scale), int(hf.shape[1]), tolerance)


def verify(hf_dir: str | Path, ckpt_dir: str | Path, *, tp: int = 1, pp: int = 1,
           tolerance: float = 1e-4) -> VerifyResult | None:
    """Compare HF and Megatron logits. Every rank of a (tp, pp) world calls it; rank 0 gets the result."""
    config = load_config(hf_dir)
    check_layout(config, tp, pp)
    padded, dtype = checkpoint_padded_vocab(ckpt_dir), checkpoint_dtype(ckpt_dir)
    ensure_parallel(tp, pp)
    model = build(config, dtype, tp, pp, padded).eval()
    load_checkpoint(model, ckpt_dir)
    prompt = verification_prompt(config)
    mcore = megatron_logits(model, config, prompt)
    if mcore is None:
        return None
    return compare(mcore, hf_logits(hf_dir, prompt, getattr(torch, dtype)), tolerance)
