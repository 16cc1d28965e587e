"""Hugging Face config -> megatron-core TransformerConfig, derived from the HF fields, never hand-copied.

Handles Qwen2 / Qwen2.5 language models and Qwen2.5-VL in both spellings of its config.json:
transformers 5 writes a nested ``text_config`` with ``rope_parameters``; hub checkpoints from the 4.x era are
flat (top-level ``hidden_size``, ``rope_theta``, ``rope_scaling.mrope_section``). Accepts a transformers
``PretrainedConfig`` or the plain dict of a config.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from megatron_vr1.config.base import ConfigError
from megatron_vr1.config.model import ModelConfig
from megatron_vr1.config.parallel import ParallelConfig, check_layout

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True)
class TextArch:
    """The language-model fields megatron needs, read from either config layout."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...] | None
    tie_word_embeddings: bool
    max_position_embeddings: int
    initializer_range: float
    attention_dropout: float
    hidden_act: str


def _as_dict(cfg: Any) -> dict:
    if isinstance(cfg, dict):
        return cfg
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    raise ConfigError(f"hf_config: expected a transformers PretrainedConfig or a config.json dict, got {type(cfg)}")


def _get(d: dict, key: str, where: str, default: Any = ...) -> Any:
    if key in d and d[key] is not None:
        return d[key]
    if default is ...:
        raise ConfigError(f"hf_config: field {key!r} is missing in {where}; is this a Qwen2 / Qwen2.5-VL config.json?")
    return default


def text_arch(hf_config: Any) -> TextArch:
    """The language-model architecture of a Qwen2 / Qwen2.5 / Qwen2.5-VL config (nested or flat)."""
    top = _as_dict(hf_config)
    text = top.get("text_config") or top
    where = "text_config" if text is not top else "config"
    # rope: v5 keeps theta and mrope_section in rope_parameters; 4.x in rope_theta / rope_scaling.
    rope = dict(text.get("rope_parameters") or {})
    for legacy in (text.get("rope_scaling"), top.get("rope_scaling")):
        if isinstance(legacy, dict):
            rope = {**legacy, **rope}
    theta = rope.get("rope_theta", text.get("rope_theta", top.get("rope_theta", 10000.0)))
    section = rope.get("mrope_section")
    heads = int(_get(text, "num_attention_heads", where))
    hidden = int(_get(text, "hidden_size", where))
    head_dim = int(text.get("head_dim") or hidden // heads)
    if section is not None and 2 * sum(section) != head_dim:
        raise ConfigError(f"hf_config: {where}.rope mrope_section={list(section)} must sum to head_dim/2 = "
                          f"{head_dim // 2}; fix the config.json")
    # tie_word_embeddings lives on the top-level config for Qwen2.5-VL, on the config itself for Qwen2.
    tie = top.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    return TextArch(
        vocab_size=int(_get(text, "vocab_size", where)), hidden_size=hidden,
        intermediate_size=int(_get(text, "intermediate_size", where)),
        num_layers=int(_get(text, "num_hidden_layers", where)), num_heads=heads,
        num_kv_heads=int(text.get("num_key_value_heads") or heads), head_dim=head_dim,
        rms_norm_eps=float(_get(text, "rms_norm_eps", where, 1e-6)), rope_theta=float(theta),
        mrope_section=tuple(int(s) for s in section) if section is not None else None,
        tie_word_embeddings=bool(tie), max_position_embeddings=int(text.get("max_position_embeddings") or 32768),
        initializer_range=float(text.get("initializer_range") or 0.02),
        attention_dropout=float(text.get("attention_dropout") or 0.0), hidden_act=str(text.get("hidden_act", "silu")))


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """The vocabulary padded up to a multiple of ``multiple * tp`` so every TP shard has equal, aligned rows."""
    if vocab_size < 1 or tp < 1 or multiple < 1:
        raise ConfigError(f"padded_vocab_size: vocab_size={vocab_size}, tp={tp}, multiple={multiple} must be >= 1")
    step = multiple * tp
    return ((vocab_size + step - 1) // step) * step


def torch_dtype(model_cfg: ModelConfig) -> torch.dtype:
    return _DTYPES[model_cfg.dtype]


def transformer_config_from_hf(hf_config: Any, model_cfg: ModelConfig, parallel_cfg: ParallelConfig):
    """A megatron-core TransformerConfig for the language model of ``hf_config``.

    Qwen2 blocks: RMSNorm, SwiGLU MLP without biases, GQA attention with a QKV bias and no output bias,
    RoPE (M-RoPE when the config has ``mrope_section``). The fused kernels are those ``specs.fusion_settings``
    finds installed (none on the CPU); FP8 options are passed through for the Transformer Engine spec (checked
    in ``specs``). A packed micro-batch (``parallel.pack_groups``) of ``micro_batch_size`` > 1 may hold several
    rows, so it is counted as several for the M-RoPE fusion rule.
    """
    from megatron.core.transformer import TransformerConfig

    from megatron_vr1.models.specs import fusion_settings, kernel_stack

    arch = text_arch(hf_config)
    if arch.hidden_act != "silu":
        raise ConfigError(f"hf_config: hidden_act={arch.hidden_act!r} is not supported; Qwen2 models use 'silu'")
    check_layout(parallel_cfg, num_heads=arch.num_heads, num_kv_heads=arch.num_kv_heads, num_layers=arch.num_layers)
    dtype = torch_dtype(model_cfg)
    on_gpu = torch.cuda.is_available()
    recompute = {}
    if model_cfg.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif model_cfg.recompute == "selective":
        recompute = dict(recompute_granularity="selective")
    fp8 = {}
    if model_cfg.fp8 != "none":
        fp8 = dict(fp8=model_cfg.fp8, fp8_recipe=model_cfg.fp8_recipe, fp8_param=model_cfg.fp8_param_gather)
    return TransformerConfig(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_heads, num_query_groups=arch.num_kv_heads, kv_channels=arch.head_dim,
        normalization="RMSNorm", layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=True,
        hidden_dropout=0.0, attention_dropout=arch.attention_dropout, init_method_std=arch.initializer_range,
        mrope_section=list(arch.mrope_section) if arch.mrope_section else None,
        tensor_model_parallel_size=parallel_cfg.tensor_parallel,
        pipeline_model_parallel_size=parallel_cfg.pipeline_parallel,
        num_layers_in_first_pipeline_stage=parallel_cfg.pipeline_first_stage_layers or None,
        num_layers_in_last_pipeline_stage=parallel_cfg.pipeline_last_stage_layers or None,
        sequence_parallel=parallel_cfg.sequence_parallel,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        # Micro-batches of different lengths go through the pipeline: exchange shapes before each p2p.
        variable_seq_lengths=parallel_cfg.pipeline_parallel > 1,
        # Dense model; megatron's default MoE dispatcher ("allgather") refuses variable_seq_lengths even so.
        moe_token_dispatcher_type="alltoall",
        attention_softmax_in_fp32=True,
        # CPU init builds the full weight on every rank and slices it: layouts then share exact weights.
        use_cpu_initialization=not on_gpu,
        # The fused kernels this machine has (all off on the CPU); decided in models.specs for every caller.
        **fusion_settings(model_cfg, kernel_stack(), mrope=arch.mrope_section is not None,
                          rows_per_micro_batch=1 if parallel_cfg.micro_batch_size == 1 else 2),
        **recompute, **fp8)
