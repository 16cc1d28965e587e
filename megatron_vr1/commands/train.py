"""``megatron-vr1 train --recipe NAME [--set a.b=c ...] [--resume/--no-resume]``: Vision-R1 GRPO or SFT.

Run under torchrun for several ranks (``torchrun --nproc_per_node N -m megatron_vr1.cli train ...``); a plain
process is a world of one. User errors (config, data, missing files) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from megatron_vr1.commands.config_cmd import add_recipe_arguments

    add_recipe_arguments(parser)
    parser.add_argument("--resume", dest="resume", action="store_true", default=None,
                        help="continue from <run_dir>/checkpoints/latest (the recipe's default)")
    parser.add_argument("--no-resume", dest="resume", action="store_false", help="start fresh even if one exists")


def train(cfg) -> list[dict]:
    """Initialise the parallel state, build data / policy / engine and run the configured mode."""
    from transformers import AutoTokenizer

    from megatron_vr1.data.dataset import LocalizationDataset
    from megatron_vr1.parallel import state
    from megatron_vr1.training.policy import Policy, load_hf_config

    load_hf_config(cfg.model.hf_path)  # fail before any process group exists
    if not cfg.data.train_path:
        raise FileNotFoundError("data.train_path is empty: set it to a Vision-R1 rows file (--set data.train_path=...)")
    state.initialize(cfg.parallel)
    try:
        from megatron_vr1.training.state import is_rank0

        dataset = LocalizationDataset.from_config(cfg.data, cfg.data.train_path) if is_rank0() else None
        samples = iter(dataset) if dataset is not None else None
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_path, local_files_only=True)
        policy = Policy(cfg)
        if cfg.grpo.mode == "sft":
            from megatron_vr1.training.sft import sft_train

            return sft_train(cfg, policy, samples, tokenizer=tokenizer, dataset=dataset)
        from megatron_vr1.training.loop import grpo_train

        from megatron_vr1.training.engines import build_engine

        engine = build_engine(cfg) if is_rank0() else None
        eos = [tokenizer.convert_tokens_to_ids("<|im_end|>")] + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
        try:
            vision = tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                      "<|vision_end|>"])
            return grpo_train(cfg, policy, engine, samples, tokenizer=tokenizer, eos_ids=sorted(set(eos)),
                              vision_ids=[v for v in vision if v is not None and v != tokenizer.unk_token_id],
                              dataset=dataset)
        finally:
            if engine is not None:
                engine.close()
    finally:
        state.destroy()


def run(args: argparse.Namespace) -> int:
    from megatron_vr1.checkpoint.layout import CheckpointError
    from megatron_vr1.config import ConfigError, load_recipe
    from megatron_vr1.data.schema import RowError
    from megatron_vr1.rollout.hosts import TransportUnreachable
    from megatron_vr1.rollout.sglang_server import SGLangNotInstalled

    try:
        cfg = load_recipe(args.recipe, args.overrides)
        if args.resume is not None:
            cfg.checkpoint.resume = args.resume
        records = train(cfg)
    except (ConfigError, RowError, FileNotFoundError, CheckpointError, SGLangNotInstalled, TransportUnreachable) as e:
        print(f"megatron-vr1 train: {e}", file=sys.stderr)
        return 2
    if records:
        last = records[-1]
        shown = {k: round(v, 4) for k, v in last.items() if isinstance(v, float) and k.startswith(("reward/", "train/nll"))}
        print(f"megatron-vr1 train: finished step {last['step']} in {cfg.log.run_dir}: {shown}")
    return 0
