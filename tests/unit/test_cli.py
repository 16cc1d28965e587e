"""The CLI lists every verb of the architecture doc; --help is fast (no torch import)."""

import subprocess
import sys

from megatron_vr1.cli import VERBS

ARCHITECTURE_VERBS = {"train", "eval", "coco-eval", "score", "convert", "data", "serve-rollout", "bench"}


def _cli(*args):
    return subprocess.run([sys.executable, "-c", "import sys, megatron_vr1.cli as c; rc = c.main(sys.argv[1:]); "
                           "print('TORCH_LOADED' if 'torch' in sys.modules else 'NO_TORCH'); sys.exit(rc)", *args],
                          capture_output=True, text=True)


def test_help_lists_all_verbs_without_importing_torch():
    res = _cli("--help")
    assert res.returncode == 0
    for verb in ARCHITECTURE_VERBS | {"plot", "config"}:
        assert verb in res.stdout
    assert {v.name for v in VERBS} >= ARCHITECTURE_VERBS


def test_no_verb_prints_help():
    res = _cli()
    assert res.returncode == 0 and "verbs" in res.stdout and "NO_TORCH" in res.stdout


def test_bench_lists_benchmarks():
    res = subprocess.run([sys.executable, "-m", "megatron_vr1.cli", "bench", "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    for name in ("reward", "train", "convert", "sync", "coco", "scaling"):
        assert name in res.stdout
