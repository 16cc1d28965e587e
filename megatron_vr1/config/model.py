"""ModelConfig: which checkpoint, which layer implementation, precision."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_vr1.config.base import require


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    hf_path: str = ""
    """Directory of a Hugging Face Qwen2.5-VL checkpoint (config.json + safetensors + processor files)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Parameter / compute dtype of the policy."""
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """Layer spec: Transformer Engine when it imports ("auto"), else megatron-core's local spec."""
    attention_backend: Literal["auto", "local", "sdpa"] = "auto"
    """Attention without TE: torch SDPA (flash) on GPU, megatron's unfused local attention on CPU."""
    fp8: Literal["none", "e4m3", "hybrid"] = "none"
    """FP8 training through Transformer Engine (needs TE and a Hopper-or-newer GPU)."""
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise"] = "delayed"
    fp8_param_gather: bool = False
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation."""
    freeze_vision: bool = False
    """Keep the vision tower and merger frozen."""
    make_vocab_size_divisible_by: int = 128
    """The vocabulary is padded to a multiple of this times the tensor-parallel size."""

    def __post_init__(self) -> None:
        require(self.make_vocab_size_divisible_by >= 1, "model.make_vocab_size_divisible_by",
                self.make_vocab_size_divisible_by, "use a positive integer such as 128")
        require(self.fp8 == "none" or self.dtype == "bfloat16", "model.fp8", self.fp8,
                "FP8 training keeps bf16 master compute; set model.dtype=bfloat16 or model.fp8=none")
        require(self.fp8 == "none" or self.transformer_impl != "local", "model.fp8", self.fp8,
                "FP8 needs the Transformer Engine spec; set model.transformer_impl=auto or transformer_engine")
