"""``megatron-vr1 demo [run|warmstart]``: the CPU demo (``make demo``) and its SFT warm start (``make warmstart``).

    megatron-vr1 demo run        GRPO (real SGLang CPU server) vs continued SFT from the warm start, ~17 min
    megatron-vr1 demo warmstart  SFT from random init to the warm start in assets/warmstart (resumable)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stage", nargs="?", choices=("run", "warmstart"), default="run",
                        help="run: the demo (default); warmstart: build assets/warmstart by SFT")
    parser.add_argument("--out", default="runs/demo", help="demo output directory (summary.json, plots, runs)")
    parser.add_argument("--warmstart", default="assets/warmstart", help="the warm-start HF checkpoint directory")
    parser.add_argument("--grpo-steps", type=int, default=160,
                        help="GRPO optimiser steps (continued SFT gets the training seconds they took)")
    parser.add_argument("--budget-s", type=float, default=500.0,
                        help="cap on GRPO's training seconds (a slower machine stops GRPO early)")
    parser.add_argument("--n-train", type=int, default=4000, help="synthetic training images")
    parser.add_argument("--grpo-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override the GRPO recipe (repeatable), e.g. --grpo-set rollout.temperature=0.7")
    parser.add_argument("--sft-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override the continued-SFT recipe (repeatable), e.g. --sft-set grpo.lr=1e-4")


def run(args: argparse.Namespace) -> int:
    from megatron_vr1.demo import DemoConfig, DemoError, run_demo, run_warmstart

    try:
        if args.stage == "warmstart":
            run_warmstart(dest=Path(args.warmstart), sets=tuple(args.sft_set))
            return 0
        summary = run_demo(DemoConfig(out=Path(args.out), warmstart=Path(args.warmstart), budget_s=args.budget_s,
                                      grpo_steps=args.grpo_steps,
                                      n_train=args.n_train, grpo_sets=tuple(args.grpo_set),
                                      sft_sets=tuple(args.sft_set)))
    except (DemoError, ValueError) as e:
        print(f"megatron-vr1 demo: {e}", file=sys.stderr)
        return 2
    failed = [k for k, ok in summary["checks"].items() if not ok and k != "grpo_beats_continued_sft"]
    if failed:
        print(f"megatron-vr1 demo: finished, but these targets were missed: {', '.join(failed)}", file=sys.stderr)
    return 0
