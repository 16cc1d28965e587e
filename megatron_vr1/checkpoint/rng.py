"""Capture and restore every random-number stream a training step consumes, as JSON (no pickle): python
``random``, numpy's global generator, torch CPU, CUDA (when available) and megatron's tensor-parallel RNG
tracker (dropout inside TP regions)."""

from __future__ import annotations

import base64
import random
from typing import Any

import numpy as np
import torch


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().contiguous().numpy().tobytes()).decode("ascii")


def _tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states as a JSON-able dict."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    out: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch_cpu": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    tracker = _megatron_tracker()
    if tracker is not None:
        out["megatron_tracker"] = {name: _b64(state) for name, state in tracker.get_states().items()}
    return out


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``capture_rng_state`` captured (CUDA only when both sides have it)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np.asarray(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(_tensor(state["torch_cpu"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_tensor(s) for s in state["cuda"]])
    tracker = _megatron_tracker()
    if tracker is not None and "megatron_tracker" in state:
        tracker.set_states({name: _tensor(s) for name, s in state["megatron_tracker"].items()})


def _megatron_tracker():
    """megatron's tensor-parallel RNG tracker when megatron is imported and the tracker is initialised
    (imported lazily: the RNG capture also serves runs that never load megatron)."""
    import sys

    if "megatron.core" not in sys.modules:
        return None
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    return tracker if tracker.is_initialized() else None
