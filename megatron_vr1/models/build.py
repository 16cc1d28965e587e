"""Build the Qwen2.5-VL policy for this rank's pipeline stage from an HF config and the run's configs."""

from __future__ import annotations

from typing import Any

import torch

from megatron_vr1.config.base import ConfigError
from megatron_vr1.config.model import ModelConfig
from megatron_vr1.config.parallel import ParallelConfig
from megatron_vr1.models.hf_config import padded_vocab_size, text_arch, torch_dtype, transformer_config_from_hf
from megatron_vr1.models.mrope import mrope_position_ids
from megatron_vr1.models.qwen25vl import Qwen25VLModel
from megatron_vr1.models.specs import gpt_layer_spec, resolve_impl
from megatron_vr1.parallel.state import device as run_device

__all__ = ["build_model", "mrope_position_ids"]


def _vision_config(hf_config: Any):
    """The HF vision config object (or None for a text-only Qwen2 config)."""
    if isinstance(hf_config, dict):
        if not hf_config.get("vision_config"):
            return None
        from transformers import Qwen2_5_VLConfig

        hf_config = Qwen2_5_VLConfig(**hf_config)
    return getattr(hf_config, "vision_config", None)


def _image_token_id(hf_config: Any) -> int | None:
    return hf_config.get("image_token_id") if isinstance(hf_config, dict) else getattr(hf_config, "image_token_id", None)


def _broadcast_over_tp(module: torch.nn.Module) -> None:
    """Make the replicated vision tower bit-identical on every TP rank (ranks may have drawn different init)."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    if torch.distributed.get_world_size(group) == 1:
        return
    src = torch.distributed.get_global_rank(group, 0)
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            torch.distributed.broadcast(t.data, src=src, group=group)


def build_model(hf_config: Any, model_cfg: ModelConfig, parallel_cfg: ParallelConfig, *,
                pre_process: bool | None = None, post_process: bool | None = None,
                config_overrides: dict | None = None, device: torch.device | None = None) -> Qwen25VLModel:
    """The policy for this rank: vision tower on the first PP stage, this stage's decoder layers, output layer on
    the last. Needs megatron's parallel state (``parallel.state.initialize``). Raises before building anything
    when the config asks for Transformer Engine features that are not installed. ``config_overrides`` sets extra
    TransformerConfig fields (e.g. ``perform_initialization=False`` for a model about to be loaded). ``device``:
    where the model lives (default: the run device of ``parallel.state.device``: this rank's GPU, else the CPU)."""
    from megatron.core import parallel_state

    spec = gpt_layer_spec(model_cfg)  # fails early (FP8 / TE without TE)
    if parallel_cfg.sequence_parallel and resolve_impl(model_cfg) == "local" and torch.cuda.is_available():
        # On CPU the compatibility layer makes the local torch norm SP-aware; on GPU megatron refuses it.
        raise ConfigError("parallel.sequence_parallel=true needs the Transformer Engine spec on GPU (megatron's "
                          "local torch norm does not support it); install Transformer Engine or set "
                          "parallel.sequence_parallel=false")
    config = transformer_config_from_hf(hf_config, model_cfg, parallel_cfg)
    for key, value in (config_overrides or {}).items():
        if not hasattr(config, key):
            raise ValueError(f"config_overrides: TransformerConfig has no field {key!r}")
        setattr(config, key, value)
    arch = text_arch(hf_config)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    model = Qwen25VLModel(
        config, spec, vision_config=_vision_config(hf_config),
        vocab_size=padded_vocab_size(arch.vocab_size, parallel_cfg.tensor_parallel,
                                     model_cfg.make_vocab_size_divisible_by),
        max_sequence_length=arch.max_position_embeddings, image_token_id=_image_token_id(hf_config),
        rotary_base=arch.rope_theta, mrope=arch.mrope_section is not None,
        tie_word_embeddings=arch.tie_word_embeddings, pre_process=pre_process, post_process=post_process)
    # Cast and place first, then broadcast: NCCL (the TP group on a GPU machine) has no CPU backend.
    model.to(device=device or run_device(), dtype=torch_dtype(model_cfg))
    if model.visual is not None:
        _broadcast_over_tp(model.visual)
        if model_cfg.freeze_vision:
            model.visual.requires_grad_(False)
    return model
