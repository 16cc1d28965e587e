"""Load HF safetensors weights straight into a live Megatron model at any TP/PP (this rank's shards only).

Used by the offline converter (a TP=1/PP=1 model, then a torch_dist save) and usable for online loading.
Each rank reads only the HF tensors of its own parameters, one entry at a time.

``bind_hf_weights`` is the offline converter's zero-copy variant: a parameter whose Megatron tensor *is* one HF
tensor (same dtype, unsplit) is pointed at the memory-mapped file instead of being copied, and gate/up halves are
handed to the torch_dist save as separate row blocks (the checkpoint stores them as two chunks anyway). On a
machine where touching fresh memory costs ~0.3-0.7 GB/s, not filling 1 GB of parameters is most of the win.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_vr1.convert.arch import arch_from_config
from megatron_vr1.convert.errors import ConversionError
from megatron_vr1.convert.exporter import unwrap
from megatron_vr1.convert.mapping import Table, check_hf_shape, mcore_shape, to_mcore, to_mcore_into
from megatron_vr1.convert.names import EMBEDDING, LM_PREFIX, canonical_mcore_name, with_layer_index
from megatron_vr1.convert.safetensors_io import SafetensorsReader
from megatron_vr1.convert.tp import shard


def _tp() -> tuple[int, int, int]:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 0, 1, 1
    return (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
            ps.get_pipeline_model_parallel_world_size())


@dataclass(slots=True)
class BoundWeights:
    """What :func:`bind_hf_weights` did: the bytes it covered and the parameters it left *unfilled* because their
    Megatron tensor is the row-wise concatenation of HF tensors (gate/up). ``row_blocks[name] = (param, blocks)``:
    the parameter holds garbage until :func:`fill_row_blocks` or the torch_dist save substitutes the blocks."""

    nbytes: int = 0
    row_blocks: dict[str, tuple[torch.nn.Parameter, list[torch.Tensor]]] = field(default_factory=dict)


def fill_row_blocks(bound: BoundWeights) -> None:
    """Copy every deferred gate/up block into its parameter (the model is then complete and usable)."""
    with torch.no_grad():
        for param, blocks in bound.row_blocks.values():
            torch.cat(blocks, dim=0, out=param.data)
    bound.row_blocks.clear()


def load_hf_weights(model: torch.nn.Module, reader: SafetensorsReader, hf_config: Any) -> int:
    """Copy the HF checkpoint of ``reader`` into ``model`` (this rank's TP/PP shard). Returns the bytes read.

    Raises ConversionError naming the tensor when one is missing, has the wrong shape for the config, or (on a
    single-stage model) when the checkpoint holds tensors the table does not know.
    """
    return _load(model, reader, hf_config, bind=False).nbytes


def bind_hf_weights(model: torch.nn.Module, reader: SafetensorsReader, hf_config: Any) -> BoundWeights:
    """Like :func:`load_hf_weights`, without copying where the layout allows: unsplit "copy" entries (and
    vocabularies that need no padding) of the parameter's dtype become views of the reader's (private,
    copy-on-write) mapping, gate/up entries are deferred (``BoundWeights.row_blocks``). Everything else (QKV
    interleave, vocabulary padding, dtype casts, TP slices) is copied as in :func:`load_hf_weights`. Keep the
    model read-only or call :func:`fill_row_blocks` first."""
    return _load(model, reader, hf_config, bind=True)


def _load(model: torch.nn.Module, reader: SafetensorsReader, hf_config: Any, *, bind: bool) -> BoundWeights:
    arch = arch_from_config(hf_config)
    bare = unwrap(model)
    prefix = LM_PREFIX if hasattr(bare, "language_model") else ""
    table = Table(arch, prefix=prefix)
    tp_rank, tp, pp = _tp()
    present = set(reader.names())
    used: set[str] = set()
    bound = BoundWeights()
    # Under PP a stage numbers its layers from 0; layer_number (1-based) is the global index.
    layer_of = {name: m.layer_number - 1 for name, m in bare.named_modules()
                if hasattr(m, "layer_number") and name.rsplit(".", 1)[-1].isdigit() and ".layers." in f".{name}"}
    with torch.no_grad():
        for raw, param in bare.state_dict(keep_vars=True).items():
            if raw.endswith("_extra_state") or not isinstance(param, torch.Tensor):
                continue
            name = raw
            for mod, g in layer_of.items():
                if raw.startswith(mod + "."):
                    name = with_layer_index(raw, g)
                    break
            name = canonical_mcore_name(name)
            if arch.tie_word_embeddings and name == prefix + "output_layer.weight":
                entry = table.entry(prefix + EMBEDDING.mcore)  # the last stage's copy of the tied embedding
            else:
                entry = table.entry(name)
            missing = [n for n in entry.hf if n not in present]
            if missing:
                raise ConversionError(f"{missing[0]}: missing from the HF checkpoint {reader.dir} (needed for "
                                      f"{name}); the checkpoint is incomplete or does not match the config")
            tensors = []
            for n in entry.hf:
                t = reader.view(n)  # no copy: the one copy is into the parameter
                check_hf_shape(n, t, arch, where=f"{reader.dir}: ")
                bound.nbytes += t.numel() * t.element_size()
                tensors.append(t)
            used.update(entry.hf)
            padded = param.shape[0] * tp if entry.transform == "vocab" else arch.vocab_size
            unsplit = tp == 1 or entry.tp == "replicated"
            shape = mcore_shape(entry, tensors, padded) if unsplit else None
            local = None if unsplit else shard(to_mcore(entry, tensors, arch, padded), entry.tp, tp, tp_rank, name)
            shape = shape if unsplit else tuple(local.shape)
            if tuple(shape) != tuple(param.shape):
                raise ConversionError(f"{name}: the HF weights give a shard of shape {tuple(shape)} but the model "
                                      f"has {tuple(param.shape)}; the config does not match the weights")
            same_dtype = all(t.dtype == param.dtype for t in tensors)
            as_is = entry.transform == "copy" or (entry.transform == "vocab" and tensors[0].shape == param.shape)
            if bind and unsplit and same_dtype and as_is:
                param.data = tensors[0].view(param.shape)  # the mapped file is the parameter: no copy
            elif bind and unsplit and same_dtype and entry.transform == "gate_up":
                bound.row_blocks[name] = (param, tensors)  # written block by block by the torch_dist save
            elif unsplit:  # the whole Megatron tensor: fuse straight into the parameter
                to_mcore_into(entry, tensors, arch, param)
            else:
                param.copy_(local)
            del tensors, local
    if pp == 1:
        extra = sorted(present - used - ({"lm_head.weight"} if arch.tie_word_embeddings else set()))
        if extra:
            raise ConversionError(f"{extra[0]}: in the HF checkpoint {reader.dir} but not in the model ({len(extra)} "
                                  f"such tensors); the config (layers, tie_word_embeddings, vision) does not match")
    return bound
