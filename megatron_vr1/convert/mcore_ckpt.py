"""Megatron torch_dist checkpoints of a model: save (atomic), validate (clear errors), load at any TP/PP.

torch_dist stores every tensor under its global shape, so a checkpoint written at one TP/PP layout loads at
another as long as the padded vocabulary matches (``META_NAME`` records it). Validation runs before the load:
a truncated ``.distcp`` file or a config whose shapes differ from the weights is reported with the tensor's name,
instead of an exception from deep inside torch.distributed.checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_vr1.convert.errors import ConversionError
from megatron_vr1.convert.exporter import unwrap

META_NAME = "megatron_vr1_convert.json"
"""Written next to the torch_dist files: the source, HF vocabulary, padded vocabulary, TP/PP and dtype."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def model_sharded_state_dict(model: torch.nn.Module) -> dict:
    """The (unwrapped) model's sharded state dict; replica ids of the replicated vision tower are set by the model."""
    return unwrap(model).sharded_state_dict()


def _sharded_tensors(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """{checkpoint key: global shape} of the model's sharded state dict (factories expanded)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    out = {}
    for v in model_sharded_state_dict(model).values():
        items = v.build() if isinstance(v, ShardedTensorFactory) else [v]
        for t in items if isinstance(items, (list, tuple)) else items.values():
            if isinstance(t, ShardedTensor):
                out[t.key] = tuple(t.global_shape)
    return out


def read_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / META_NAME
    return json.loads(path.read_text()) if path.exists() else {}


def validate_checkpoint(ckpt_dir: str | Path, model: torch.nn.Module | None = None) -> None:
    """Check that every stored item lies inside its file and (with ``model``) that every tensor the model needs is
    there with the model's global shape. Raises ConversionError naming the tensor and the fix."""
    from torch.distributed.checkpoint import FileSystemReader

    ckpt = Path(ckpt_dir)
    if not (ckpt / ".metadata").exists():
        raise ConversionError(f"{ckpt}: no torch_dist checkpoint here (.metadata is missing); pass the directory "
                              f"written by `megatron-vr1 convert hf-to-mcore` or by training")
    try:
        md = FileSystemReader(str(ckpt)).read_metadata()
    except Exception as e:  # a torn .metadata pickle raises anything from EOFError to UnpicklingError
        raise ConversionError(f"{ckpt / '.metadata'}: unreadable ({type(e).__name__}: {e}); the checkpoint is "
                              f"corrupt, write it again") from None
    sizes: dict[str, int] = {}
    for index, info in md.storage_data.items():
        path = ckpt / info.relative_path
        if info.relative_path not in sizes:
            sizes[info.relative_path] = path.stat().st_size if path.exists() else -1
        if sizes[info.relative_path] < info.offset + info.length:
            what = "is missing" if sizes[info.relative_path] < 0 else f"has {sizes[info.relative_path]} bytes"
            end = info.offset + info.length
            raise ConversionError(f"{path}: tensor {index.fqn!r} needs bytes {info.offset}..{end} "
                                  f"but the file {what}; the checkpoint is truncated, write it again")
    if model is None:
        return
    stored = md.state_dict_metadata
    for key, shape in _sharded_tensors(model).items():
        meta = stored.get(key)
        if meta is None:
            raise ConversionError(f"{ckpt}: tensor {key!r} is not in the checkpoint; the checkpoint is incomplete or "
                                  f"was written for a different model config")
        if tuple(getattr(meta, "size", ())) != shape:
            raise ConversionError(f"{ckpt}: tensor {key!r} has shape {tuple(meta.size)} in the checkpoint but the "
                                  f"model "
                                  f"built from the config expects {shape}; use the config.json the checkpoint was "
                                  f"converted from (a different vocab padding needs the same --tp at conversion)")


def load_checkpoint(model: torch.nn.Module, ckpt_dir: str | Path) -> None:
    """Validate, then load a torch_dist checkpoint into ``model`` (this rank's TP/PP shard)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import apply_factories

    from megatron_vr1.convert.direct_load import DirectTorchDistLoad

    validate_checkpoint(ckpt_dir, model)
    bare = unwrap(model)
    wanted = model_sharded_state_dict(bare)
    # Built here rather than inside load: the SwiGLU halves are then views of linear_fc1 and are loaded in place,
    # instead of being loaded into temporaries, concatenated (megatron's merge) and copied in once more.
    apply_factories(wanted)
    loaded = dist_checkpointing.load(wanted, str(ckpt_dir), sharded_strategy=DirectTorchDistLoad())
    params = bare.state_dict(keep_vars=True)
    missing = sorted(k for k, v in params.items() if isinstance(v, torch.Tensor) and k not in loaded)
    if missing:
        raise ConversionError(f"{ckpt_dir}: {missing[0]!r} was not loaded ({len(missing)} such entries); the "
                              f"checkpoint does not match the model")
    # A training checkpoint also holds the optimizer's common (non-tensor) state; take the model's entries only.
    # Entries loaded in place (the loader wrote into the parameter itself) need no second copy.
    rest = {k: v for k, v in loaded.items() if k in params and not _in_place(v, params[k])}
    for k, v in list(rest.items()):
        if isinstance(v, list):  # pre-built factory halves that were not loaded in place: merge as megatron does
            rest[k] = torch.cat(v, dim=0)
    bare.load_state_dict(rest, strict=False)


def _in_place(loaded: Any, param: Any) -> bool:
    """Whether ``loaded`` (a tensor, or the halves of a pre-built factory) is ``param``'s own memory, in order."""
    if not isinstance(param, torch.Tensor):
        return False
    parts = loaded if isinstance(loaded, list) else [loaded]
    if not all(isinstance(t, torch.Tensor) for t in parts) or not param.is_contiguous():
        return False
    ptr, total = param.data_ptr(), 0
    for t in parts:
        if t.data_ptr() != ptr + total * param.element_size() or not t.is_contiguous() or t.dtype != param.dtype:
            return False
        total += t.numel()
    return total == param.numel()


def _substitute_row_blocks(sharded: dict, row_blocks: dict) -> dict:
    """Point the sharded tensors that cover a deferred parameter (``hf_loader.bind_hf_weights``) at its row blocks.

    megatron's SwiGLU factory stores ``linear_fc1`` as two chunks (gate rows, up rows) of the parameter, which
    are exactly the HF gate_proj / up_proj tensors: after building the factories here, each chunk's data is
    replaced by the matching block (located by its row offset inside the parameter). A parameter that some sharded
    tensor still reads afterwards (any other layout) is filled by copying, so the result never depends on it."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from megatron_vr1.convert.hf_loader import BoundWeights, fill_row_blocks

    apply_factories(sharded)
    unresolved = {}
    for sh in nested_values(sharded):
        if not isinstance(sh, ShardedTensor) or sh.data is None or sh.data.numel() == 0:
            continue
        ptr = sh.data.data_ptr()
        # By address range, not storage: parameters may share one buffer (e.g. a DDP param buffer).
        hit = next(((n, p, b) for n, (p, b) in row_blocks.items()
                    if p.data_ptr() <= ptr < p.data_ptr() + p.numel() * p.element_size()), None)
        if hit is None:
            continue
        name, param, blocks = hit
        row_bytes = param.stride(0) * param.element_size()
        row = (sh.data.data_ptr() - param.data_ptr()) // row_bytes
        start, block = 0, None
        for b in blocks:
            if start == row and b.shape[0] == sh.data.shape[0] and sh.data.is_contiguous():
                block = b
            start += b.shape[0]
        if block is None:
            unresolved[name] = (param, blocks)
        else:
            sh.data = block.view(sh.data.shape)
    fill_row_blocks(BoundWeights(row_blocks=unresolved))
    return sharded


def save_checkpoint(model: torch.nn.Module, out_dir: str | Path, meta: dict[str, Any],
                    timings: dict[str, float] | None = None, row_blocks: dict | None = None) -> Path:
    """Save ``model`` as torch_dist to ``out_dir`` (collective). Written to ``<out_dir>.tmp``, fsynced and renamed
    when complete, so an interrupted save never looks like a checkpoint. ``timings`` (optional) receives
    ``fsync_seconds``: the time spent making the files durable, which is disk-bound rather than converter-bound,
    and ``write_seconds``. ``row_blocks``: the deferred parameters of ``hf_loader.bind_hf_weights``, written from
    their HF blocks without being filled."""
    import time

    from megatron.core import dist_checkpointing

    from megatron_vr1.convert.sync_save import InProcessTorchDistSave, fsync_dir, fsync_tree

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConversionError(f"{out}: exists and is not empty; choose a new --out directory or delete it")
    tmp = out.with_name(out.name + ".tmp")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)  # dist_checkpointing needs the directory to exist beforehand
    _barrier()
    start = time.perf_counter()
    sharded = model_sharded_state_dict(model)
    if row_blocks:
        sharded = _substitute_row_blocks(sharded, row_blocks)
    dist_checkpointing.save(sharded, str(tmp), sharded_strategy=InProcessTorchDistSave())
    if timings is not None:
        timings["write_seconds"] = time.perf_counter() - start
    _barrier()
    if _rank() == 0:
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2))
        start = time.perf_counter()
        fsync_tree(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
        fsync_dir(out.parent)
        if timings is not None:
            timings["fsync_seconds"] = time.perf_counter() - start
    _barrier()
    return out
