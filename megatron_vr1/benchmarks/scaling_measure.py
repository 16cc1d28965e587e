"""Measure mode of ``megatron-vr1 bench scaling``: one layout in the current world, one CSV row.

Under torchrun or Slurm-launched ranks (a plain process is a world of one) this builds the recipe's policy at
``--tp`` x ``--pp`` (DP = world / (TP x PP)), runs warm-up steps and then timed GRPO-shaped steps on a synthetic
batch, times one full weight export, and appends one row on rank 0.

A GRPO-shaped step is what the trainer pays per optimizer step after the rollout: the reference forward (when
``grpo.beta > 0``) and the policy's forward + backward + optimizer over every sequence of the step, one sequence
per micro-batch, 1F1B under PP, with the recipe's loss (clip, KL, TIS, aggregation). Each sequence is an image at
the recipe's ``data.max_pixels``, a prompt and a ``rollout.max_new_tokens`` completion in the loss: the longest
sequence the recipe produces, so the numbers are an upper bound on a real step's training part.

Rollout: generation runs in SGLang servers whose decode speed is their own benchmark (``megatron-vr1 bench sync``
starts one; SGLang's ``bench_serving`` measures decode), so by default the row leaves ``rollout_s`` empty and says
so. ``--rollout hf`` times one rollout-sized generation instead (the step's prompts x G completions of exactly
``max_new_tokens`` tokens) with the in-process transformers engine on rank 0 while the other ranks wait: a
stand-in that is cheap for the tiny model and slow for a 7B, and the row's note names it.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

PROMPT_TOKENS = 64
"""Text tokens of a Vision-R1 prompt (the chat template and the category list), beside the image."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MeasureSpec:
    """What one measurement runs; validated before any process group exists."""

    recipe: str
    overrides: tuple[str, ...] = ()
    model: str | None = None
    """A Hugging Face Qwen2.5-VL directory, ``tiny`` (a random ~2M-parameter model built under work_dir), or
    None for the recipe's ``model.hf_path``."""
    tp: int | None = None
    pp: int | None = None
    """None: the recipe's layout."""
    steps: int = 5
    warmup: int = 1
    global_batch: int | None = None
    batch_per_proc: int | None = None
    """Weak scaling: global batch = batch_per_proc x world. Exclusive with global_batch."""
    seq: int | None = None
    csv: str = "runs/scaling/results.csv"
    work_dir: str = "runs/bench_scaling"
    peak_tflops: float | None = None
    rollout: str = "none"
    """"none" (rollout_s left empty) or "hf" (one generation with the transformers engine on rank 0)."""

    def __post_init__(self) -> None:
        if self.rollout not in ("none", "hf"):
            raise ValueError(f"--rollout {self.rollout}: use none or hf")
        for flag, v in (("--tp", self.tp), ("--pp", self.pp), ("--global-batch", self.global_batch),
                        ("--batch-per-proc", self.batch_per_proc), ("--seq", self.seq)):
            if v is not None and v < 1:
                raise ValueError(f"{flag} {v}: use an integer >= 1")
        if self.steps < 1:
            raise ValueError(f"--steps {self.steps}: time at least one step")
        if self.warmup < 0:
            raise ValueError(f"--warmup {self.warmup}: use >= 0")
        if self.global_batch is not None and self.batch_per_proc is not None:
            raise ValueError("--global-batch and --batch-per-proc both given: pass --global-batch for strong scaling "
                             "or --batch-per-proc for weak scaling, not both")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ValueError(f"--peak-tflops {self.peak_tflops}: use the device's dense peak, > 0")

    @property
    def scaling(self) -> str:
        return "weak" if self.batch_per_proc is not None else "strong"


@dataclass(frozen=True, slots=True)
class Layout:
    """The resolved run: layout, batch and sequence shape."""

    world: int
    tp: int
    pp: int
    dp: int
    global_batch: int
    seq: int
    image_side: int
    """Image side in 14-px patches (side^2 patches, side^2/4 tokens after the 2x2 merge)."""
    completion: int


def image_side_for(max_pixels: int) -> int:
    """Patches per side of a square image at ``max_pixels`` (even: the 2x2 merge needs it), as smart_resize does
    for square inputs: the side rounded down to a multiple of 28 px."""
    return max(2, 2 * int(math.sqrt(max_pixels) // 28))


def resolve_layout(spec: MeasureSpec, cfg, world: int) -> Layout:
    """The layout of ``spec`` for ``cfg`` (a RunConfig) in a world of ``world`` processes; errors name the flag."""
    tp = spec.tp or cfg.parallel.tensor_parallel
    pp = spec.pp or cfg.parallel.pipeline_parallel
    if world % (tp * pp):
        raise ValueError(f"--tp {tp} x --pp {pp} = {tp * pp} does not divide the world size {world} (torchrun "
                         f"--nproc_per_node x --nnodes, or Slurm tasks); launch a multiple of {tp * pp} processes "
                         f"or lower --tp / --pp")
    dp = world // (tp * pp)
    if spec.batch_per_proc is not None:
        batch = spec.batch_per_proc * world
    else:
        batch = spec.global_batch or cfg.grpo.prompts_per_step * cfg.grpo.num_generations
    if batch % dp:
        flag = "--batch-per-proc" if spec.batch_per_proc is not None else "--global-batch"
        raise ValueError(f"{flag}: a global batch of {batch} sequences does not split over DP={dp} ranks; use a "
                         f"global batch that is a multiple of {dp}")
    side = image_side_for(cfg.data.max_pixels)
    fixed = side * side // 4 + 2 + PROMPT_TOKENS
    seq = spec.seq or fixed + cfg.rollout.max_new_tokens
    if seq - fixed < 1:
        raise ValueError(f"--seq {seq}: the image ({side * side // 4} tokens at data.max_pixels "
                         f"{cfg.data.max_pixels}) and the {PROMPT_TOKENS}-token prompt leave no completion token; "
                         f"use --seq > {fixed}")
    return Layout(world=world, tp=tp, pp=pp, dp=dp, global_batch=batch, seq=seq, image_side=side,
                  completion=seq - fixed)


def synthetic_batch(hf_config: dict, layout: Layout, seed: int = 0):
    """A GRPO TrainBatch of random tokens: [vision_start, image pads, vision_end, prompt, completion] per row,
    the completion in the loss, group-normalised advantages, rollout logprobs for TIS."""
    import torch

    from megatron_vr1.training.policy import vocab_size_of
    from megatron_vr1.types import TrainBatch

    g = torch.Generator().manual_seed(seed)
    b, s, side = layout.global_batch, layout.seq, layout.image_side
    n_img = side * side // 4
    vocab = vocab_size_of(hf_config)
    ids = torch.randint(20, vocab, (b, s), generator=g)  # ids below 20 hold the special tokens of our tokenizers
    ids[:, 0] = hf_config["vision_start_token_id"]
    ids[:, 1:1 + n_img] = hf_config["image_token_id"]
    ids[:, 1 + n_img] = hf_config["vision_end_token_id"]
    mask = torch.zeros(b, s)
    mask[:, s - layout.completion:] = 1.0
    vision = hf_config["vision_config"]
    channels = vision.get("in_channels", 3) * vision["temporal_patch_size"] * vision["patch_size"] ** 2
    adv = torch.randn(b, generator=g)
    return TrainBatch(input_ids=ids, loss_mask=mask, advantages=(adv - adv.mean()) / (adv.std() + 1e-4),
                      rollout_logprobs=-torch.rand(b, s, generator=g) * mask,
                      pixel_values=torch.randn(b * side * side, channels, generator=g),
                      image_grid_thw=torch.tensor([[1, side, side]] * b), lengths=torch.full((b,), s),
                      group_ids=torch.arange(b))  # every row its own image: the longest step the recipe makes


def step_flops(model_dir: Path, layout: Layout, with_reference: bool) -> float:
    """Model FLOPs of one step: policy forward + backward (the matmul model of ``bench train``) plus one more
    forward for the reference model when the KL term is on."""
    from transformers import AutoConfig

    from megatron_vr1.benchmarks.train import step_shape, train_step_flops

    shape = step_shape(layout.seq, layout.global_batch, layout.image_side)
    train = train_step_flops(AutoConfig.from_pretrained(model_dir), shape)
    return train * (4 / 3 if with_reference else 1.0)


def resolve_model(spec: MeasureSpec, cfg, local_rank: int) -> Path:
    """The model directory; ``tiny`` is built once per host (local rank 0) with an atomic rename, so that nodes
    sharing a filesystem cannot leave a half-written directory behind. Callers barrier afterwards."""
    if spec.model == "tiny":
        out = Path(spec.work_dir) / "tiny-demo"
        if local_rank == 0 and not (out / "config.json").is_file():
            from megatron_vr1.data.tiny_model import build_tiny_model

            tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}-{platform.node()}")
            build_tiny_model(tmp, preset="demo", seed=0)
            try:
                tmp.rename(out)
            except OSError:  # another host won the race: its copy is identical (seeded)
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
        return out
    path = Path(spec.model or cfg.model.hf_path)
    if not (path / "config.json").is_file():
        source = "--model" if spec.model else f"recipe {spec.recipe}'s model.hf_path"
        raise ValueError(f"{source} {path} has no config.json: put the Hugging Face checkpoint there, pass --model "
                         "DIR, or --model tiny for a random ~2M-parameter model sized for CPU")
    return path


def time_hf_rollout(model_dir: Path, cfg, layout: Layout, device) -> float:
    """Seconds for the transformers engine to generate ``layout.global_batch`` completions of exactly
    ``rollout.max_new_tokens`` tokens (prompts x G, one image each at max_pixels), after one warm-up request."""
    import io

    from PIL import Image

    from megatron_vr1.rollout.engine import GenerationRequest, SamplingParams
    from megatron_vr1.rollout.hf_engine import HFEngine

    engine = HFEngine(model_dir, dtype=cfg.model.dtype, device=str(device), min_pixels=cfg.data.min_pixels,
                      max_pixels=cfg.data.max_pixels, max_batch_size=max(16, cfg.grpo.num_generations))
    try:
        buf = io.BytesIO()
        side_px = layout.image_side * 14
        Image.new("RGB", (side_px, side_px), (200, 30, 30)).save(buf, format="PNG")
        prompt = engine.render_prompt("Locate every item from the category list in the image and output the "
                                      "coordinates in JSON format. The category set includes circle, square.")
        g = cfg.grpo.num_generations if layout.global_batch % cfg.grpo.num_generations == 0 else 1
        sampling = SamplingParams(temperature=cfg.rollout.temperature or 1.0, max_new_tokens=cfg.rollout.max_new_tokens,
                                  n=g, ignore_eos=True)

        def requests(n: int) -> list[GenerationRequest]:
            return [GenerationRequest(request_id=f"bench-{i}", sample_id=f"bench-{i}", prompt=prompt,
                                      image=buf.getvalue(), sampling=sampling, return_logprob=True) for i in range(n)]

        engine.generate(requests(1))
        t0 = time.perf_counter()
        out = engine.generate(requests(layout.global_batch // g))
        seconds = time.perf_counter() - t0
        made = sum(len(c.token_ids) for group in out for c in group)
        if made != layout.global_batch * cfg.rollout.max_new_tokens:  # a short rollout would flatter the time
            raise RuntimeError(f"bench scaling --rollout hf: generated {made} tokens, expected "
                               f"{layout.global_batch} x {cfg.rollout.max_new_tokens}")
        return seconds
    finally:
        engine.close()


def git_commit() -> str:
    repo = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def node_count(world: int) -> int:
    """Nodes of this job: torchrun's agent count, else Slurm's node count, else one."""
    for key in ("GROUP_WORLD_SIZE", "SLURM_NNODES", "SLURM_JOB_NUM_NODES"):
        if os.environ.get(key, "").isdigit():
            return min(int(os.environ[key]), world)
    return 1


def device_label(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (f"CPU process ({platform.machine()}, {torch.get_num_threads()} thread(s) each, {os.cpu_count()} cores "
            "on the host)")


def _max_over_ranks(values: list[float], device) -> list[float]:
    """Each value's maximum over all ranks: a step lasts until its slowest rank is done."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def measure(spec: MeasureSpec):
    """Run the measurement in this process's world; returns the row on rank 0, None elsewhere."""
    import torch
    import torch.distributed as dist

    from megatron_vr1.benchmarks.scaling_csv import ScalingRow
    from megatron_vr1.benchmarks.train import peak_flops
    from megatron_vr1.config.parallel import ParallelConfig
    from megatron_vr1.config.recipes import load_recipe
    from megatron_vr1.parallel import state
    from megatron_vr1.parallel.env import detect
    from megatron_vr1.training.policy import Policy, grpo_loss_fn

    cfg = load_recipe(spec.recipe, spec.overrides)
    env = detect()
    layout = resolve_layout(spec, cfg, env.world_size)  # before any process group: a bad layout fails fast
    if spec.model not in (None, "tiny"):
        resolve_model(spec, cfg, env.local_rank)
    cfg.parallel = ParallelConfig(tensor_parallel=layout.tp, pipeline_parallel=layout.pp,
                                  sequence_parallel=cfg.parallel.sequence_parallel and layout.tp > 1,
                                  backend=cfg.parallel.backend, seed=cfg.parallel.seed)
    dtype = getattr(torch, cfg.model.dtype)
    if torch.cuda.is_available():  # this rank's GPU before anything touches one (state.initialize sets it too)
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    device = state.device()
    # The peak first, while this process does nothing else (on CPU it is a matmul timed here, per process).
    peak, peak_src = peak_flops(device, dtype, spec.peak_tflops)
    state.initialize(cfg.parallel, env)
    try:
        model_dir = resolve_model(spec, cfg, env.local_rank)
        dist.barrier()
        cfg.model.hf_path = str(model_dir)
        policy = Policy(cfg, hf_dir=model_dir)
        from megatron.core import parallel_state

        from megatron_vr1.training.sharding import shard_batch

        # this data-parallel rank's share of the global batch, as the trainer's loop hands it out
        shard = shard_batch(synthetic_batch(policy.hf_config, layout), layout.dp)[
            parallel_state.get_data_parallel_rank()]
        batch = shard.batch
        loss_fn = grpo_loss_fn(cfg)

        def step() -> float:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            if policy.reference is not None:
                batch.ref_logprobs = policy.logprobs(batch, reference=True)
            policy.train_step(batch, loss_fn, rows=shard.minibatches[0], totals=shard.totals[0])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - t0

        for _ in range(spec.warmup):
            step()
        times = _max_over_ranks([step() for _ in range(spec.steps)], device)
        dist.barrier()
        t0 = time.perf_counter()
        nbytes = sum(t.numel() * t.element_size() for bucket in policy.export_buckets(cfg.rollout.bucket_mb << 20)
                     for _name, t in bucket)
        export_s = _max_over_ranks([time.perf_counter() - t0], device)[0]
        flops = step_flops(model_dir, layout, policy.reference is not None)
        rollout_s = None
        if spec.rollout == "hf":
            del policy  # free the training weights before the generator loads its own copy
            if env.rank == 0:
                rollout_s = time_hf_rollout(model_dir, cfg, layout, device)
            dist.barrier()
        row = None
        if env.rank == 0:
            median = statistics.median(times)
            tokens = layout.global_batch * layout.seq
            per_dev = flops / median / layout.world
            on_cpu = device.type == "cpu"
            note = (("rollout: transformers generate on rank 0 alone (a stand-in for SGLang)" if rollout_s is not None
                     else "rollout not measured: generation is SGLang's (bench_serving / bench sync)")
                    + ("; CPU processes stand in for GPUs, the peak is a matmul measured in each process"
                       if on_cpu else ""))
            row = ScalingRow(
                timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                git_commit=git_commit(), recipe=spec.recipe, model=model_dir.name, scaling=spec.scaling,
                nodes=node_count(layout.world), gpus_or_procs=layout.world, tp=layout.tp, pp=layout.pp, dp=layout.dp,
                global_batch=layout.global_batch, seq_len=layout.seq, steps=spec.steps, step_s_median=median,
                step_s_min=min(times), tokens_per_s=tokens / median,
                tokens_per_s_per_device=tokens / median / layout.world, model_tflops_per_device=per_dev / 1e12,
                peak_tflops_per_device=peak / 1e12, peak_source=peak_src, mfu=per_dev / peak, export_s=export_s,
                export_gb=nbytes / 1e9, rollout_s=rollout_s, device=device_label(device), note=note)
        return row
    finally:
        state.destroy()
