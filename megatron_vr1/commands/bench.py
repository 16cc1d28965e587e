"""``megatron-vr1 bench <name>``: benchmarks that print a table.

Each benchmark lives in ``megatron_vr1.benchmarks.<module>`` with ``add_arguments(parser)`` and
``run(args) -> int``. Timings are medians over repeats, with a baseline measured in the same process.
"""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHES: dict[str, tuple[str, str, int]] = {
    # name: (module, summary, issue that brings it)
    "reward": ("reward", "completions/s of the batched reward vs a per-completion implementation", 3),
    "reward-hacking": ("reward_hacking", "reward of adversarial answers vs the honest answer, per preset", 3),
    "train": ("train", "tokens/s, TFLOP/s and MFU of a policy train step", 5),
    "convert": ("convert", "GB/s and peak RSS of HF<->Megatron conversion vs plain safetensors reads", 6),
    "sync": ("sync", "seconds and GB/s per weight-sync transport", 7),
    "coco": ("coco", "COCO bbox evaluation time: faster-coco-eval vs pycocotools", 9),
    "scaling": ("scaling", "step time / tokens/s / MFU across node counts and layouts", 10),
    "grpo-step": ("grpo_step", "the CPU demo's GRPO step: SGLang rollout and policy update vs their baselines", 8),
    "batch": ("batch_transport", "bytes and seconds to ship a GRPO step's batch to the ranks: whole-batch broadcast "
              "vs data-parallel shards", 20),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_name", metavar="<benchmark>", required=True)
    selected = next((a for a in sys.argv[2:] if not a.startswith("-")), None)
    for name, (module, summary, _issue) in BENCHES.items():
        p = sub.add_parser(name, help=summary, description=summary)
        if name == selected:
            mod = _load(module)
            if mod is not None:
                mod.add_arguments(p)
            else:
                p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def _load(module: str):
    try:
        return importlib.import_module(f"megatron_vr1.benchmarks.{module}")
    except ModuleNotFoundError as e:
        if e.name == f"megatron_vr1.benchmarks.{module}":
            return None
        raise


def run(args: argparse.Namespace) -> int:
    module, _summary, issue = BENCHES[args.bench_name]
    mod = _load(module)
    if mod is None:
        print(f"megatron-vr1 bench {args.bench_name}: not implemented yet; it arrives with issue #{issue}.",
              file=sys.stderr)
        return 2
    return int(mod.run(args) or 0)
