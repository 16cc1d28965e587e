"""GPU acceptance run: the trainer's accelerator path, end to end, on one machine, in one table.

    bash tools/gpu_acceptance.sh            # a GPU machine: ~5 min on one H100 / H200
    bash tools/gpu_acceptance.sh --cpu      # the same code at a tiny shape on the CPU (~1 min; make test runs it)

Sections (each one PASS / FAIL / SKIP with its numbers; a failing section does not stop the others):

1. parity: a random Qwen2.5-VL at 7B width (hidden 3584, 28/4 heads, FFN 18944, vocabulary 152064) with few
   layers, saved as a Hugging Face directory; the Megatron policy's teacher-forced logits (relative to the logit
   scale: 1e-4 in fp32, 3e-2 in bf16, ``convert verify``'s bounds) and logprobs against transformers' (SDPA) on
   the same device, in fp32 and in bf16. Logprobs in fp32 must agree to 2e-3 (both compute in fp32;
   only kernels and summation order differ). bf16 must agree to 0.02 mean and 0.25 max |delta logprob|: bf16
   keeps 8 mantissa bits (relative rounding 2^-9 per op) and the two models round at different places (other
   fused kernels; megatron computes the attention softmax in fp32), which over a few layers and a 152k-way
   log-softmax gives per-token gaps of a few hundredths, rarely a tenth. Not yet run on a GPU: docs/gpu.md.
2. grpo: ``megatron-vr1 train``'s own code path (``commands.train.train``): GRPO steps on synthetic detection rows
   with the in-process transformers rollout engine on the same GPU, reference model for the KL term, real
   reward. Step / update / rollout / sync seconds (medians after the first step), training tokens/s, TFLOP/s
   and MFU of the update (matmul FLOPs as in ``bench train``: 3 passes for the update, 1 for the reference),
   peak GPU memory, every loss finite, every step's reward scored.
3. kernels: the same GRPO train step (``Policy.train_step`` on a batch of odd-length rows, so the FP8 padding is
   exercised) with the local spec (torch SDPA), and when Transformer Engine imports: TE bf16, TE FP8 delayed
   scaling, TE FP8 current (tensorwise) scaling.
4. tp2: tensor parallelism 2 in one process group (torchrun, 2 GPUs): logprobs and one update's gradient norm
   against TP=1 on the same batch. Skipped on a one-GPU machine; with ``--cpu`` it runs on 2 CPU processes (gloo).

Needs torch, transformers, megatron-core and this project's Python dependencies (numpy, scipy, pillow,
safetensors, tokenizers, torchvision); nothing is downloaded. ``--wheels DIR`` (in the shell wrapper) installs
carried wheels first on machines without a network.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@dataclass(frozen=True, slots=True)
class Shape:
    """What one acceptance run builds and runs."""

    name: str
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vision: tuple[int, int, int, int]
    """(depth, hidden, ffn, heads) of the vision tower."""
    vocab: int | None
    image: int
    """Image side in pixels (a multiple of 28): image_side^2 / 784 vision tokens per row."""
    dtype: str
    grpo_steps: int
    prompts: int
    generations: int
    new_tokens: int
    kernel_steps: int
    completion_lengths: tuple[int, ...] = field(default=())
    """Teacher-forced completion lengths of the parity / kernel batches (odd on purpose: padding)."""


GPU = Shape(name="7B width, 4 layers", hidden=3584, ffn=18944, layers=4, heads=28, kv_heads=4,
            vision=(4, 1280, 3420, 16), vocab=152064, image=448, dtype="bfloat16", grpo_steps=20, prompts=8,
            generations=4, new_tokens=48, kernel_steps=5, completion_lengths=(61, 37, 53, 29, 47, 17, 43, 33))
CPU = Shape(name="tiny (test preset)", hidden=64, ffn=128, layers=2, heads=4, kv_heads=2, vision=(2, 32, 64, 2),
            vocab=None, image=56, dtype="float32", grpo_steps=3, prompts=2, generations=2, new_tokens=8,
            kernel_steps=2, completion_lengths=(7, 3, 5, 9))


@dataclass(slots=True)
class Row:
    section: str
    check: str
    status: str  # PASS / FAIL / SKIP
    value: str
    note: str = ""


# ---- helpers ------------------------------------------------------------------------------------------------------

def device_of(cpu: bool):
    import torch

    return torch.device("cpu") if cpu else torch.device("cuda", torch.cuda.current_device())


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def build_assets(shape: Shape, out: Path, device) -> tuple[Path, Path]:
    """The random model directory and synthetic train rows (reused when already there)."""
    from megatron_vr1.data.synth import build_synth
    from megatron_vr1.data.tiny_model import TinyModelSpec, build_model_dir

    model_dir, data_dir = out / "model", out / "data"
    if not (model_dir / "model.safetensors.index.json").is_file() and not (model_dir / "model.safetensors").is_file():
        depth, vh, vffn, vheads = shape.vision
        spec = TinyModelSpec(hidden_size=shape.hidden, intermediate_size=shape.ffn, num_hidden_layers=shape.layers,
                             num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, rope_theta=1e6,
                             vision_depth=depth, vision_hidden_size=vh, vision_intermediate_size=vffn,
                             vision_num_heads=vheads, vision_window_size=112, vision_fullatt_block_indexes=(depth - 1,),
                             min_pixels=shape.image ** 2, max_pixels=shape.image ** 2)
        build_model_dir(model_dir, spec, seed=0, vocab_size=shape.vocab, dtype=shape.dtype, device=str(device))
    if not (data_dir / "train.jsonl").is_file():
        build_synth(data_dir, n=max(64, shape.prompts * (shape.grpo_steps + 2)), seed=0, difficulty="easy",
                    image_size=shape.image)
    return model_dir, data_dir / "train.jsonl"


def run_config(shape: Shape, model_dir: Path, run_dir: Path, train_path: Path | None = None, **sections):
    from megatron_vr1.config.run import RunConfig

    base = {
        "name": "gpu-acceptance", "model": {"hf_path": str(model_dir), "dtype": shape.dtype},
        "rollout": {"engine": "hf", "max_new_tokens": shape.new_tokens, "temperature": 1.0},
        "grpo": {"num_generations": shape.generations, "prompts_per_step": shape.prompts,
                 "train_steps": shape.grpo_steps, "lr": 1e-6, "beta": 0.04, "lr_schedule": "constant"},
        "data": {"min_pixels": shape.image ** 2, "max_pixels": shape.image ** 2,
                 "train_path": str(train_path or "")},
        "checkpoint": {"save_interval": 0, "resume": False},
        "log": {"run_dir": str(run_dir), "progress": False, "tensorboard": False},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return RunConfig.from_dict(base)


def teacher_forced_batch(model_dir: Path, train_path: Path, shape: Shape, cfg):
    """Rows of real prompts (synthetic images) with random completions of ``shape.completion_lengths``."""
    import torch
    from transformers import AutoTokenizer

    from megatron_vr1.data.dataset import LocalizationDataset
    from megatron_vr1.training.batch import build_train_batch, prepare_prompt
    from megatron_vr1.types import Completion, RolloutGroup

    tok = AutoTokenizer.from_pretrained(model_dir)
    samples = iter(LocalizationDataset.from_config(cfg.data, str(train_path)))
    g = torch.Generator().manual_seed(0)
    groups, preps, n = [], [], shape.generations
    lengths = list(shape.completion_lengths)
    for start in range(0, len(lengths), n):
        prep = prepare_prompt(next(samples), tok, min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
        comps = tuple(Completion(sample_id=prep.sample.sample_id, request_id=f"r{start + i}", text="",
                                 token_ids=tuple(torch.randint(20, len(tok), (m,), generator=g).tolist()),
                                 logprobs=tuple([-3.0] * m), finish_reason="length", weight_version=0)
                      for i, m in enumerate(lengths[start:start + n]))
        groups.append(RolloutGroup(sample=prep.sample, completions=comps))
        preps.append(prep)
    adv = torch.randn(len(lengths), generator=g)
    return build_train_batch(groups, preps, adv, eos_ids=[]), preps


def matmul_flops(model_dir: Path, shape: Shape, tokens: float, rows: int, passes: float) -> float:
    """Matmul FLOPs of ``passes`` forward-equivalents (an update is 3, a reference forward 1) over ``rows``
    sequences of ``tokens`` in all, each with one image: ``bench train``'s model at the mean row length."""
    from transformers import AutoConfig

    from megatron_vr1.benchmarks.train import StepShape, train_step_flops

    side = shape.image // 14
    step = StepShape(seq=max(1, round(tokens / rows)), batch=rows, patches=side * side, grid=(1, side, side))
    return train_step_flops(AutoConfig.from_pretrained(model_dir), step) / 3.0 * passes


# ---- sections -----------------------------------------------------------------------------------------------------

def section_parity(shape: Shape, model_dir: Path, train_path: Path, out: Path, device, rows: list[Row]) -> None:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_vr1.models.specs import resolve_impl
    from megatron_vr1.parallel import state
    from megatron_vr1.training.policy import Policy

    tolerance = {"float32": (2e-3, 2e-3), "bfloat16": (0.02, 0.25)}
    logit_tolerance = {"float32": 1e-4, "bfloat16": 3e-2}  # relative, as `convert verify` bounds it
    for dtype in ("float32", "bfloat16"):
        cfg = run_config(shape, model_dir, out / f"parity-{dtype}", model={"dtype": dtype})
        batch, preps = teacher_forced_batch(model_dir, train_path, shape, cfg)
        state.initialize(cfg.parallel)
        try:
            policy = Policy(cfg, with_reference=False)
            ours = policy.logprobs(batch)
            impl = resolve_impl(cfg.model)
            ours_logits = completion_logits(policy, batch)
            del policy
        finally:
            state.destroy()
        release(device)
        hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            model_dir, dtype=getattr(torch, dtype), attn_implementation="sdpa").to(device).eval()
        gaps, logit_gap, logit_scale = [], 0.0, 0.0
        for b in range(batch.input_ids.shape[0]):
            prep = preps[b // shape.generations]
            ids = batch.input_ids[b:b + 1, :int(batch.lengths[b])].to(device)
            with torch.no_grad():
                logits = hf(input_ids=ids, pixel_values=prep.pixel_values.to(device),
                            image_grid_thw=batch.image_grid_thw[int(batch.group_ids[b])][None].to(device),
                            mm_token_type_ids=(ids == hf.config.image_token_id).int()).logits.float()
            ref = torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0].cpu()
            p = int(batch.prompt_lengths[b])
            n = int(batch.lengths[b]) - p
            gaps.append((ours[b, p:p + n] - ref[p - 1:p - 1 + n]).abs())
            hf_logits = logits[0, p - 1:p - 1 + n].cpu()
            logit_gap = max(logit_gap, float((ours_logits[b] - hf_logits).abs().max()))
            logit_scale = max(logit_scale, float(hf_logits.abs().max()))
        del hf
        release(device)
        rel = logit_gap / max(logit_scale, 1e-30)
        rows.append(Row("parity", f"logits vs transformers, {dtype}", "PASS" if rel <= logit_tolerance[dtype] else "FAIL",
                        f"relative {rel:.2e} (max abs {logit_gap:.2e} / max logit {logit_scale:.2e})",
                        f"tolerance {logit_tolerance[dtype]:g} relative (convert verify's {dtype} default)"))
        gap = torch.cat(gaps)
        mean_tol, max_tol = tolerance[dtype]
        ok = float(gap.mean()) <= mean_tol and float(gap.max()) <= max_tol
        rows.append(Row("parity", f"logprobs vs transformers, {dtype}", "PASS" if ok else "FAIL",
                        f"mean {float(gap.mean()):.2e}, max {float(gap.max()):.2e} over {gap.numel()} tokens",
                        f"tolerance mean {mean_tol:g} / max {max_tol:g}; megatron spec: {impl}"))


def section_grpo(shape: Shape, model_dir: Path, train_path: Path, out: Path, device, rows: list[Row]) -> None:
    from megatron_vr1.benchmarks.train import peak_flops
    from megatron_vr1.commands.train import train

    cfg = run_config(shape, model_dir, out / "grpo", train_path)
    release(device)
    t0 = time.time()
    records = train(cfg)
    wall = time.time() - t0
    steady = records[1:] or records
    med = lambda key: statistics.median(r[key] for r in steady)  # noqa: E731
    losses_ok = all(math.isfinite(r[k]) for r in records for k in r if k.startswith("train/"))
    rewards_ok = len(records) == shape.grpo_steps and all(math.isfinite(r["reward/total"]) for r in records)
    rows.append(Row("grpo", f"{len(records)} steps of megatron-vr1 train (HF rollout engine)",
                    "PASS" if losses_ok and rewards_ok else "FAIL",
                    f"reward {statistics.mean(r['reward/total'] for r in records):.3f}, "
                    f"pg_loss {records[-1]['train/pg_loss']:.3g}, kl {records[-1]['train/kl_mean']:.3g}",
                    f"every loss finite: {losses_ok}; every step's reward scored: {rewards_ok}; {wall:.0f} s wall"))
    tokens = med("throughput/train_tokens")
    # one update (3 passes) and the reference forward over the step's rows
    flops = matmul_flops(model_dir, shape, tokens, shape.prompts * shape.generations, passes=4.0)
    peak, source = peak_flops(device, _dtype(shape), None)
    train_s = med("time/train_s")
    rows.append(Row("grpo", "update: tokens/s, TFLOP/s, MFU", "PASS",
                    f"{tokens / train_s:,.0f} tok/s, {flops / train_s / 1e12:.3g} TFLOP/s, "
                    f"MFU {100 * flops / train_s / peak:.1f}%",
                    f"median update {train_s:.2f} s over {tokens:.0f} tokens; peak {peak / 1e12:.3g} TFLOP/s "
                    f"({source})"))
    rows.append(Row("grpo", "step / rollout / sync seconds (median)", "PASS",
                    f"{med('time/step_s'):.2f} / {med('rollout/time_s'):.2f} / {med('time/sync_s'):.2f}",
                    f"peak memory {peak_memory_gb(device):.1f} GB (trainer + reference + rollout engine)"))


def completion_logits(policy, batch) -> list:
    """Per row, the policy's full-vocabulary logits [n, V] at the positions that predict its completion tokens (the
    trainer's own micro-batches, one row each; tensor parallelism 1, so the vocabulary is whole)."""
    import torch

    out = {}
    policy.model.eval()
    with torch.no_grad():
        for rows, mb in policy.micro_batches(batch, micro_batch_size=1):
            (b,) = rows
            p, n = int(batch.prompt_lengths[b]), int(batch.lengths[b]) - int(batch.prompt_lengths[b])
            logits = policy.model(**mb.model_kwargs())
            out[b] = logits[0, p - 1:p - 1 + n, :policy.vocab_size].float().cpu()
    return [out[b] for b in range(batch.input_ids.shape[0])]


def _dtype(shape: Shape):
    import torch

    return getattr(torch, shape.dtype)


def section_kernels(shape: Shape, model_dir: Path, train_path: Path, out: Path, device, rows: list[Row]) -> None:
    from megatron_vr1.benchmarks.train import peak_flops
    from megatron_vr1.models.specs import have_transformer_engine, transformer_engine_error
    from megatron_vr1.parallel import state
    from megatron_vr1.training.policy import Policy, grpo_loss_fn

    local = {"transformer_impl": "local"}
    attention = "torch SDPA" if device.type == "cuda" else "unfused, CPU"
    variants = [(f"local spec ({attention})", local)]
    te = device.type == "cuda" and have_transformer_engine()
    for name, model in (("TE bf16", {"transformer_impl": "transformer_engine"}),
                        ("TE FP8 delayed", {"transformer_impl": "transformer_engine", "fp8": "hybrid",
                                            "fp8_recipe": "delayed"}),
                        ("TE FP8 tensorwise", {"transformer_impl": "transformer_engine", "fp8": "hybrid",
                                               "fp8_recipe": "tensorwise"})):
        if te:
            variants.append((name, model))
        else:
            why = "no GPU" if device.type != "cuda" else f"Transformer Engine does not import ({transformer_engine_error()})"
            rows.append(Row("kernels", name, "SKIP", "", why[:160]))
    peak, _ = peak_flops(device, _dtype(shape), None)
    for name, model in variants:
        dtype = "bfloat16" if "TE" in name else shape.dtype
        cfg = run_config(shape, model_dir, out / f"kernels-{name}", model={**model, "dtype": dtype},
                         grpo={"beta": 0.0})
        batch, _ = teacher_forced_batch(model_dir, train_path, shape, cfg)
        release(device)
        state.initialize(cfg.parallel)
        try:
            policy = Policy(cfg)
            loss_fn = grpo_loss_fn(cfg)
            results, times = [], []
            for i in range(2 + shape.kernel_steps):
                sync(device)
                t0 = time.perf_counter()
                results.append(policy.train_step(batch, loss_fn))
                sync(device)
                if i >= 2:
                    times.append(time.perf_counter() - t0)
            step = statistics.median(times)
            multiple = policy.length_multiple
            finite = all(math.isfinite(r.grad_norm) and all(math.isfinite(v) for v in r.metrics.values())
                         for r in results)
            tokens = float(batch.lengths.sum())
            flops = matmul_flops(model_dir, shape, tokens, int(batch.input_ids.shape[0]), passes=3.0)
            rows.append(Row("kernels", name, "PASS" if finite else "FAIL",
                            f"{step:.3f} s/step, {tokens / step:,.0f} tok/s, {flops / step / 1e12:.3g} TFLOP/s, "
                            f"MFU {100 * flops / step / peak:.1f}%",
                            f"peak {peak_memory_gb(device):.1f} GB; rows padded to a multiple of {multiple}; "
                            f"grad norm {results[-1].grad_norm:.3g}; losses finite: {finite}"))
            del policy
        finally:
            state.destroy()
    release(device)


def section_tp2(shape: Shape, model_dir: Path, train_path: Path, out: Path, device, rows: list[Row],
                cpu: bool) -> None:
    import torch

    if not cpu and torch.cuda.device_count() < 2:
        rows.append(Row("tp2", "TP=2 vs TP=1", "SKIP", "", f"{torch.cuda.device_count()} GPU(s): needs 2"))
        return
    result = out / "tp2"
    result.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    from megatron_vr1.parallel.env import free_port

    tp_worker(shape, out, 1)  # TP=1 here, in a world of one
    release(device)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(Path(__file__)), "--tp-worker", "2", "--out", str(out)] + (["--cpu"] if cpu else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        rows.append(Row("tp2", "TP=2 worker", "FAIL", f"exit {proc.returncode}",
                        (proc.stderr or proc.stdout)[-300:].replace("\n", " | ")))
        return
    one, two = (json.loads((result / f"tp{tp}.json").read_text()) for tp in (1, 2))
    gap = max(abs(a - b) for a, b in zip(one["logprobs"], two["logprobs"]))
    norm_gap = abs(one["grad_norm"] - two["grad_norm"]) / max(one["grad_norm"], 1e-12)
    tol_lp, tol_norm = (1e-4, 1e-4) if shape.dtype == "float32" else (0.05, 0.02)
    ok = gap <= tol_lp and norm_gap <= tol_norm
    rows.append(Row("tp2", "TP=2 vs TP=1: logprobs, grad norm", "PASS" if ok else "FAIL",
                    f"max abs delta logprob {gap:.2e}, grad norm rel. {norm_gap:.2e}",
                    f"tolerance {tol_lp:g} / {tol_norm:g} ({shape.dtype}); "
                    + ("2 CPU processes on gloo" if cpu else "2 GPUs, NCCL")))


def tp_worker(shape: Shape, out: Path, tp: int) -> None:
    """One rank of the TP section (TP=1: this process alone): logprobs and one update's grad norm at TP=tp, fresh
    weights, the same batch."""
    from megatron_vr1.parallel import state
    from megatron_vr1.training.policy import Policy, grpo_loss_fn

    model_dir, train_path = out / "model", out / "data" / "train.jsonl"
    cfg = run_config(shape, model_dir, out / f"tp{tp}-run", parallel={"tensor_parallel": tp}, grpo={"beta": 0.0})
    batch, _ = teacher_forced_batch(model_dir, train_path, shape, cfg)
    env = state.initialize(cfg.parallel)
    try:
        policy = Policy(cfg)
        lp = policy.logprobs(batch)
        step = policy.train_step(batch, grpo_loss_fn(cfg))
        if env.rank == 0:
            (out / "tp2" / f"tp{tp}.json").write_text(json.dumps(
                {"logprobs": lp[batch.loss_mask > 0].tolist(), "grad_norm": step.grad_norm}))
    finally:
        state.destroy()


# ---- main -----------------------------------------------------------------------------------------------------------

SECTIONS = ("parity", "grpo", "kernels", "tp2")


def print_table(rows: list[Row], header: str) -> None:
    print(f"\n{header}\n")
    cols = ("section", "check", "result", "value", "note")
    data = [(r.section, r.check, r.status, r.value, r.note) for r in rows]
    widths = [max(len(c), *(len(d[i]) for d in data)) if data else len(c) for i, c in enumerate(cols)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for d in data:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(d, widths)) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="tiny shape on the CPU (rehearsal; what make test runs)")
    parser.add_argument("--out", default="runs/gpu_acceptance", help="work directory (model, data, report.json)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--tp-worker", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = CPU if args.cpu else GPU
    if args.cpu:  # before torch loads: the rehearsal must not wander onto a GPU of this host (nor its workers)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    out = Path(args.out).resolve()
    if args.tp_worker:
        tp_worker(shape, out, args.tp_worker)
        return 0
    missing = [m for m in ("torch", "transformers", "megatron.core", "numpy", "scipy", "PIL", "safetensors",
                           "tokenizers", "torchvision") if _missing(m)]
    if missing:
        print(f"gpu_acceptance: missing Python packages: {', '.join(missing)}; install them (or carry wheels: "
              "tools/gpu_acceptance.sh --wheels DIR)", file=sys.stderr)
        return 2
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("gpu_acceptance: no CUDA device here; run on a GPU machine, or pass --cpu for the tiny rehearsal",
              file=sys.stderr)
        return 2
    wanted = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        print(f"gpu_acceptance: unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    device = device_of(args.cpu)
    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    model_dir, train_path = build_assets(shape, out, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    from importlib.metadata import version

    header = (f"megatron-vr1 GPU acceptance: {name}, torch {torch.__version__}, transformers {version('transformers')}, "
              f"megatron-core {version('megatron-core')}, model {shape.name} ({shape.dtype})")
    print(header, flush=True)
    for section in wanted:
        t0 = time.time()
        try:
            if section == "tp2":
                section_tp2(shape, model_dir, train_path, out, device, rows, args.cpu)
            else:
                globals()[f"section_{section}"](shape, model_dir, train_path, out, device, rows)
        except Exception as e:  # one broken section must not hide the others' results
            traceback.print_exc()
            rows.append(Row(section, "section", "FAIL", type(e).__name__, str(e)[:200].replace("\n", " ")))
        print(f"[{section}: {time.time() - t0:.0f} s]", flush=True)
    header += f"; {time.time() - started:.0f} s in all"
    print_table(rows, header)
    (out / "report.json").write_text(json.dumps({"header": header, "rows": [asdict(r) for r in rows]}, indent=1))
    return 1 if any(r.status == "FAIL" for r in rows) else 0


def _missing(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:
        return True


if __name__ == "__main__":
    sys.exit(main())
