"""Layer-spec selection: the one place that probes Transformer Engine.

- ``transformer_impl="auto"`` uses the TE spec when ``transformer_engine.pytorch`` imports, else the local spec.
- The local spec's core attention is megatron's unfused DotProductAttention on CPU and torch SDPA
  (``SDPAttention``) on GPU: the unfused path materialises [b, heads, s, s] scores, ran out of memory at
  4x2048 tokens on an H100 and reached 18% of the bf16 matmul ceiling (issue #5).
- FP8 needs TE; asking for it without TE fails here, when the model is built, with what to install.
"""

from __future__ import annotations

import functools

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
            f"shared/recipes/gpu-device.md for a tested build) or set model.fp8=none and "
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
