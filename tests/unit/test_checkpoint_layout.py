"""Checkpoint directory protocol without megatron: atomic publish, the `latest` pointer, rejection of
half-written directories with a clear message, keep_last pruning, RNG capture/restore as JSON."""

import json
import random

import numpy as np
import pytest
import torch

from megatron_vr1.checkpoint import layout
from megatron_vr1.checkpoint.layout import CheckpointError
from megatron_vr1.checkpoint.rng import capture_rng_state, restore_rng_state


def _fake_save(save_dir, step, *, finish=True, publish=True):
    """What save_checkpoint does on disk, minus megatron: payload into the tmp dir, marker last, publish."""
    tmp = layout.tmp_dir(save_dir, step)
    tmp.mkdir(parents=True)
    (tmp / "payload.bin").write_bytes(bytes([step % 256]) * 64)
    if finish:
        (tmp / layout.MARKER).write_text(json.dumps({"step": step}))
    if publish:
        return layout.publish(save_dir, step)
    return tmp


def test_publish_renames_then_points_latest(tmp_path):
    assert layout.resolve(tmp_path) is None  # fresh start: no latest
    path = _fake_save(tmp_path, 5)
    assert path.name == "iter_0000005" and not layout.tmp_dir(tmp_path, 5).exists()
    assert (tmp_path / "latest").read_text() == "iter_0000005\n"
    assert layout.resolve(tmp_path) == path
    assert layout.resolve(path) == path  # an iter_ directory can be named directly
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # no leftover temp pointer


def test_a_crash_mid_save_keeps_the_previous_checkpoint(tmp_path):
    first = _fake_save(tmp_path, 10)
    half = _fake_save(tmp_path, 20, finish=False, publish=False)  # killed before the marker was written
    assert layout.resolve(tmp_path) == first
    with pytest.raises(CheckpointError, match="half-written"):
        layout.resolve(half)
    with pytest.raises(CheckpointError, match="did not finish"):
        layout.publish(tmp_path, 20)
    # killed after the rename but before `latest` moved: latest still names the old, complete checkpoint
    done = _fake_save(tmp_path, 30, publish=False)
    import os

    os.rename(done, tmp_path / "iter_0000030")
    assert layout.resolve(tmp_path) == first


def test_incomplete_or_broken_pointers_are_rejected_with_the_path(tmp_path):
    _fake_save(tmp_path, 1)
    broken = tmp_path / "iter_0000002"
    broken.mkdir()
    (tmp_path / "latest").write_text("iter_0000002\n")
    with pytest.raises(CheckpointError, match=r"iter_0000002 is incomplete \(train_state.json missing"):
        layout.resolve(tmp_path)
    (tmp_path / "latest").write_text("../../etc\n")
    with pytest.raises(CheckpointError, match="expected a checkpoint name"):
        layout.resolve(tmp_path)
    (tmp_path / "latest").write_text("iter_0000009\n")
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        layout.resolve(tmp_path)


def test_prune_keeps_the_newest_and_removes_temp_dirs(tmp_path):
    for step in (1, 2, 3, 4):
        _fake_save(tmp_path, step)
    _fake_save(tmp_path, 5, finish=False, publish=False)
    removed = layout.prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == [".tmp-iter_0000005", "iter_0000001", "iter_0000002"]
    assert [p.name for p in layout.list_checkpoints(tmp_path)] == ["iter_0000003", "iter_0000004"]
    # never the one `latest` names, even when it is older (e.g. after pointing latest back by hand)
    (tmp_path / "latest").write_text("iter_0000003\n")
    _fake_save(tmp_path, 6)
    (tmp_path / "latest").write_text("iter_0000003\n")
    layout.prune(tmp_path, keep_last=1)
    assert [p.name for p in layout.list_checkpoints(tmp_path)] == ["iter_0000003", "iter_0000006"]


def test_resaving_a_step_replaces_it(tmp_path):
    _fake_save(tmp_path, 7)
    tmp = layout.tmp_dir(tmp_path, 7)
    tmp.mkdir()
    (tmp / "payload.bin").write_bytes(b"new")
    (tmp / layout.MARKER).write_text("{}")
    path = layout.publish(tmp_path, 7)
    assert (path / "payload.bin").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000007", "latest"]


def test_rng_state_round_trips_through_json():
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    saved = json.loads(json.dumps(capture_rng_state()))
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(saved)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_loop_state_must_be_small_json():
    from megatron_vr1.checkpoint.training_state import MAX_STATE_BYTES, _json_state

    assert json.loads(_json_state({"sampler_position": 3, "reward_stage": "advanced"}))["sampler_position"] == 3
    with pytest.raises(CheckpointError, match="JSON-serialisable"):
        _json_state({"tensor": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="cap"):
        _json_state({"blob": "x" * MAX_STATE_BYTES})
