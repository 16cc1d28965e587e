"""Layer-spec and kernel selection: the one place that probes Transformer Engine and the other fused kernels.

- ``transformer_impl="auto"`` uses the TE spec when ``transformer_engine.pytorch`` imports, else the local spec.
- The local spec's core attention is megatron's unfused DotProductAttention on CPU and torch SDPA
  (``SDPAttention``) on GPU: the unfused path materialises [b, heads, s, s] scores, ran out of memory at
  4x2048 tokens on an H100 and reached 18% of the bf16 matmul ceiling (issue #5).
- FP8 needs TE; asking for it without TE fails here, when the model is built, with what to install.
- ``fusion_settings``: the TransformerConfig fusion fields the installed stack supports (the trainer, the
  converters and ``bench train`` all build through ``models.build``, so they run the same kernels);
  ``ddp_settings``: megatron DDP's communication overlap for the data-parallel size.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from megatron_vr1.config.base import ConfigError
from megatron_vr1.config.model import ModelConfig


class MissingTransformerEngine(ImportError):
    """The config asks for a Transformer Engine feature but TE is not importable."""


@functools.lru_cache(maxsize=1)
def transformer_engine_error() -> str | None:
    """None when ``transformer_engine.pytorch`` imports; otherwise why it does not (import is side-effect free)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # ImportError, or OSError / FileNotFoundError from a TE without its torch library
        return f"{type(e).__name__}: {e}"
    return None


def have_transformer_engine() -> bool:
    return transformer_engine_error() is None


def resolve_impl(model_cfg: ModelConfig) -> str:
    """"transformer_engine" or "local" for this config on this machine; raises when TE is required but absent."""
    te_error = transformer_engine_error()
    wants_te = model_cfg.transformer_impl == "transformer_engine" or model_cfg.fp8 != "none"
    if wants_te and te_error is not None:
        what = f"model.fp8={model_cfg.fp8}" if model_cfg.fp8 != "none" else "model.transformer_impl=transformer_engine"
        raise MissingTransformerEngine(
            f"{what} needs Transformer Engine, which does not import here ({te_error}). Install it on a CUDA "
            f"machine (pip install --no-build-isolation 'transformer-engine[pytorch]'; see "
            f"docs/gpu.md for a tested build) or set model.fp8=none and "
            f"model.transformer_impl=auto to use the local spec.")
    if model_cfg.transformer_impl == "local":
        return "local"
    if model_cfg.transformer_impl == "transformer_engine" or te_error is None:
        return "transformer_engine"
    return "local"


def resolve_attention(model_cfg: ModelConfig) -> str:
    """Core attention for the local spec: "sdpa" or "local" (megatron's unfused DotProductAttention)."""
    if model_cfg.attention_backend != "auto":
        return model_cfg.attention_backend
    return "sdpa" if torch.cuda.is_available() else "local"


def gpt_layer_spec(model_cfg: ModelConfig):
    """The megatron-core TransformerLayer spec of a Qwen2 decoder block for this config."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    impl = resolve_impl(model_cfg)
    if impl == "transformer_engine":
        if model_cfg.attention_backend == "sdpa":
            raise ConfigError("model.attention_backend='sdpa' is invalid with the Transformer Engine spec: TE brings "
                              "its own fused attention; set model.attention_backend=auto or model.transformer_impl=local")
        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    if resolve_attention(model_cfg) == "sdpa":
        from megatron_vr1.models.sdpa_attention import SDPAttention

        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


# ---- fused kernels ------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class KernelStack:
    """What this machine offers beyond plain torch (probed once by ``kernel_stack``)."""

    cuda: bool
    transformer_engine: bool
    apex_wgrad_accumulation: bool
    """apex's ``fused_weight_gradient_mlp_cuda`` (megatron's local linear layers fuse wgrad accumulation with it)."""
    masked_softmax_kernels: bool
    """megatron's ``scaled_masked_softmax_cuda`` (built with apex / Megatron-LM's fused kernels)."""


def _imports(module: str) -> bool:
    try:
        __import__(module)
    except Exception:  # ImportError, or an OSError from a kernel built against another torch
        return False
    return True


@functools.lru_cache(maxsize=1)
def kernel_stack() -> KernelStack:
    cuda = torch.cuda.is_available()
    return KernelStack(cuda=cuda, transformer_engine=cuda and have_transformer_engine(),
                       apex_wgrad_accumulation=cuda and _imports("fused_weight_gradient_mlp_cuda"),
                       masked_softmax_kernels=cuda and _imports("scaled_masked_softmax_cuda"))


def fusion_settings(model_cfg: ModelConfig, stack: KernelStack, *, rows_per_micro_batch: int,
                    mrope: bool) -> dict[str, bool]:
    """TransformerConfig fusion fields for ``model_cfg`` on ``stack`` (pure: the caller probes the stack).

    - bias-SwiGLU and bias-dropout-add: megatron's jit-fused CUDA paths, any CUDA machine;
    - fused RoPE: TE's kernel; with M-RoPE only for one row per micro-batch (megatron falls back, with a warning,
      for mrope at batch > 1 in the bshd layout);
    - gradient-accumulation fusion (wgrad GEMM accumulating straight into DDP's fp32 ``main_grad``): TE's linear
      layers under the TE spec, apex's kernel under the local spec;
    - masked-softmax fusion: megatron's kernels, used by the local unfused attention only.
    On the CPU every field is False (these are CUDA kernels)."""
    if not stack.cuda:
        return dict(bias_activation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
                    gradient_accumulation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False)
    te_spec = resolve_impl(model_cfg) == "transformer_engine"
    return dict(
        bias_activation_fusion=True, bias_dropout_fusion=True,
        apply_rope_fusion=stack.transformer_engine and (not mrope or rows_per_micro_batch == 1),
        gradient_accumulation_fusion=stack.transformer_engine if te_spec else stack.apex_wgrad_accumulation,
        masked_softmax_fusion=stack.masked_softmax_kernels and not te_spec,
        persist_layer_norm=False)  # apex's persistent LayerNorm; Qwen uses RMSNorm (TE's or torch's)


def ddp_settings(data_parallel_size: int, distributed_optimizer: bool = False) -> dict[str, bool]:
    """megatron DistributedDataParallelConfig fields: gradients reduced in fp32; with DP > 1 each bucket's
    all-reduce (reduce-scatter under the distributed optimizer) starts as soon as its gradients are ready,
    overlapping the rest of the backward pass.

    The distributed optimizer's parameter all-gather is not overlapped with the next forward
    (``overlap_param_gather``): the RL loop reads the new weights right after every optimizer step (weight sync to
    the rollout engine, logprobs, checkpoints), each of which would first have to force the pending gather; the
    gather runs inside ``optimizer.step()`` instead."""
    return dict(grad_reduce_in_fp32=True, overlap_grad_reduce=data_parallel_size > 1,
                use_distributed_optimizer=distributed_optimizer)


def sequence_multiple(model_cfg: ModelConfig, parallel_cfg) -> int:
    """What every micro-batch's sequence length must be a multiple of: the TP size under sequence parallelism
    (the sequence is split over the TP ranks), times TE's FP8 GEMM alignment under FP8 (megatron's
    ``get_fp8_align_size``: 16, or 32 for MXFP8; each rank's shard of the sequence must be aligned)."""
    multiple = parallel_cfg.tensor_parallel if parallel_cfg.sequence_parallel else 1
    if model_cfg.fp8 != "none":
        from megatron.core.enums import Fp8Recipe
        from megatron.core.fp8_utils import get_fp8_align_size

        multiple *= get_fp8_align_size(Fp8Recipe(model_cfg.fp8_recipe))
    return multiple
