"""A resumed run keeps one metrics history: the steps logged after the checkpoint by the killed run are set aside
(metrics.rewoundN.jsonl; TensorBoard's purge_step), so metrics.jsonl and the curves hold each step once."""

from __future__ import annotations

import json

import pytest

from megatron_vr1.training.metrics import METRICS_FILE, MetricsLogger, read_metrics


def _log(run_dir, steps, *, start_step, value, tensorboard=False):
    log = MetricsLogger(run_dir, total_steps=10, start_step=start_step, tensorboard=tensorboard, progress=False)
    for s in steps:
        log.log(s, {"reward/total": value + s})
    log.close()


def _steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_resume_sets_aside_steps_after_the_checkpoint(tmp_path, capsys):
    _log(tmp_path, [1, 2, 3, 4, 5], start_step=0, value=0.0)  # killed after step 5, last checkpoint at 3
    _log(tmp_path, [], start_step=3, value=100.0)
    assert _steps(tmp_path / METRICS_FILE) == [1, 2, 3]
    assert _steps(tmp_path / "metrics.rewound1.jsonl") == [4, 5]
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "steps 4..5" in out and "metrics.rewound1.jsonl" in out
    _log(tmp_path, [4, 5, 6], start_step=3, value=100.0)  # the resumed run redoes 4, 5 and goes on
    assert _steps(tmp_path / METRICS_FILE) == [1, 2, 3, 4, 5, 6]
    assert [r["reward/total"] for r in read_metrics(tmp_path)] == [1, 2, 3, 104, 105, 106]
    assert not (tmp_path / "metrics.rewound2.jsonl").exists()  # nothing past step 3 was left to move
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_moves_old_duplicates_and_a_torn_line(tmp_path):
    lines = [{"step": 1, "v": 1}, {"step": 2, "v": 2}, {"step": 2, "v": 22}, {"step": 3, "v": 3}]
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "v'  # the kill cut the last write
    (tmp_path / METRICS_FILE).write_text(text)
    _log(tmp_path, [4], start_step=3, value=0.0)
    assert [(r["step"], r.get("v")) for r in read_metrics(tmp_path)] == [(1, 1), (2, 22), (3, 3), (4, None)]
    assert _steps(tmp_path / METRICS_FILE) == [1, 2, 3, 4]
    rewound = (tmp_path / "metrics.rewound1.jsonl").read_text().splitlines()
    assert rewound == [json.dumps({"step": 2, "v": 2}), '{"step": 4, "v']


def test_resume_without_later_steps_leaves_the_file_alone(tmp_path, capsys):
    _log(tmp_path, [1, 2], start_step=0, value=0.0)
    before = (tmp_path / METRICS_FILE).read_bytes()
    _log(tmp_path, [], start_step=2, value=0.0)
    assert (tmp_path / METRICS_FILE).read_bytes() == before and not list(tmp_path.glob("metrics.rewound*"))
    assert "resuming" not in capsys.readouterr().out


def test_tensorboard_keeps_the_redone_steps_once(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log(tmp_path, [1, 2, 3, 4, 5], start_step=0, value=0.0, tensorboard=True)
    _log(tmp_path, [4, 5, 6], start_step=3, value=100.0, tensorboard=True)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("reward/total")
    assert [e.step for e in events] == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in events] == [1, 2, 3, 104, 105, 106]
