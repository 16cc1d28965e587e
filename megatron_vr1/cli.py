"""``megatron-vr1 <verb>``: the command-line entry point.

Each verb lives in ``megatron_vr1.commands.<module>`` with ``add_arguments(parser)`` and ``run(args) -> int``.
Only the chosen verb's module is imported, so ``--help`` is instant and torch loads only when needed.
A verb whose module is not there yet says which issue brings it.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Verb:
    name: str
    module: str
    summary: str
    issue: int
    starts_processes: bool = False
    """Starts servers or worker processes: they are reaped when the command dies (parallel/reaper.py)."""


VERBS: tuple[Verb, ...] = (
    Verb("demo", "demo", "The CPU demo: Vision-R1 GRPO vs continued SFT from an SFT warm start (make demo)",
         8, starts_processes=True),
    Verb("train", "train", "Vision-R1 GRPO (or SFT) from a recipe: rollout, reward, Megatron update, weight sync",
         8, starts_processes=True),
    Verb("eval", "eval", "Generate boxes with a checkpoint and score COCO / ODinW mAP by the paper's protocol",
         9, starts_processes=True),
    Verb("coco-eval", "coco_eval", "COCO bbox metrics of a detections json against a ground-truth json", 9),
    Verb("score", "score", "Score completions with the Vision-R1 reward (official or paper preset)", 3),
    Verb("convert", "convert", "Convert checkpoints between Hugging Face and Megatron (hf-to-mcore, mcore-to-hf, verify)",
         6, starts_processes=True),
    Verb("data", "data", "Build and check datasets (synth, coco, odinw, refcoco, tiny-model, check)", 4),
    Verb("serve-rollout", "serve_rollout", "Launch an SGLang rollout server for a checkpoint", 7,
         starts_processes=True),
    Verb("bench", "bench", "Benchmarks that print tables (reward, train, convert, sync, coco, scaling, ...)", 3,
         starts_processes=True),
    Verb("plot", "plot", "Write PNG curves of a run's metrics (reward, KL, mAP, ...)", 8),
    Verb("config", "config_cmd", "Show the resolved configuration of a recipe (config show --recipe NAME)", 2),
)


def _load(verb: Verb):
    try:
        return importlib.import_module(f"megatron_vr1.commands.{verb.module}")
    except ModuleNotFoundError as e:
        if e.name == f"megatron_vr1.commands.{verb.module}":
            return None
        raise


def build_parser(selected: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-vr1",
        description="Vision-R1 (criterion-driven GRPO for localization) on Megatron-Core with an SGLang rollout server.",
        epilog="Run `megatron-vr1 <verb> --help` for a verb's options. Docs: README.md.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="verb", metavar="<verb>", title="verbs")
    for verb in VERBS:
        p = sub.add_parser(verb.name, help=verb.summary, description=verb.summary)
        if verb.name != selected:
            continue
        module = _load(verb)
        if module is None:
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
            p.set_defaults(_run=lambda args, v=verb: _not_yet(v))
        else:
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def _not_yet(verb: Verb) -> int:
    print(f"megatron-vr1 {verb.name}: not implemented yet; it arrives with issue #{verb.issue}.", file=sys.stderr)
    return 2


def _version() -> str:
    from megatron_vr1 import __version__

    return __version__


def _exit_cleanly_on_sigterm() -> None:
    """SIGTERM (``kill``, Slurm's scancel and time limit, torchrun tearing down a failed job) exits through
    SystemExit, so ``finally`` blocks and atexit hooks run: the rollout servers a run launched in their own
    process group are stopped with it instead of being orphaned. A verb may install its own handler."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        def _raise(signum, _frame):
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, _raise)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(selected)
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 0
    _exit_cleanly_on_sigterm()
    if next(v for v in VERBS if v.name == args.verb).starts_processes:
        from megatron_vr1.parallel.reaper import reap_on_exit

        reap_on_exit()
    try:
        return int(args._run(args) or 0)
    except BrokenPipeError:  # e.g. `megatron-vr1 config show ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
