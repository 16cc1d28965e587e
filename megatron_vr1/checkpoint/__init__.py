"""Checkpoint and resume of the whole training state, written atomically (see ``layout``); a save that fails on
one rank fails on all (``save_agreement``), and one that ran out of room says so (``space``)."""

from megatron_vr1.checkpoint.layout import (CheckpointError, CheckpointSpaceError, clear_partial, list_checkpoints,
                                            prune, resolve)
from megatron_vr1.checkpoint.rng import capture_rng_state, restore_rng_state
from megatron_vr1.checkpoint.training_state import ResumeInfo, load_checkpoint, save_checkpoint

__all__ = ["CheckpointError", "CheckpointSpaceError", "ResumeInfo", "capture_rng_state", "clear_partial",
           "list_checkpoints", "load_checkpoint", "prune", "restore_rng_state", "resolve", "save_checkpoint"]
