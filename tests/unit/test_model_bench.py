"""``megatron-vr1 bench train``: the FLOP model against torch's FLOP counter, the CLI end to end on the tiny shape,
and a user error without a traceback."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import torch

from megatron_vr1.benchmarks import train as bench


def test_flop_model_matches_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = bench.hf_config_for("tiny")
    cfg._attn_implementation = "sdpa"
    shape = bench.step_shape(seq=96, batch=1, image_side_patches=8)
    inputs = bench.make_inputs(cfg, shape, torch.device("cpu"))
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    ids = inputs["input_ids"]
    with FlopCounterMode(display=False) as counter:
        logits = model(input_ids=ids, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                       mm_token_type_ids=(ids == cfg.image_token_id).int(), use_cache=False).logits
        logits.float().square().mean().backward()
    measured = counter.get_total_flops()
    # torch's counter does not count CPU SDPA kernels, so compare the dense layers; it also skips the patch conv's
    # input grad (pixels need none), which we count: 1.7% here.
    ours = bench.train_step_flops(cfg, shape, attention=False)
    assert 1.0 <= ours / measured < 1.03, (ours, measured)
    assert bench.train_step_flops(cfg, shape) > ours


def test_bench_user_error_has_no_traceback(capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    rc = bench.run(parser.parse_args(["--shape", "tiny", "--seq", "16", "--image-patches", "16"]))
    out = capsys.readouterr()
    assert rc == 2 and "--image-patches 16" in out.out and "Traceback" not in out.out + out.err


@pytest.mark.slow
def test_bench_train_cli_tiny():
    # a fresh single-process world: drop rendezvous variables another test of this session may have set
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "megatron_vr1.cli", "bench", "train", "--shape", "tiny", "--seq", "96",
                           "--steps", "1", "--warmup", "1"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "megatron-core (local, attention=local)" in proc.stdout and "transformers (sdpa, torch AdamW)" in proc.stdout
    assert "megatron / transformers tokens/s:" in proc.stdout
