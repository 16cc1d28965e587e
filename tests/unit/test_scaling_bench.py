"""``megatron-vr1 bench scaling``: the CSV schema and concurrent appends, efficiencies and PNG plots, user errors
that name the flag and the fix, and a real 2-process torchrun sweep that appends a row."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_vr1.benchmarks import scaling
from megatron_vr1.benchmarks.scaling_csv import COLUMNS, ScalingCSVError, ScalingRow, append_row, read_rows
from megatron_vr1.benchmarks.scaling_plot import efficiencies, format_table, write_plots

REPO = Path(__file__).resolve().parents[2]


def _row(**kw) -> ScalingRow:
    base = dict(timestamp="2026-11-23T14:00:00+00:00", git_commit="abc", recipe="tiny_cpu_demo", model="tiny-demo",
                scaling="strong", nodes=1, gpus_or_procs=1, tp=1, pp=1, dp=1, global_batch=16, seq_len=118, steps=3,
                step_s_median=2.0, step_s_min=1.9, tokens_per_s=944.0, tokens_per_s_per_device=944.0,
                model_tflops_per_device=0.01, peak_tflops_per_device=0.02, peak_source="CPU, measured",
                mfu=0.5, export_s=0.01, export_gb=0.009, rollout_s=None, device="CPU process (x86_64)",
                note="a, b")
    base.update(kw)
    return ScalingRow(**base)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    scaling.add_arguments(parser)
    return parser.parse_args(list(argv))


# --- CSV ---------------------------------------------------------------------------------------------------------

def test_csv_round_trip_keeps_types_and_empty_rollout(tmp_path):
    path = tmp_path / "sub" / "r.csv"
    rows = [_row(), _row(rollout_s=3.25, gpus_or_procs=2, dp=2, note='quoted "note", with comma')]
    for r in rows:
        append_row(path, r)
    assert path.read_text().splitlines()[0] == ",".join(COLUMNS)
    back = read_rows(path)
    assert back == rows
    assert back[0].rollout_s is None and isinstance(back[1].gpus_or_procs, int)


def _append_many(path: str, writer: int, n: int, start) -> None:
    start.wait()  # all writers begin together: the first appends race for the header
    for i in range(n):
        append_row(path, _row(git_commit=f"w{writer}-{i}", note="x" * 3000))  # rows longer than a pipe buffer


def test_concurrent_appends_write_one_header_and_every_row_whole(tmp_path):
    path = tmp_path / "shared.csv"
    ctx = multiprocessing.get_context("fork")
    writers, n = 4, 40
    start = ctx.Barrier(writers)
    procs = [ctx.Process(target=_append_many, args=(str(path), w, n, start)) for w in range(writers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    lines = path.read_text().splitlines()
    assert sum(line.startswith("timestamp,") for line in lines) == 1
    rows = read_rows(path)
    assert sorted(r.git_commit for r in rows) == sorted(f"w{w}-{i}" for w in range(writers) for i in range(n))
    assert all(r.note == "x" * 3000 for r in rows)


def test_append_waits_for_the_lock(tmp_path):
    # On a local disk O_APPEND alone keeps whole rows (the test above passes without the lock too); on NFS it
    # does not, and the header check-then-write races everywhere. So: an appender must wait for the lock holder.
    import fcntl
    import time

    path = tmp_path / "locked.csv"
    ctx = multiprocessing.get_context("fork")
    with open(path.with_name("locked.csv.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        child = ctx.Process(target=append_row, args=(str(path), _row()))
        child.start()
        time.sleep(1.0)
        assert child.is_alive() and not path.exists()
        fcntl.flock(lock, fcntl.LOCK_UN)
    child.join(30)
    assert child.exitcode == 0 and len(read_rows(path)) == 1


def test_appending_to_a_foreign_csv_names_the_file_and_fix(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ScalingCSVError, match=r"other\.csv: its header .* pass a new --csv"):
        append_row(path, _row())
    assert path.read_text() == "a,b,c\n1,2,3\n"


def test_reading_a_bad_field_names_row_and_field(tmp_path):
    path = tmp_path / "r.csv"
    append_row(path, _row())
    append_row(path, _row())
    text = path.read_text().splitlines()
    text[2] = text[2].replace(",2,1.9,", ",fast,1.9,", 1)
    path.write_text("\n".join(text) + "\n")
    with pytest.raises(ScalingCSVError, match=r"r\.csv row 3: field 'step_s_median' = 'fast' is not a number"):
        read_rows(path)


# --- efficiencies and plots --------------------------------------------------------------------------------------

def test_efficiency_strong_and_weak():
    rows = [_row(step_s_median=2.0, tokens_per_s=1000, tokens_per_s_per_device=1000),
            _row(gpus_or_procs=2, dp=2, step_s_median=1.25, tokens_per_s=1600, tokens_per_s_per_device=800),
            _row(scaling="weak", global_batch=8, tokens_per_s_per_device=500),
            _row(scaling="weak", global_batch=16, gpus_or_procs=2, tp=2, tokens_per_s_per_device=400)]
    eff = {(p.row.scaling, p.row.gpus_or_procs): p.efficiency for p in efficiencies(rows)}
    # strong: T1 * 1 / (T2 * 2) = 2.0 / 2.5; weak: per-device throughput ratio
    assert eff == {("strong", 1): 1.0, ("strong", 2): pytest.approx(0.8), ("weak", 1): 1.0,
                   ("weak", 2): pytest.approx(0.8)}
    table = format_table(efficiencies(rows))
    assert "80%" in table and "2x1x1" in table and "n/a" in table


def test_plots_are_png_files(tmp_path):
    rows = [_row(), _row(gpus_or_procs=2, dp=2, tokens_per_s=1500, tokens_per_s_per_device=750),
            _row(gpus_or_procs=2, tp=2, tokens_per_s=900, tokens_per_s_per_device=450),
            _row(scaling="weak", global_batch=8), _row(scaling="weak", global_batch=16, gpus_or_procs=2, pp=2)]
    paths = write_plots(efficiencies(rows), tmp_path / "plots")
    assert [p.name for p in paths] == ["scaling_strong.png", "scaling_weak.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


def test_plot_mode_prints_table_and_writes_pngs(tmp_path, capsys):
    csv = tmp_path / "r.csv"
    append_row(csv, _row())
    append_row(csv, _row(gpus_or_procs=2, dp=2, tokens_per_s_per_device=472))
    assert scaling.run(_args("--plot", "--csv", str(csv))) == 0
    out = capsys.readouterr().out
    assert "50%" in out and "CPU processes" in out and (tmp_path / "scaling_strong.png").is_file()


# --- user errors -------------------------------------------------------------------------------------------------

@pytest.fixture
def world_of_one(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)


def _error(capsys, *argv: str) -> str:
    rc = scaling.run(_args(*argv))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    return err


def test_unknown_recipe_names_the_flag(capsys, world_of_one, tmp_path):
    err = _error(capsys, "--recipe", "no_such_recipe", "--csv", str(tmp_path / "r.csv"))
    assert "--recipe no_such_recipe: unknown recipe" in err and "tiny_cpu_demo" in err


def test_layout_that_does_not_divide_the_world(capsys, world_of_one, tmp_path):
    err = _error(capsys, "--model", "tiny", "--tp", "2", "--csv", str(tmp_path / "r.csv"))
    assert "--tp 2 x --pp 1 = 2 does not divide the world size 1" in err
    assert "launch a multiple of 2 processes or lower --tp / --pp" in err
    assert not (tmp_path / "r.csv").exists()


def test_missing_model_dir_and_batch_split_and_sweep_layouts(capsys, world_of_one, tmp_path):
    err = _error(capsys, "--model", str(tmp_path / "nowhere"), "--csv", str(tmp_path / "r.csv"))
    assert "nowhere has no config.json" in err and "--model tiny" in err
    from megatron_vr1.benchmarks.scaling_measure import MeasureSpec, resolve_layout
    from megatron_vr1.config.recipes import load_recipe

    with pytest.raises(ValueError, match="--global-batch: a global batch of 5 sequences does not split over DP=2"):
        resolve_layout(MeasureSpec(recipe="tiny_cpu_demo", global_batch=5), load_recipe("tiny_cpu_demo"), 2)
    err = _error(capsys, "--local-sweep", "--layouts", "2:2:2")
    assert "--layouts entry 2:2:2: tp x pp = 4 must divide the world size 2" in err
    err = _error(capsys, "--plot", "--csv", str(tmp_path / "none.csv"))
    assert "none.csv: no such CSV" in err


def test_layout_defaults_come_from_the_recipe():
    from megatron_vr1.benchmarks.scaling_measure import MeasureSpec, image_side_for, resolve_layout
    from megatron_vr1.config.recipes import load_recipe

    cfg = load_recipe("qwen25vl_7b_vision_r1")
    lay = resolve_layout(MeasureSpec(recipe="qwen25vl_7b_vision_r1"), cfg, 16)
    assert (lay.tp, lay.pp, lay.dp, lay.global_batch) == (4, 1, 4, 64)  # TP=4 recipe, 16 prompts x G=4
    assert image_side_for(401408) == 44 and lay.seq == 44 * 44 // 4 + 2 + 64 + 512
    weak = resolve_layout(MeasureSpec(recipe="tiny_cpu_demo", batch_per_proc=3, tp=2), load_recipe("tiny_cpu_demo"), 4)
    assert (weak.dp, weak.global_batch) == (2, 12)
    assert MeasureSpec(recipe="x", batch_per_proc=3).scaling == "weak" and MeasureSpec(recipe="x").scaling == "strong"


# --- a real 2-process run ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_local_sweep_two_processes_appends_a_row_and_plots(tmp_path):
    csv = tmp_path / "local.csv"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "megatron_vr1.cli", "bench", "scaling", "--local-sweep",
                           "--layouts", "2:2:1", "--modes", "weak", "--batch-per-proc", "2", "--steps", "2",
                           "--warmup", "0", "--rollout", "hf", "--csv", str(csv), "--work-dir", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = read_rows(csv)
    assert (row.scaling, row.nodes, row.gpus_or_procs, row.tp, row.pp, row.dp) == ("weak", 1, 2, 2, 1, 1)
    assert row.global_batch == 4 and row.seq_len == 4 + 2 + 64 + 48  # tiny_cpu_demo: 56x56 image, 48 new tokens
    assert 0 < row.step_s_min <= row.step_s_median
    assert row.tokens_per_s == pytest.approx(4 * row.seq_len / row.step_s_median, rel=1e-4)
    assert row.tokens_per_s_per_device == pytest.approx(row.tokens_per_s / 2, rel=1e-4)
    assert row.mfu == pytest.approx(row.model_tflops_per_device / row.peak_tflops_per_device, rel=1e-4)
    assert row.device.startswith("CPU process") and "measured" in row.peak_source
    # the export gathers the TP shards into the full HF tensors: as many bytes as the checkpoint holds
    from safetensors import safe_open

    with safe_open(str(tmp_path / "work" / "tiny-demo" / "model.safetensors"), "pt") as f:
        hf_bytes = sum(f.get_tensor(k).numel() * 4 for k in f.keys())
    assert row.export_gb * 1e9 == pytest.approx(hf_bytes, rel=1e-4) and row.export_s > 0
    assert row.rollout_s > 0 and "transformers generate on rank 0" in row.note
    assert "1 threads" in row.peak_source and "2x1x1" in proc.stdout
    assert (tmp_path / "scaling_weak.png").read_bytes()[:4] == b"\x89PNG"
