"""The declarative name table: Megatron (mcore local-spec) names <-> HF names, with a named transform and a
tensor-parallel split kind per entry. Qwen2 / Qwen2.5 language models and Qwen2.5-VL.

HF names are kept in the canonical *on-disk* layout (``visual.*``, ``model.layers.*``, ``lm_head.weight``);
``canonical_hf_name`` folds transformers 5's in-memory layout (``model.visual.*``, ``model.language_model.*``)
into it and ``to_memory_layout`` goes the other way. Megatron names use *global* layer indices; the exporter
maps a pipeline stage's local indices to global ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, Literal

from megatron_vr1.convert.arch import LMArch

Transform = Literal["copy", "qkv", "gate_up", "vocab"]
"""How HF tensor(s) become the Megatron tensor: as is, fused q/k/v, fused gate/up, vocab-padded."""
TPKind = Literal["replicated", "column", "row", "gate_up", "vocab"]
"""How the full Megatron tensor is split over tensor-parallel ranks (see ``tp``)."""


@dataclass(frozen=True, slots=True)
class Rule:
    mcore: str
    """Megatron name relative to the language model, ``{layer}`` = global layer index."""
    hf: tuple[str, ...]
    """HF source names (on-disk layout), in the order the transform takes them."""
    transform: Transform
    tp: TPKind
    te_alias: str | None = None
    """The Transformer Engine spec's spelling (norms fused into the next linear), accepted on input."""


LAYER_RULES: tuple[Rule, ...] = (
    Rule("decoder.layers.{layer}.input_layernorm.weight", ("model.layers.{layer}.input_layernorm.weight",),
         "copy", "replicated", te_alias="decoder.layers.{layer}.self_attention.linear_qkv.layer_norm_weight"),
    Rule("decoder.layers.{layer}.self_attention.linear_qkv.weight",
         tuple(f"model.layers.{{layer}}.self_attn.{p}_proj.weight" for p in "qkv"), "qkv", "column"),
    Rule("decoder.layers.{layer}.self_attention.linear_qkv.bias",
         tuple(f"model.layers.{{layer}}.self_attn.{p}_proj.bias" for p in "qkv"), "qkv", "column"),
    Rule("decoder.layers.{layer}.self_attention.linear_proj.weight", ("model.layers.{layer}.self_attn.o_proj.weight",),
         "copy", "row"),
    Rule("decoder.layers.{layer}.pre_mlp_layernorm.weight", ("model.layers.{layer}.post_attention_layernorm.weight",),
         "copy", "replicated", te_alias="decoder.layers.{layer}.mlp.linear_fc1.layer_norm_weight"),
    Rule("decoder.layers.{layer}.mlp.linear_fc1.weight",
         ("model.layers.{layer}.mlp.gate_proj.weight", "model.layers.{layer}.mlp.up_proj.weight"),
         "gate_up", "gate_up"),
    Rule("decoder.layers.{layer}.mlp.linear_fc2.weight", ("model.layers.{layer}.mlp.down_proj.weight",), "copy", "row"),
)
EMBEDDING = Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab", "vocab")
FINAL_NORM = Rule("decoder.final_layernorm.weight", ("model.norm.weight",), "copy", "replicated")
OUTPUT = Rule("output_layer.weight", ("lm_head.weight",), "vocab", "vocab")
VISION_PREFIX = "visual."
"""The vision tower keeps its HF names (after ``visual.``) on both sides and is replicated over TP."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One concrete row of the table: a full Megatron tensor and the HF tensors it is made of."""

    mcore: str
    hf: tuple[str, ...]
    transform: Transform
    tp: TPKind
    layer: int | None = None


LM_PREFIX = "language_model."
"""Where ``megatron_vr1.models.Qwen25VLModel`` keeps its GPTModel (also for text-only Qwen2 configs)."""


def lm_entries(arch: LMArch, prefix: str = LM_PREFIX) -> Iterator[Entry]:
    """The language-model rows in checkpoint order (embedding, layers 0..L-1, final norm, output layer).
    ``prefix``: where the GPTModel sits in the Megatron state dict ("" for a bare GPTModel)."""
    p = prefix
    yield Entry(p + EMBEDDING.mcore, EMBEDDING.hf, EMBEDDING.transform, EMBEDDING.tp)
    for layer in range(arch.num_layers):
        for r in LAYER_RULES:
            yield Entry(p + r.mcore.format(layer=layer), tuple(h.format(layer=layer) for h in r.hf), r.transform,
                        r.tp, layer)
    yield Entry(p + FINAL_NORM.mcore, FINAL_NORM.hf, FINAL_NORM.transform, FINAL_NORM.tp)
    if not arch.tie_word_embeddings:  # tied: lm_head *is* embed_tokens; neither side stores a second copy
        yield Entry(p + OUTPUT.mcore, OUTPUT.hf, OUTPUT.transform, OUTPUT.tp)


def vision_entry(hf_name: str) -> Entry:
    """The pass-through row of a vision-tower tensor (``visual.*`` on both sides)."""
    return Entry(hf_name, (hf_name,), "copy", "replicated")


_LAYER_RE = re.compile(r"^(.*?decoder\.layers\.)(\d+)(\..*)$")
_TE_TO_LOCAL = {r.te_alias.split("{layer}.")[1]: r.mcore.split("{layer}.")[1] for r in LAYER_RULES if r.te_alias}


def canonical_mcore_name(name: str) -> str:
    """Fold the TE spec's fused-norm spelling into the local-spec name (same tensor, different module)."""
    m = _LAYER_RE.match(name)
    if m and m.group(3)[1:] in _TE_TO_LOCAL:
        return f"{m.group(1)}{m.group(2)}.{_TE_TO_LOCAL[m.group(3)[1:]]}"
    return name


def with_layer_index(name: str, layer: int) -> str:
    """Replace the ``decoder.layers.<i>`` index of a Megatron name (stage-local -> global under PP)."""
    m = _LAYER_RE.match(name)
    return f"{m.group(1)}{layer}{m.group(3)}" if m else name


def layer_index(name: str) -> int | None:
    m = _LAYER_RE.match(name)
    return int(m.group(2)) if m else None


def canonical_hf_name(name: str) -> str:
    """transformers 5 in-memory names -> the on-disk layout (``model.visual.x`` -> ``visual.x``,
    ``model.language_model.x`` -> ``model.x``). On-disk names are returned unchanged."""
    if name.startswith("model.visual."):
        return name[len("model."):]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    return name


def to_memory_layout(name: str, has_vision: bool) -> str:
    """The on-disk HF name -> transformers 5's in-memory name of Qwen2_5_VLForConditionalGeneration.
    Qwen2 language models have one layout; their names are returned unchanged."""
    if not has_vision:
        return name
    if name.startswith(VISION_PREFIX):
        return "model." + name
    if name.startswith("model."):
        return "model.language_model." + name[len("model."):]
    return name
