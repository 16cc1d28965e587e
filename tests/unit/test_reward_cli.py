"""``megatron-vr1 score`` and the reward benchmarks, run as the user runs them."""

import json
import subprocess
import sys

import pytest

from megatron_vr1.cli import main

ROW = dict(solution=json.dumps([["person", [[10, 10, 110, 210]]], ["car", [[200, 50, 400, 150]]]]), width=640,
           height=480, input_width=644, input_height=476, target_id_maps='{"person": 1, "car": 2}', num_instances=2)
WORKED = ("```json\n" + '[{"bbox_2d": [12, 12, 109, 203], "label": "person"}, {"bbox_2d": [206, 55, 382, 149], '
          '"label": "car"}, {"bbox_2d": [503, 298, 604, 397], "label": "car"}]' + "\n```")


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_score_worked_case_in_order_with_row_step(tmp_path):
    inp, out = tmp_path / "rows.jsonl", tmp_path / "scores.jsonl"
    _write(inp, [dict(ROW, completion=WORKED), dict(ROW, completion=WORKED, step=2000),
                 dict(ROW, completion="garbage"), dict(ROW, completion=WORKED, step=None)])
    assert main(["score", "--preset", "official", "--step", "0", "--in", str(inp), "--out", str(out)]) == 0
    scores = [json.loads(line) for line in out.read_text().splitlines()]
    assert [round(s["precision"], 5) for s in scores] == [1.0, 0.91232, 0.0, 0.87648]
    assert [s["total"] for s in scores][2] == 0.0 and scores[0]["recall"] == 1.0 and scores[0]["format"] == 1.0


@pytest.mark.parametrize("bad,field", [
    ("{not json", "not a JSON object"), ("[1, 2]", "expected a JSON object"),
    (json.dumps(dict(ROW, completion=5)), "'completion'"),
    (json.dumps(dict(ROW, completion="x", num_instances=4)), "'num_instances'"),
    (json.dumps(dict(ROW, completion="x", target_id_maps="{")), "'target_id_maps'"),
    (json.dumps(dict(ROW, completion="x", step="soon")), "'step'"),
    (json.dumps({"completion": "x"}), "'solution'"),
])
def test_bad_row_names_line_and_field_without_traceback(tmp_path, bad, field, capsys):
    inp, out = tmp_path / "rows.jsonl", tmp_path / "scores.jsonl"
    _write(inp, [dict(ROW, completion=WORKED), bad])
    assert main(["score", "--in", str(inp), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{inp}:2:" in err and field in err
    assert not out.exists()
    assert main(["score", "--in", str(inp), "--out", str(out), "--on-bad-row", "skip"]) == 0
    assert "skipped 1 malformed rows" in capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 1


def test_bad_row_from_the_shell_prints_no_traceback(tmp_path):
    inp, out = tmp_path / "rows.jsonl", tmp_path / "scores.jsonl"
    _write(inp, ["{oops"])
    res = subprocess.run([sys.executable, "-m", "megatron_vr1.cli", "score", "--in", str(inp), "--out", str(out)],
                         capture_output=True, text=True)
    assert res.returncode == 1 and f"{inp}:1:" in res.stderr and "Traceback" not in res.stderr


def test_paper_step_needs_total_steps(tmp_path, capsys):
    inp, out = tmp_path / "rows.jsonl", tmp_path / "scores.jsonl"
    _write(inp, [dict(ROW, completion=WORKED)])
    assert main(["score", "--preset", "paper", "--step", "5", "--in", str(inp), "--out", str(out)]) == 2
    assert "--total-steps" in capsys.readouterr().err
    assert main(["score", "--preset", "paper", "--step", "5", "--total-steps", "8", "--in", str(inp),
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["stage"] == "advanced"
    assert main(["score", "--set", "iou_kind=diou", "--in", str(inp), "--out", str(out)]) == 2
    assert "iou_kind" in capsys.readouterr().err
    assert main(["score", "--in", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2


def _bench(monkeypatch, argv):
    # bench.py picks the benchmark's own options from sys.argv, as when run from the shell.
    monkeypatch.setattr(sys, "argv", ["megatron-vr1", *argv])
    return main(argv)


def test_bench_reward_hacking_prints_both_presets(capsys, monkeypatch):
    assert _bench(monkeypatch, ["bench", "reward-hacking", "--rows", "8"]) == 0
    text = capsys.readouterr().out
    assert "preset official" in text and "preset paper" in text and "box spam 20x" in text
    assert "under 'paper' no attack scores above the honest answer" in text


def test_bench_reward_prints_table(capsys, monkeypatch):
    assert _bench(monkeypatch, ["bench", "reward", "--gt", "2", "--repeats", "2", "--baseline-repeats", "1",
                                "--overlap-batch", "0"]) == 0
    text = capsys.readouterr().out
    assert "per-completion baseline" in text and "|        2 |" in text


def test_overlong_line_is_a_bad_row_not_a_memory_spike(tmp_path, capsys, monkeypatch):
    import megatron_vr1.commands.score as score_cmd
    monkeypatch.setattr(score_cmd, "MAX_LINE_CHARS", 1000)
    inp, out = tmp_path / "rows.jsonl", tmp_path / "scores.jsonl"
    _write(inp, [dict(ROW, completion="x" * 5000), dict(ROW, completion=WORKED)])
    assert main(["score", "--in", str(inp), "--out", str(out), "--on-bad-row", "skip"]) == 0
    assert "skipped 1 malformed rows" in capsys.readouterr().err
    assert round(json.loads(out.read_text())["precision"], 5) == 0.87648
