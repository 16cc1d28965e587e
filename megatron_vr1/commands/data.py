"""``megatron-vr1 data <sub>``: build and check datasets and tiny-model assets.

Subcommands: tiny-model (offline tokenizer/processor/random checkpoint). User errors (bad paths, bad rows,
bad values) print one line naming the problem and return 2; they never print a traceback.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_cmd", metavar="<sub>", required=True)

    p = sub.add_parser("tiny-model", help="write an offline tiny Qwen2.5-VL (tokenizer, processor, random weights)")
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--preset", choices=["test", "demo"], default="test",
                   help="test: ~0.4M params for unit tests; demo: tiny-demo's ~2.2M model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tie-word-embeddings", action="store_true", help="share embed_tokens and lm_head")
    p.set_defaults(_data_run=_tiny_model)


def _tiny_model(args: argparse.Namespace) -> int:
    from megatron_vr1.data.tiny_model import build_tiny_model

    out = build_tiny_model(args.out, preset=args.preset, seed=args.seed,
                           tie_word_embeddings=True if args.tie_word_embeddings else None)
    print(f"wrote tiny Qwen2.5-VL ({args.preset}, seed {args.seed}) to {out}")
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        return int(args._data_run(args) or 0)
    except (ValueError, OSError) as e:  # user errors: one line, no traceback
        print(f"megatron-vr1 data {args.data_cmd}: error: {e}", file=sys.stderr)
        return 2
