"""Save and load the WHOLE training state: model and megatron optimizer (one megatron dist checkpoint,
torch_dist format, loadable at another TP/PP layout), LR scheduler, every RNG stream (per rank), and small
JSON-able loop state (data sampler position, reward-schedule stage, weight_version, ...).

    <iter_XXXXXXX>/
        model_optim/           dist_checkpointing: {"model": ..., "optimizer": ...} (Adam moments + step)
        rng/rank{r}.json       capture_rng_state() of global rank r
        train_state.json       step, scheduler, loop state, layout; written last (the completion marker)

The optimizer goes through ``optimizer.sharded_state_dict(model_sharded_state_dict)``, so the Adam moments are
saved against the same global tensors as the weights they belong to. A resume that does not restore them
(NeMo-RL PR #3171, #3345) is caught by the tests, which compare the moments before save and after load.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from megatron_vr1.checkpoint import layout
from megatron_vr1.checkpoint.rng import capture_rng_state, restore_rng_state

FORMAT_VERSION = 1
MODEL_OPTIM = "model_optim"
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
"""For megatron's DistributedOptimizer: the canonical per-parameter layout, loadable at another DP/TP/PP layout
("dp_reshardable" only reshards DP; the older default "fully_sharded_model_space" fails on megatron-core 0.19
with "ShardedTensor.flattened_range is not supported"). The non-distributed optimizer ignores it.
Known gap: on CPU without TE/Apex, megatron-core 0.19.2's DistributedOptimizer saves this format but cannot
load it into a fresh optimizer (its state_dict() asserts a shared Adam step count that a never-stepped
optimizer lacks); the non-distributed optimizer round-trips at any layout (tests/distributed)."""
MAX_STATE_BYTES = 1 << 20
"""Cap on the JSON loop state: it is for counters and positions, not data."""


class StatefulScheduler(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class ResumeInfo:
    """What ``load_checkpoint`` restored."""

    path: Path
    step: int
    state: dict[str, Any]
    """The loop state passed to ``save_checkpoint``."""
    rng_restored: bool
    """False when the checkpoint was written with another world size (no per-rank RNG file for this rank)."""
    optimizer_restored: bool
    saved_layout: dict[str, int]


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _layout() -> dict[str, int]:
    out = {"world_size": _world()}
    try:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            out |= {"tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
                    "pipeline_parallel": parallel_state.get_pipeline_model_parallel_world_size(),
                    "data_parallel": parallel_state.get_data_parallel_world_size()}
    except ImportError:
        pass
    return out


def _unwrap(module):
    """The bare megatron model inside DDP / Float16Module wrappers (``.module``). The wrappers' own
    sharded_state_dict nests keys under "module." while their load_state_dict does not strip it, so both save
    and load go through the bare model (which also keeps the files loadable without the wrappers)."""
    while isinstance(getattr(module, "module", None), torch.nn.Module):
        module = module.module
    if not hasattr(module, "sharded_state_dict"):
        raise TypeError(f"{type(module).__name__} has no sharded_state_dict(): pass a megatron-core model")
    return module


def _chunks(model) -> list:
    return [_unwrap(m) for m in (model if isinstance(model, (list, tuple)) else [model])]


def _sharded_state(chunks: list, optimizer, *, is_loading: bool) -> dict[str, Any]:
    state: dict[str, Any] = {}
    model_state: dict[str, Any] = {}
    for i, chunk in enumerate(chunks):
        key = "model" if len(chunks) == 1 else f"model{i}"
        state[key] = chunk.sharded_state_dict()
        model_state |= state[key]
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=is_loading,
                                                          metadata=dict(OPTIMIZER_METADATA))
    return state


def _json_state(state: dict[str, Any]) -> str:
    try:
        text = json.dumps(state, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise layout.CheckpointError(f"checkpoint loop state must be JSON-serialisable (numbers, strings, lists, "
                                     f"dicts): {e}") from None
    if len(text) > MAX_STATE_BYTES:
        raise layout.CheckpointError(f"checkpoint loop state is {len(text)} bytes (cap {MAX_STATE_BYTES}): keep "
                                     "counters and positions there, not data")
    return text


def save_checkpoint(*, save_dir: str | Path, step: int, model, optimizer=None,
                    scheduler: StatefulScheduler | None = None, state: dict[str, Any] | None = None,
                    keep_last: int | None = None) -> Path:
    """Save the full training state after optimizer step ``step``; collective (call on every rank).

    ``model``: a megatron-core model (or DDP-wrapped, or a list of virtual-pipeline chunks); ``optimizer``: a
    megatron optimizer (``get_megatron_optimizer``); ``scheduler``: anything with state_dict/load_state_dict
    (megatron's OptimizerParamScheduler); ``state``: small JSON-able loop state. Atomic: see ``layout``.
    Returns the published ``iter_XXXXXXX`` directory.
    """
    from megatron.core import dist_checkpointing

    save_dir = Path(save_dir)
    tmp = layout.tmp_dir(save_dir, step)
    state_text = _json_state(state or {})
    rank = _rank()
    if rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a crashed save of the same step
            import shutil

            shutil.rmtree(tmp)
        (tmp / MODEL_OPTIM).mkdir(parents=True)
        (tmp / "rng").mkdir()
    _barrier()
    dist_checkpointing.save(_sharded_state(_chunks(model), optimizer, is_loading=False), str(tmp / MODEL_OPTIM))
    with open(tmp / "rng" / f"rank{rank}.json", "w") as f:
        json.dump(capture_rng_state(), f)
    _barrier()  # every rank has written its shards and RNG file
    published = save_dir / layout.iter_name(step)
    if rank == 0:
        meta = {"format_version": FORMAT_VERSION, "step": step, "saved_at": time.time(), "layout": _layout(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "has_optimizer": optimizer is not None, "state": json.loads(state_text)}
        (tmp / layout.MARKER).write_text(json.dumps(meta, indent=1, sort_keys=True))
        published = layout.publish(save_dir, step)
        if keep_last is not None:
            layout.prune(save_dir, keep_last)
    _barrier()
    return published


def load_checkpoint(*, load_dir: str | Path, model, optimizer=None, scheduler: StatefulScheduler | None = None,
                    load_optimizer: bool = True, load_rng: bool = True) -> ResumeInfo | None:
    """Restore the state saved by ``save_checkpoint``; collective. ``load_dir`` is a save dir (its ``latest``
    is used) or one ``iter_`` directory. Returns None when the save dir has no ``latest`` (fresh start).

    The model may use another TP/PP layout than the one that saved (dist_checkpointing reshards); so may
    the optimizer when it is megatron's non-distributed one (its moments are sharded like the weights). RNG
    states are restored only when the world size matches (a different layout draws different streams anyway).
    Call on a freshly built scheduler (megatron's steps it forward by the saved count)."""
    from megatron.core import dist_checkpointing

    path = layout.resolve(load_dir)
    if path is None:
        return None
    meta = json.loads((path / layout.MARKER).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise layout.CheckpointError(f"{path}: checkpoint format {meta.get('format_version')} is not supported "
                                     f"(this build reads {FORMAT_VERSION})")
    want_optimizer = optimizer is not None and load_optimizer
    if want_optimizer and not meta["has_optimizer"]:
        raise layout.CheckpointError(f"{path} holds no optimizer state: resume with load_optimizer=False "
                                     "(fresh Adam moments) if that is intended")
    chunks = _chunks(model)
    sharded = _sharded_state(chunks, optimizer if want_optimizer else None, is_loading=True)
    loaded = dist_checkpointing.load(sharded, str(path / MODEL_OPTIM))
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded["model" if len(chunks) == 1 else f"model{i}"])
    if want_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None:
        if meta["scheduler"] is None:
            raise layout.CheckpointError(f"{path} holds no scheduler state but a scheduler was passed")
        scheduler.load_state_dict(meta["scheduler"])
    rng_file = path / "rng" / f"rank{_rank()}.json"
    rng_restored = False
    if load_rng and meta["layout"].get("world_size") == _world() and rng_file.is_file():
        restore_rng_state(json.loads(rng_file.read_text()))
        rng_restored = True
    _barrier()
    return ResumeInfo(path=path, step=int(meta["step"]), state=meta["state"], rng_restored=rng_restored,
                      optimizer_restored=want_optimizer, saved_layout=meta["layout"])
