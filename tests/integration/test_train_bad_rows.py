"""``megatron-vr1 train`` on rows whose images are bad (not an image, truncated, missing, not the row's size).

With data.on_bad_row=skip the run goes on: each bad row is named once in the log (file, row, field), every skip is
counted, revisits in later epochs included, and metrics.jsonl carries the running count as data/bad_rows_skipped.
With data.on_bad_row=error the run stops at the first bad row with exit code 2 and one line naming it, no
traceback. Both runs are subprocesses of the real CLI (CPU, HFEngine rollout, no checkpoint), run side by side.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO
from training_data import tiny_hf_dir

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED, STEPS, PER_STEP = 1234, 2, 2
# 0-based row index -> (field named, words of the problem); rows 2 and 3 stay good.
BAD = {4: ("image", "cannot decode"), 0: ("image", "cannot decode"), 1: ("image", "does not exist"),
       5: ("width", "row says 84x84 but the image is 56x56")}


def _data(root):
    """6 synthetic rows; 4 of them broken the ways BAD lists."""
    from megatron_vr1.data.synth import build_synth

    train = build_synth(root / "data", n=6, seed=0, difficulty="demo", n_val=2)["train"]
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    image = lambda i: train.parent / rows[i]["image"]  # noqa: E731
    image(4).write_bytes(os.urandom(image(4).stat().st_size))  # not an image: PIL.UnidentifiedImageError
    png = image(0).read_bytes()
    image(0).write_bytes(png[: len(png) // 2])  # truncated
    image(1).unlink()  # missing
    rows[5]["width"] = rows[5]["height"] = 84  # the image is 56x56 (the boxes still fit, so only the size is wrong)
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return train


def _cmd(hf_dir, data, run_dir, on_bad_row):
    sets = [f"model.hf_path={hf_dir}", f"data.train_path={data}", "rollout.engine=hf", f"log.run_dir={run_dir}",
            "log.progress=false", "log.tensorboard=false", f"grpo.train_steps={STEPS}", "grpo.warmup_steps=0",
            f"grpo.prompts_per_step={PER_STEP}", "grpo.num_generations=2", "rollout.max_new_tokens=8",
            "checkpoint.save_interval=0", f"data.seed={SEED}", f"data.on_bad_row={on_bad_row}"]
    return [sys.executable, "-m", "megatron_vr1.cli", "train", "--recipe", "tiny_cpu_demo",
            *[a for s in sets for a in ("--set", s)]]


def _expected(n_rows):
    """Replay the sampler: the running bad-row count after each step, and the first bad row met."""
    from megatron_vr1.data.sampler import ShardedSampler

    counts, skipped, good, first = [], 0, 0, None
    for _epoch, index in ShardedSampler(n_rows, seed=SEED, shuffle=True):
        if int(index) in BAD:
            skipped += 1
            first = int(index) if first is None else first
            continue
        good += 1
        if good % PER_STEP == 0:
            counts.append(skipped)
            if len(counts) == STEPS:
                return counts, first


def _named(data, index):
    field, _words = BAD[index]
    return f"{data} row {index + 1} field '{field}'"


def test_bad_images_are_skipped_and_counted_or_stop_the_run(tmp_path):
    hf_dir, data = tiny_hf_dir(tmp_path), _data(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    procs = {mode: subprocess.Popen(_cmd(hf_dir, data, tmp_path / mode, mode), cwd=REPO, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE) for mode in ("skip", "error")}
    (_out, err_skip), (_, err_error) = (p.communicate(timeout=600) for p in procs.values())
    counts, first = _expected(6)
    assert counts[-1] > len(BAD), "the replay should revisit bad rows in the second epoch; change SEED"

    assert procs["skip"].returncode == 0, err_skip[-3000:]
    records = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [r["data/bad_rows_skipped"] for r in records] == counts
    for index, (_field, words) in BAD.items():  # named once, although the second epoch meets it again
        named = [line for line in err_skip.splitlines() if _named(data, index) in line]
        assert len(named) == 1 and words in named[0], (index, named)

    assert procs["error"].returncode == 2, err_error[-3000:]
    ours = [line for line in err_error.splitlines() if line.startswith("megatron-vr1")]
    assert len(ours) == 1 and ours[0].startswith(f"megatron-vr1 train: {_named(data, first)}: {BAD[first][1]}"), ours
    assert err_error.rstrip().endswith(ours[0]) and "Traceback" not in err_error
