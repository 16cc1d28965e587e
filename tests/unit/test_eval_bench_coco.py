"""``megatron-vr1 bench coco`` runs both libraries on the same synthetic data and they agree."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import REPO


def test_bench_coco_small_run_prints_both_libraries():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "megatron_vr1.cli", "bench", "coco", "--images", "40", "--boxes", "5",
                           "--categories", "7"], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "| faster-coco-eval |" in out and "| pycocotools |" in out
    assert "200 GT boxes" in out
    diff = float(re.search(r"max \|stat difference\| = ([0-9.e+-]+)", out).group(1))
    assert diff < 1e-12  # identical up to float summation order
    ap = [float(m) for m in re.findall(r"\| (0\.\d{4}) \|\n", out)]
    assert len(ap) == 2 and ap[0] == ap[1] and 0 < ap[0] < 1
