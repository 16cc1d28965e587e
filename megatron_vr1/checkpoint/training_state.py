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

A save that fails on any rank fails on every rank (an all-reduce of a failure flag closes each phase, so no rank
waits in a barrier for one that raised); rank 0 removes the partial directory, and a failure for lack of room
is one ``CheckpointSpaceError`` with the same message everywhere. A resume first removes what failed or
crashed saves left behind, so a requeued job finds its space again.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from megatron_vr1.checkpoint import layout
from megatron_vr1.checkpoint.save_agreement import SavePhases, all_reduce_ints, saved_bytes
from megatron_vr1.checkpoint.rng import capture_rng_state, restore_rng_state
from megatron_vr1.checkpoint.space import human_bytes

FORMAT_VERSION = 1
MODEL_OPTIM = "model_optim"
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
"""For megatron's DistributedOptimizer: its shards in bucket space, loadable at another data-parallel size with
the same TP and PP (Megatron-LM's default). "fully_reshardable" would also reshard TP/PP, but megatron-core
0.19.2 cannot load it into torch's Adam (the optimizer without TE / apex: ``KeyError: 'step'`` in
``_set_main_param_and_optimizer_states``), and "fully_sharded_model_space" fails with "ShardedTensor.
flattened_range is not supported". A resume at another TP/PP is refused with what to do instead (the model
weights always reshard: ``checkpoint.init_from``). The non-distributed optimizer ignores this: its state is
saved like the weights and loads at any layout."""
MAX_STATE_BYTES = 1 << 20
"""Cap on the JSON loop state: it is for counters and positions, not data."""

log = logging.getLogger(__name__)


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


def _seed_torch_adam_state(optimizer) -> None:
    """Give a never-stepped DistributedOptimizer over torch's Adam (no TE / apex: the CPU, or a GPU without
    them) the per-parameter state torch creates at its first step (a zero step count, zero moments).

    megatron-core 0.19.2's ``DistributedOptimizer.state_dict()``, which its loading path calls, reads the shared
    step count from that state and asserts there is exactly one; a fresh optimizer has none. Loading then
    overwrites every entry. (TE's and apex's FusedAdam keep the step in the param group and need nothing.)"""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(opt, DistributedOptimizer) or not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state.get(p):
                    inner.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}


def _restore_torch_adam_step(optimizer) -> None:
    """Set torch Adam's per-parameter step count of a DistributedOptimizer to the loaded one.

    megatron-core 0.19.2 restores it into each param group (``param_group["step"]``) and then overwrites the
    per-parameter copy, which torch's Adam reads for its bias correction, with the template's; without this a
    resumed run would restart the bias correction at step 0."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(opt, DistributedOptimizer) or not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for p in group["params"]:
                if "step" in inner.state.get(p, {}):
                    inner.state[p]["step"] = torch.tensor(float(group["step"]))


def _uses_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer) for o in getattr(optimizer, "chained_optimizers", [optimizer]))


def _sharded_state(chunks: list, optimizer, *, is_loading: bool) -> dict[str, Any]:
    state: dict[str, Any] = {}
    model_state: dict[str, Any] = {}
    for i, chunk in enumerate(chunks):
        key = "model" if len(chunks) == 1 else f"model{i}"
        state[key] = chunk.sharded_state_dict()
        model_state |= state[key]
    if optimizer is not None:
        if is_loading:
            _seed_torch_adam_state(optimizer)
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


def _start_tmp(save_dir: Path, tmp: Path) -> None:
    """Rank 0: an empty partial directory, after removing what crashed saves left (they hold space we need)."""
    save_dir.mkdir(parents=True, exist_ok=True)
    layout.clear_partial(save_dir)
    (tmp / MODEL_OPTIM).mkdir(parents=True)
    (tmp / "rng").mkdir()


def save_checkpoint(*, save_dir: str | Path, step: int, model, optimizer=None,
                    scheduler: StatefulScheduler | None = None, state: dict[str, Any] | None = None,
                    keep_last: int | None = None) -> Path:
    """Save the full training state after optimizer step ``step``; collective (call on every rank).

    ``model``: a megatron-core model (or DDP-wrapped, or a list of virtual-pipeline chunks); ``optimizer``: a
    megatron optimizer (``get_megatron_optimizer``); ``scheduler``: anything with state_dict/load_state_dict
    (megatron's OptimizerParamScheduler); ``state``: small JSON-able loop state. Atomic: see ``layout``.
    Returns the published ``iter_XXXXXXX`` directory. A failure on any rank raises on every rank, after rank 0
    removed the partial directory (``latest`` is untouched): ``layout.CheckpointSpaceError`` when a disk, quota or
    file-size limit ran out, else the error itself.
    """
    from megatron.core import dist_checkpointing

    save_dir = Path(save_dir)
    state_text = _json_state(state or {})
    rank = _rank()
    sharded = _sharded_state(_chunks(model), optimizer, is_loading=False)
    save = SavePhases(save_dir, step, needed=all_reduce_ints([saved_bytes(sharded)])[0])
    tmp = save.tmp

    def write() -> None:
        dist_checkpointing.save(sharded, str(tmp / MODEL_OPTIM))
        with open(tmp / "rng" / f"rank{rank}.json", "w") as f:
            json.dump(capture_rng_state(), f)

    def publish() -> Path:
        meta = {"format_version": FORMAT_VERSION, "step": step, "saved_at": time.time(),
                "layout": _layout() | {"distributed_optimizer": optimizer is not None and
                                       _uses_distributed_optimizer(optimizer)},
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "has_optimizer": optimizer is not None, "state": json.loads(state_text)}
        (tmp / layout.MARKER).write_text(json.dumps(meta, indent=1, sort_keys=True))
        published = layout.publish(save_dir, step)
        if keep_last is not None:
            layout.prune(save_dir, keep_last)
        return published

    save.phase(lambda: _start_tmp(save_dir, tmp) if rank == 0 else None)
    save.phase(write)  # every rank has written its shards and RNG file
    published = save.phase(publish if rank == 0 else lambda: None)
    return save_dir / layout.iter_name(step) if published is None else published


def _check_optimizer_layout(path: Path, saved: dict[str, Any], optimizer) -> None:
    """Refuse, with what to do, an optimizer state that this optimizer cannot read (see OPTIMIZER_METADATA)."""
    distributed = _uses_distributed_optimizer(optimizer)
    was = bool(saved.get("distributed_optimizer", False))
    if was != distributed:
        raise layout.CheckpointError(
            f"{path} holds {'distributed' if was else 'non-distributed'} optimizer state; resume with "
            f"parallel.distributed_optimizer={str(was).lower()}, or start a new run from its weights with "
            f"checkpoint.init_from={path.parent} (fresh Adam moments)")
    now = _layout()
    moved = [k for k in ("tensor_parallel", "pipeline_parallel") if k in saved and saved[k] != now.get(k)]
    if distributed and moved:
        raise layout.CheckpointError(
            f"{path}: the distributed optimizer's state reshards over data-parallel ranks only; it was saved at "
            + ", ".join(f"{k}={saved[k]}" for k in moved) + " and this run has "
            + ", ".join(f"{k}={now.get(k)}" for k in moved) + ". Resume with the saved TP/PP, or start from its "
            f"weights at the new layout with checkpoint.init_from={path.parent} (fresh Adam moments)")


def _clear_stale_saves(save_dir: Path) -> None:
    """Rank 0 removes what failed or crashed saves left in ``save_dir`` (``layout.clear_partial``), saying what
    and how much space that freed; then every rank goes on. Not fatal: a directory that cannot be removed is
    reported and the resume continues (the next save tries again)."""
    if _rank() == 0:
        try:
            removed = layout.clear_partial(save_dir)
        except OSError as e:
            log.warning("could not remove a partial checkpoint in %s: %s", save_dir, e)
            removed = {}
        for path, nbytes in removed.items():
            log.warning("removed %s (left by a save that did not finish), freeing %s", path,
                        human_bytes(nbytes))
    _barrier()


def load_checkpoint(*, load_dir: str | Path, model, optimizer=None, scheduler: StatefulScheduler | None = None,
                    load_optimizer: bool = True, load_rng: bool = True,
                    clear_partial: bool | None = None) -> ResumeInfo | None:
    """Restore the state saved by ``save_checkpoint``; collective. ``load_dir`` is a save dir (its ``latest``
    is used) or one ``iter_`` directory. Returns None when the save dir has no ``latest`` (fresh start).

    The model may use another TP/PP layout than the one that saved (dist_checkpointing reshards); so may
    the optimizer when it is megatron's non-distributed one (its moments are sharded like the weights). RNG
    states are restored only when the world size matches (a different layout draws different streams anyway).
    Call on a freshly built scheduler (megatron's steps it forward by the saved count).

    ``clear_partial``: first remove the partial directories of failed or crashed saves from the save dir, so
    a resumed run has the space they held. The default does so for a resume of the whole training state (an
    optimizer is loaded) from a save dir, the run's own; a weights-only load (``checkpoint.init_from``, maybe
    another run's directory, maybe still saving) and a named ``iter_`` directory leave the directory alone."""
    from megatron.core import dist_checkpointing

    want_optimizer = optimizer is not None and load_optimizer
    load_dir = Path(load_dir)
    if (want_optimizer if clear_partial is None else clear_partial) and not layout.is_checkpoint_name(load_dir.name):
        _clear_stale_saves(load_dir)  # same decision on every rank: it holds a barrier
    path = layout.resolve(load_dir)
    if path is None:
        return None
    meta = json.loads((path / layout.MARKER).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise layout.CheckpointError(f"{path}: checkpoint format {meta.get('format_version')} is not supported "
                                     f"(this build reads {FORMAT_VERSION})")
    if want_optimizer and not meta["has_optimizer"]:
        raise layout.CheckpointError(f"{path} holds no optimizer state: resume with load_optimizer=False "
                                     "(fresh Adam moments) if that is intended")
    if want_optimizer:
        _check_optimizer_layout(path, meta["layout"], optimizer)
    chunks = _chunks(model)
    sharded = _sharded_state(chunks, optimizer if want_optimizer else None, is_loading=True)
    loaded = dist_checkpointing.load(sharded, str(path / MODEL_OPTIM))
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded["model" if len(chunks) == 1 else f"model{i}"])
    if want_optimizer:
        with torch.no_grad():  # it copies into the (grad-requiring) main parameters in place
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_torch_adam_step(optimizer)
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
