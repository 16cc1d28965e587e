"""``convert verify``: run one image+text prompt through the HF model and the converted Megatron model (at any
TP/PP) and compare the logits, like Megatron-Bridge's compare script. A user-facing check of a conversion.

The prompt is built from the config's special token ids (no tokenizer needed): text, an image of 4x4 patches
(4 merged image tokens), text. Logits of the padded vocabulary are cut to the HF vocabulary before comparing.

Both models run in float32 by default, whatever the checkpoint's dtype. Upcasting bf16 / fp16 weights to fp32 is
exact, so the two implementations then compute the same function and differ only by fp32 rounding (2-3e-7 of the
logit scale on the tiny test model from fp32, bf16 and fp16 checkpoints, at TP=1 and TP=2): any difference near
1e-4 is a conversion error. Run in bf16 they do not: megatron and transformers round at different points (fused
QKV, TP-split matmuls, summation orders), and a byte-exact bf16 conversion of a held-out Qwen2.5-VL with the 7B
model's widths at TP=4 differed by 9.8e-4 absolute, 7.9e-3 relative to the largest logit, 10x over the old fixed
absolute 1e-4. ``--dtype bfloat16`` / ``checkpoint`` remain for machines without the memory for fp32 copies, with
their own default tolerance.

The tolerance is RELATIVE: max |Megatron logit - HF logit| / max |HF logit|. A relative bound means the same thing
for a random model (largest logit ~0.1-1) and a trained 7B (~30); the summary line prints it next to the
absolute max |logit diff| and the logit scale, the dtype compared in and where the tolerance came from.

Loading: the Megatron model is built in the comparison dtype and the torch_dist checkpoint is loaded into it
directly. megatron-core's planner (``MCoreLoadPlanner``) validates global shapes only, and torch's
``FileSystemReader`` reads each stored tensor and ``copy_``-s it into the destination, which casts; ``direct_load``
takes its zero-copy path only when the dtypes match and otherwise falls back to that reader. So a bf16 checkpoint
lands in an fp32 model exactly, without a bf16 copy of the model in memory (checked by
tests/unit/test_convert_verify_dtype.py). The HF model is loaded only after the Megatron model is dropped.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron_vr1.convert.arch import arch_from_config, load_config
from megatron_vr1.convert.errors import ConversionError
from megatron_vr1.convert.session import (build, check_layout, checkpoint_dtype, checkpoint_padded_vocab,
                                          ensure_parallel)

if TYPE_CHECKING:
    import torch

# torch (and megatron-core) are imported inside the functions: the CLI builds `convert --help` from this module's
# constants without loading torch.


@dataclass(frozen=True, slots=True)
class Prompt:
    input_ids: torch.Tensor              # [1, S]
    pixel_values: torch.Tensor | None    # [patches, C*T*P*P]
    image_grid_thw: torch.Tensor | None  # [1, 3]


VERIFY_DTYPES = ("float32", "bfloat16", "checkpoint")
"""``--dtype`` choices: the dtype both models are loaded and run in (``checkpoint``: the checkpoint's own)."""

DEFAULT_TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}
"""Default relative tolerance (max |logit diff| / max |HF logit|) per comparison dtype.

float32: both sides compute the same function from the same (exactly upcast) weights; fp32 rounding leaves ~3e-7
on the tiny test model, so 1e-4 leaves a wide margin for the longer reductions and depth of a 7B, while a conversion
error (a permuted head, a swapped gate/up half, a wrong vocabulary row, a scale off by one bf16 step) moves the
logits by far more (the test's final norm off by 2^-7 gives 7.8e-3).
bfloat16: bf16 keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3) and each side rounds every layer's output at
different points, so a correct conversion differs by a few units: 5.8e-3 on the tiny test model, 7.9e-3 on a
7B-width model at TP=4. 3e-2 is ~4x the worst seen; it still catches gross mapping errors (O(0.1-1)), but not
small ones: compare in float32 when the memory allows.
float16 (``--dtype checkpoint`` of an fp16 checkpoint): 3 more significant bits than bf16, so the bf16 bound / 8,
rounded up (7.3e-4 measured on the tiny test model)."""


@dataclass(frozen=True, slots=True)
class VerifyResult:
    max_abs_diff: float
    """max |mcore - hf| over the prompt's tokens and the HF vocabulary."""
    max_rel_diff: float
    """max |mcore - hf| / max |hf|: the error relative to the logit scale; what ``tolerance`` bounds."""
    tokens: int
    tolerance: float
    """Bound on ``max_rel_diff``."""
    dtype: str = "float32"
    """The dtype both models ran in."""
    logit_scale: float = 0.0
    """max |hf|, the denominator of ``max_rel_diff``."""
    default_tolerance: bool = False
    """Whether ``tolerance`` is ``DEFAULT_TOLERANCE[dtype]`` (False: given with --tolerance)."""

    @property
    def ok(self) -> bool:
        return self.max_rel_diff <= self.tolerance

    def summary(self) -> str:
        verdict, cmp = ("OK", "<=") if self.ok else ("FAILED", ">")
        source = f"the {self.dtype} default" if self.default_tolerance else "--tolerance"
        return (f"{verdict}: relative logit error {self.max_rel_diff:.3e} {cmp} tolerance {self.tolerance:.1e} "
                f"({source}), compared in {self.dtype} over {self.tokens} tokens; relative = max |logit diff| "
                f"{self.max_abs_diff:.3e} / max |HF logit| {self.logit_scale:.3e}")


def comparison_dtype(dtype: str, ckpt_dir: str | Path) -> str:
    """The dtype to compare in for a ``--dtype`` choice: ``checkpoint`` resolves to the checkpoint's own."""
    if dtype not in VERIFY_DTYPES:
        raise ConversionError(f"--dtype {dtype!r} is not one of {', '.join(VERIFY_DTYPES)}; float32 (the default) "
                              f"compares exactly whatever the checkpoint's dtype")
    return checkpoint_dtype(ckpt_dir) if dtype == "checkpoint" else dtype


def default_tolerance(dtype: str) -> float:
    """The relative tolerance for comparing in ``dtype`` (a resolved dtype, see ``comparison_dtype``)."""
    if dtype not in DEFAULT_TOLERANCE:
        raise ConversionError(f"no default tolerance for comparing in {dtype}; use --dtype float32 or give "
                              f"--tolerance")
    return DEFAULT_TOLERANCE[dtype]


def verification_prompt(hf_config: dict, seed: int = 0) -> Prompt:
    """A fixed image+text prompt for a Qwen2.5-VL config (text only for a Qwen2 config)."""
    import torch

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
    import torch

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
    import torch
    import torch.distributed as dist
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
    device = next(model.parameters()).device  # the run device the model was built on (a GPU when there is one)
    on = lambda t: None if t is None else t.to(device)  # noqa: E731
    ids, positions, pixels, grid = on(ids), on(positions), on(prompt.pixel_values), on(prompt.image_grid_thw)
    captured: list[torch.Tensor] = []

    def forward_step(data_iterator, chunk):
        next(data_iterator)

        def collect(output):
            full = gather_from_tensor_model_parallel_region(output)[..., :arch.vocab_size]
            captured.append(full.float().contiguous())  # the PP broadcast below needs contiguous memory
            zero = output.new_zeros(())
            return zero, {"logits": zero.clone()}

        return chunk(input_ids=ids, position_ids=positions, attention_mask=None, pixel_values=pixels,
                     image_grid_thw=grid), collect

    with torch.no_grad():
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([None]), model=[model],
                                    num_microbatches=1, seq_length=ids.shape[1], micro_batch_size=1,
                                    forward_only=True)
    logits = captured[0] if captured else torch.empty(1, ids.shape[1], arch.vocab_size, device=device)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(logits, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return logits.cpu() if dist.get_rank() == 0 else None  # compared with the HF model's on the host


def compare(mcore: torch.Tensor, hf: torch.Tensor, tolerance: float, *, dtype: str = "float32",
            default_tolerance: bool = False) -> VerifyResult:
    """Max absolute and relative (to max |hf|) difference of two logit tensors, in fp32."""
    mcore, hf = mcore.float(), hf.float()
    diff = (mcore - hf).abs().max()
    scale = hf.abs().max()
    return VerifyResult(float(diff), float(diff / scale.clamp_min(1e-30)), int(hf.shape[1]), tolerance, dtype,
                        float(scale), default_tolerance)


def verify(hf_dir: str | Path, ckpt_dir: str | Path, *, tp: int = 1, pp: int = 1, dtype: str = "float32",
           tolerance: float | None = None, pp_first: int = 0, pp_last: int = 0) -> VerifyResult | None:
    """Compare HF and Megatron logits with both models in ``dtype`` (float32, bfloat16 or checkpoint: the
    checkpoint's own); ``tolerance`` bounds the relative error (default ``DEFAULT_TOLERANCE`` of that dtype).
    ``pp_first`` / ``pp_last``: decoder layers on the first / last pipeline stage (0: an even split). Every rank
    of a (tp, pp) world calls it; rank 0 gets the result."""
    import torch

    from megatron_vr1.convert.mcore_ckpt import load_checkpoint

    config = load_config(hf_dir)
    check_layout(config, tp, pp, pp_first, pp_last)
    padded, dtype = checkpoint_padded_vocab(ckpt_dir), comparison_dtype(dtype, ckpt_dir)
    is_default = tolerance is None
    tolerance = default_tolerance(dtype) if tolerance is None else tolerance
    ensure_parallel(tp, pp, pp_first, pp_last)
    model = build(config, dtype, tp, pp, padded, pp_first, pp_last).eval()
    load_checkpoint(model, ckpt_dir)  # casts the stored tensors to ``dtype`` (module docstring)
    prompt = verification_prompt(config)
    mcore = megatron_logits(model, config, prompt)
    del model  # rank 0 then holds one model at a time: this shard, then the whole HF model
    gc.collect()
    if mcore is None:
        return None
    return compare(mcore, hf_logits(hf_dir, prompt, getattr(torch, dtype)), tolerance, dtype=dtype,
                   default_tolerance=is_default)
