"""The one streaming exporter: a live TP/PP-sharded Megatron model -> (HF name, full tensor), in buckets.

It is the only place HF names come from for the offline converter (``mcore_to_hf``), disk sync and live weight
sync, so those transports cannot drift apart (anchors: slime #1673). Per tensor:

1. TP shards are ``all_gather``-ed over the tensor-parallel group and merged by the table's split kind
   (``tp.unshard``: column / row / gate-up interleave / vocab);
2. the owning pipeline stage broadcasts the full tensor over the pipeline group, so every rank sees every tensor
   (stage-local layer indices become global ones through each layer's ``layer_number``);
3. the table converts it to HF tensors (QKV split, gate/up split, vocabulary padding stripped; with tied
   embeddings the output layer is skipped, as HF saves it).

The iteration is collective: every rank of the model-parallel group must consume it to the end, in step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from megatron_vr1.convert.arch import LMArch, arch_from_config
from megatron_vr1.convert.errors import ConversionError
from megatron_vr1.convert.mapping import Table, to_hf
from megatron_vr1.convert.names import canonical_mcore_name, to_memory_layout, with_layer_index
from megatron_vr1.convert.tp import unshard

NamedTensor = tuple[str, torch.Tensor]
_LAYER_MODULE = re.compile(r"(^|\.)decoder\.layers\.(\d+)$")


@dataclass(frozen=True, slots=True)
class _Item:
    name: str            # global Megatron name
    shard_shape: tuple[int, ...]
    dtype: torch.dtype
    tp_kind: str


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under DDP / Float16Module wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _groups():
    """(tp_group, tp_size, pp_group, pp_size, pp_rank) from megatron's parallel state (size 1 when absent)."""
    try:
        from megatron.core import parallel_state as ps
    except ImportError:  # pragma: no cover - the exporter is only used with megatron-core installed
        ps = None
    if ps is None or not ps.model_parallel_is_initialized():
        return None, 1, None, 1, 0
    return (ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size(),
            ps.get_pipeline_model_parallel_group(), ps.get_pipeline_model_parallel_world_size(),
            ps.get_pipeline_model_parallel_rank())


def local_tensors(model: torch.nn.Module, table: Table) -> list[tuple[str, torch.Tensor]]:
    """This rank's (global Megatron name, local shard) in state-dict order, TE norm spellings folded, the tied
    output-layer copy and ``_extra_state`` entries dropped."""
    model = unwrap(model)
    global_index = {}
    for name, module in model.named_modules():
        m = _LAYER_MODULE.search(name)
        if m and hasattr(module, "layer_number"):
            global_index[name] = module.layer_number - 1  # layer_number is 1-based and global
    out = []
    for name, t in model.state_dict(keep_vars=True).items():
        if name.endswith("_extra_state") or not isinstance(t, torch.Tensor):
            continue
        prefix = re.match(r"^(.*?decoder\.layers\.\d+)\.", name)
        if prefix and prefix.group(1) in global_index:
            name = with_layer_index(name, global_index[prefix.group(1)])
        name = canonical_mcore_name(name)
        if table.arch.tie_word_embeddings and name.endswith("output_layer.weight"):
            continue  # a pipeline's last stage keeps a copy of the tied embedding; HF stores it once
        table.entry(name)  # raises with the name when the model has a tensor the table does not know
        out.append((name, t.detach()))
    return out


def _full_shape(shape: tuple[int, ...], kind: str, tp: int) -> tuple[int, ...]:
    if tp == 1 or kind == "replicated":
        return shape
    if kind == "row":
        return (*shape[:-1], shape[-1] * tp)
    return (shape[0] * tp, *shape[1:])


def export_hf_tensors(model: torch.nn.Module, hf_config: Any, *, layout: str = "disk",
                      copy: bool = True) -> Iterator[NamedTensor]:
    """(HF name, full tensor) for every weight of ``model`` (one pipeline-stage chunk, possibly wrapped).

    ``hf_config``: the HF config (dict or transformers config) the model was built from; it gives the vocabulary
    to strip padding down to and the head layout. ``layout``: "disk" (``visual.*``, ``model.layers.*``: what
    safetensors files and SGLang use) or "memory" (transformers 5's ``model.language_model.*``). ``copy=False``:
    split halves may be views of the model's parameters (no clone); only for a consumer that is done with them
    before the model changes (the offline writer). Collective over the model-parallel group (see the module docstring).
    """
    if layout not in ("disk", "memory"):
        raise ConversionError(f"layout={layout!r} is invalid: use 'disk' or 'memory'")
    arch: LMArch = arch_from_config(hf_config)
    bare = unwrap(model)
    table = Table(arch, prefix="language_model." if hasattr(bare, "language_model") else "")
    tp_group, tp, pp_group, pp, pp_rank = _groups()
    mine = local_tensors(model, table)
    meta = [_Item(n, tuple(t.shape), t.dtype, table.entry(n).tp) for n, t in mine]
    if pp > 1:
        stages: list[Any] = [None] * pp
        dist.all_gather_object(stages, meta, group=pp_group)
    else:
        stages = [meta]
    local = dict(mine)
    # Receive buffers go where this rank's own weights are (the run device; NCCL has no CPU backend).
    device = mine[0][1].device if mine else torch.device("cpu")
    for stage, items in enumerate(stages):
        src = dist.get_global_rank(pp_group, stage) if pp > 1 else None
        for item in items:
            full = None
            if stage == pp_rank:
                shard = local[item.name].contiguous()
                if tp > 1 and item.tp_kind != "replicated":
                    parts = [torch.empty_like(shard) for _ in range(tp)]
                    dist.all_gather(parts, shard, group=tp_group)
                    full = unshard(parts, item.tp_kind, item.name)
                else:
                    full = shard
            if pp > 1:
                if full is None:
                    full = torch.empty(_full_shape(item.shard_shape, item.tp_kind, tp), dtype=item.dtype,
                                       device=device)
                else:
                    full = full.contiguous()
                dist.broadcast(full, src=src, group=pp_group)
            for hf_name, tensor in to_hf(table.entry(item.name), full, arch, copy=copy):
                yield (to_memory_layout(hf_name, arch.has_vision) if layout == "memory" else hf_name), tensor


def export_buckets(model: torch.nn.Module, bucket_bytes: int, hf_config: Any, *, layout: str = "disk",
                   copy: bool = True) -> Iterator[list[NamedTensor]]:
    """:func:`export_hf_tensors` grouped into buckets of at most ``bucket_bytes`` (a larger tensor is alone).
    Every transport (disk, tensor/IPC, distributed broadcast) consumes these buckets."""
    if bucket_bytes < 1:
        raise ConversionError(f"bucket_bytes={bucket_bytes} is invalid: use a positive size such as 512 MiB")
    bucket: list[NamedTensor] = []
    size = 0
    for name, t in export_hf_tensors(model, hf_config, layout=layout, copy=copy):
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket
