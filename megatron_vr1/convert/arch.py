"""The language-model shape a converter needs, read from a Qwen2 / Qwen2.5 / Qwen2.5-VL config.json.

Both spellings of config.json are accepted: transformers 5 nests the language model in ``text_config``;
hub (4.x-era) checkpoints are flat. Kept independent of ``megatron_vr1.models`` so that the pure converter
layer has no Megatron dependency.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_vr1.convert.errors import ConversionError


@dataclass(frozen=True, slots=True, kw_only=True)
class LMArch:
    """What the name table and transforms need to know about a checkpoint."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    """The HF vocabulary (rows of embed_tokens / lm_head). Megatron pads it; see ``padded_vocab``."""
    tie_word_embeddings: bool
    has_vision: bool
    """True for Qwen2.5-VL (a ``visual.*`` tower passed through unchanged)."""

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ConversionError(f"config: num_attention_heads={self.num_heads} is not a multiple of "
                                  f"num_key_value_heads={self.num_kv_heads}; fix config.json")

    @property
    def qkv_rows(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim


def padded_vocab(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Megatron's padded vocabulary: a multiple of ``multiple * tp`` (equal, aligned rows per TP shard)."""
    step = multiple * tp
    return ((vocab_size + step - 1) // step) * step


def arch_from_config(config: dict[str, Any] | Any) -> LMArch:
    """An LMArch from a config.json dict (nested ``text_config`` or flat) or a transformers config object."""
    top = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    text = top.get("text_config") or top
    has_vision = "vision_config" in top or "VL" in "".join(top.get("architectures") or [])

    def need(key: str) -> int:
        if text.get(key) is None:
            raise ConversionError(f"config: field {key!r} is missing; is this a Qwen2 / Qwen2.5-VL config.json?")
        return int(text[key])

    heads, hidden = need("num_attention_heads"), need("hidden_size")
    return LMArch(num_layers=need("num_hidden_layers"), hidden_size=hidden, intermediate_size=need("intermediate_size"),
                  num_heads=heads, num_kv_heads=int(text.get("num_key_value_heads") or heads),
                  head_dim=int(text.get("head_dim") or hidden // heads), vocab_size=need("vocab_size"),
                  # Qwen2.5-VL keeps the flag at the top level, Qwen2 on the (only) config.
                  tie_word_embeddings=bool(top.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
                  has_vision=has_vision)


def load_config(hf_dir: str | Path) -> dict[str, Any]:
    """Read ``<hf_dir>/config.json`` with an error that says which file is missing or broken."""
    path = Path(hf_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path}: not found; pass the directory of a Hugging Face checkpoint") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e}); restore the file from the original checkpoint") from None
