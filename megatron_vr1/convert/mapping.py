"""Apply the name table to tensors: HF tensors -> full Megatron tensors and back, one entry at a time.

Shapes are checked against the config before any transform, so a config that does not match the weights
fails with the tensor's name instead of a reshape error deep inside a transform.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch

from megatron_vr1.convert import transforms as T
from megatron_vr1.convert.arch import LMArch
from megatron_vr1.convert.errors import ConversionError
from megatron_vr1.convert.names import LM_PREFIX, VISION_PREFIX, Entry, lm_entries, vision_entry


def expected_hf_shape(hf_name: str, arch: LMArch) -> tuple[int, ...] | None:
    """The shape the config implies for an HF language-model tensor (None for the vision tower)."""
    h, q, kv = arch.hidden_size, arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    leaf = hf_name.split(".layers.")[-1].split(".", 1)[-1] if ".layers." in hf_name else hf_name
    table = {
        "model.embed_tokens.weight": (arch.vocab_size, h), "lm_head.weight": (arch.vocab_size, h),
        "model.norm.weight": (h,), "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
        "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (h, q), "mlp.gate_proj.weight": (arch.intermediate_size, h),
        "mlp.up_proj.weight": (arch.intermediate_size, h), "mlp.down_proj.weight": (h, arch.intermediate_size),
    }
    return table.get(leaf)


def check_hf_shape(hf_name: str, t: torch.Tensor, arch: LMArch, where: str = "") -> None:
    want = expected_hf_shape(hf_name, arch)
    if want is not None and tuple(t.shape) != want:
        raise ConversionError(f"{where}{hf_name}: shape {tuple(t.shape)} does not match the config, which implies "
                              f"{want}; the config.json does not belong to these weights")


def to_mcore(entry: Entry, hf_tensors: list[torch.Tensor], arch: LMArch, padded_vocab: int) -> torch.Tensor:
    """The full Megatron tensor of ``entry`` from its HF tensors (in ``entry.hf`` order)."""
    if entry.transform == "copy":
        return hf_tensors[0]
    if entry.transform == "qkv":
        return T.fuse_qkv(*hf_tensors, arch.num_heads, arch.num_kv_heads, arch.head_dim)
    if entry.transform == "gate_up":
        return T.fuse_gate_up(*hf_tensors)
    if entry.transform == "vocab":
        return T.pad_vocab(hf_tensors[0], padded_vocab)
    raise ConversionError(f"{entry.mcore}: unknown transform {entry.transform!r}")


def mcore_shape(entry: Entry, hf_tensors: list[torch.Tensor], padded_vocab: int) -> tuple[int, ...]:
    """The shape :func:`to_mcore` gives for ``hf_tensors``, without building the tensor."""
    rest = tuple(hf_tensors[0].shape[1:])
    if entry.transform in ("qkv", "gate_up"):
        return (sum(t.shape[0] for t in hf_tensors), *rest)
    if entry.transform == "vocab":
        return (max(padded_vocab, hf_tensors[0].shape[0]), *rest)
    return tuple(hf_tensors[0].shape)


def to_mcore_into(entry: Entry, hf_tensors: list[torch.Tensor], arch: LMArch, out: torch.Tensor) -> None:
    """Write :func:`to_mcore` of ``hf_tensors`` into ``out`` (a full Megatron tensor, e.g. a TP=1 parameter)
    with one copy per HF tensor and no intermediate tensor: on a 1 GB model the fused temporaries of
    ``to_mcore`` cost as much as the copy itself. ``out`` must have :func:`mcore_shape`'s shape."""
    if entry.transform == "copy":
        out.copy_(hf_tensors[0])
    elif entry.transform == "qkv":
        q, k, v = hf_tensors
        rest, hd, kv = tuple(q.shape[1:]), arch.head_dim, arch.num_kv_heads
        rows = q.shape[0] // kv
        groups = out.view(kv, rows + 2 * hd, *rest)  # the per-group layout of transforms.fuse_qkv
        groups[:, :rows].copy_(q.view(kv, rows, *rest))
        groups[:, rows:rows + hd].copy_(k.view(kv, hd, *rest))
        groups[:, rows + hd:].copy_(v.view(kv, hd, *rest))
    elif entry.transform == "gate_up":
        gate, up = hf_tensors
        out[:gate.shape[0]].copy_(gate)
        out[gate.shape[0]:].copy_(up)
    elif entry.transform == "vocab":
        t = hf_tensors[0]
        if t.shape[0] > out.shape[0]:
            raise ConversionError(f"{entry.mcore}: vocabulary of {t.shape[0]} rows is larger than the padded size "
                                  f"{out.shape[0]}")
        out[:t.shape[0]].copy_(t)
        out[t.shape[0]:].zero_()
    else:
        raise ConversionError(f"{entry.mcore}: unknown transform {entry.transform!r}")


def to_hf(entry: Entry, full: torch.Tensor, arch: LMArch, copy: bool = True) -> list[tuple[str, torch.Tensor]]:
    """The HF (name, tensor) pairs of a full Megatron tensor, vocabulary padding stripped. ``copy=False``: the
    gate/up halves and the vocabulary cut are views of ``full`` (see ``transforms``); QKV is always fresh."""
    if entry.transform == "copy":
        return [(entry.hf[0], full)]
    if entry.transform == "qkv":
        return list(zip(entry.hf, T.split_qkv(full, arch.num_heads, arch.num_kv_heads, arch.head_dim)))
    if entry.transform == "gate_up":
        return list(zip(entry.hf, T.split_gate_up(full, copy=copy)))
    if entry.transform == "vocab":
        return [(entry.hf[0], T.strip_vocab(full, arch.vocab_size, copy=copy))]
    raise ConversionError(f"{entry.mcore}: unknown transform {entry.transform!r}")


class Table:
    """The concrete table of one checkpoint: Megatron name -> Entry, for lookup by the exporter."""

    def __init__(self, arch: LMArch, vision_names: Iterable[str] = (), prefix: str = LM_PREFIX):
        self.arch = arch
        self.prefix = prefix
        self.lm = list(lm_entries(arch, prefix))
        self.vision = [vision_entry(n) for n in vision_names]
        self.by_mcore = {e.mcore: e for e in self.lm + self.vision}

    def entry(self, mcore_name: str) -> Entry:
        """The entry of a Megatron name; vision-tower names (``visual.*``) are pass-through."""
        e = self.by_mcore.get(mcore_name)
        if e is not None:
            return e
        if mcore_name.startswith(VISION_PREFIX):
            return vision_entry(mcore_name)
        raise ConversionError(f"{mcore_name}: no HF name for this Megatron tensor; the model does not match the "
                              f"Qwen2 / Qwen2.5-VL name table (is the config right?)")

    def hf_names(self) -> list[str]:
        return [n for e in self.lm + self.vision for n in e.hf]


def iter_hf_to_mcore(arch: LMArch, get: Callable[[str], torch.Tensor], hf_names: Iterable[str],
                     padded_vocab: int, prefix: str = LM_PREFIX) -> Iterator[tuple[Entry, torch.Tensor]]:
    """Stream (entry, full Megatron tensor), reading each HF tensor only when its entry is converted.

    ``get(name)`` returns an HF tensor by canonical (on-disk) name; ``hf_names`` lists what the checkpoint holds
    (to find the vision tower and to report unknown tensors).
    """
    names = list(hf_names)
    present = set(names)
    used: set[str] = set()
    for e in lm_entries(arch, prefix):
        missing = [n for n in e.hf if n not in present]
        if missing:
            raise ConversionError(f"{missing[0]}: missing from the HF checkpoint (needed for {e.mcore}); the "
                                  f"checkpoint is incomplete or the config has more layers than the weights")
        tensors = []
        for n in e.hf:
            t = get(n)
            check_hf_shape(n, t, arch)
            tensors.append(t)
        used.update(e.hf)
        yield e, to_mcore(e, tensors, arch, padded_vocab)
    if arch.has_vision:
        for n in names:
            if n.startswith(VISION_PREFIX):
                used.add(n)
                yield vision_entry(n), get(n)
    # Tied checkpoints sometimes still store lm_head; it must equal the embedding and is dropped.
    extra = [n for n in names if n not in used and not (arch.tie_word_embeddings and n == "lm_head.weight")]
    if extra:
        raise ConversionError(f"{extra[0]}: in the HF checkpoint but not in the name table ({len(extra)} such "
                              f"tensors); the config (num_hidden_layers, tie_word_embeddings, vision_config) does "
                              f"not match the weights")
