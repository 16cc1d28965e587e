"""``megatron-vr1 bench train``: tokens/s, TFLOP/s and MFU of one policy train step (vision tower + language
model, forward + backward + optimizer), megatron-core against plain transformers in the same process.

Step = masked token-logprob loss over the text after the image (what GRPO trains on), backward, optimizer step.
Megatron: our Qwen25VLModel, megatron DDP, megatron's Adam (fp32 master weights in bf16 runs). Baseline:
Qwen2_5_VLForConditionalGeneration with SDPA attention and torch AdamW on the same shape and dtype, what a user
would otherwise pick. The two run one after the other so that only one model holds memory at a time.

FLOPs count the matmuls: 6 x params per token for the dense layers (LM and vision tower), plus attention
scores and values (causal LM, windowed / full vision blocks). MFU = achieved FLOP/s / peak: the datasheet dense
bf16 peak on known GPUs, or ``--peak-tflops``; on CPU a matmul ceiling measured in this process.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from dataclasses import dataclass

import torch

GPU_PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "B200": 2250.0, "L40S": 362.0}

# Qwen2.5-VL text / vision shapes (from the released config.json files) and a tiny one for CPU.
SHAPES = {
    "tiny": (dict(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[4, 6, 6], tie_word_embeddings=False),
             dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, fullatt_block_indexes=[1],
                  window_size=112)),
    "3b": (dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                num_attention_heads=16, num_key_value_heads=2, mrope_section=[16, 24, 24], tie_word_embeddings=True),
           dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, fullatt_block_indexes=[7, 15, 23, 31],
                window_size=112)),
    "7b": (dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, mrope_section=[16, 24, 24], tie_word_embeddings=False),
           dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, fullatt_block_indexes=[7, 15, 23, 31],
                window_size=112)),
}


def hf_config_for(shape: str):
    """A Qwen2_5_VLConfig of the named shape (random weights are built from it; nothing is downloaded)."""
    from transformers import Qwen2_5_VLConfig

    text, vision = SHAPES[shape]
    text = dict(text)
    section, tie = text.pop("mrope_section"), text.pop("tie_word_embeddings")
    return Qwen2_5_VLConfig(
        text_config=dict(text, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                         rope_scaling={"type": "mrope", "mrope_section": section}, bos_token_id=0, eos_token_id=2,
                         pad_token_id=0),
        vision_config=dict(vision, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           out_hidden_size=text["hidden_size"], tokens_per_second=2),
        image_token_id=12, video_token_id=13, vision_start_token_id=9, vision_end_token_id=10, tie_word_embeddings=tie)


@dataclass(frozen=True, slots=True)
class StepShape:
    seq: int            # tokens per sequence, vision tokens included
    batch: int
    patches: int        # vision patches per sequence (before the 2x2 merge)
    grid: tuple[int, int, int]


def step_shape(seq: int, batch: int, image_side_patches: int) -> StepShape:
    grid = (1, image_side_patches, image_side_patches)
    if image_side_patches ** 2 // 4 + 8 > seq:
        raise ValueError(f"--image-patches {image_side_patches} gives {image_side_patches ** 2 // 4} vision tokens, "
                         f"more than --seq {seq} allows; lower --image-patches or raise --seq")
    return StepShape(seq=seq, batch=batch, patches=image_side_patches ** 2, grid=grid)


def train_step_flops(hf_config, shape: StepShape, attention: bool = True) -> float:
    """Matmul FLOPs of forward + backward (= 3x forward) for one step of ``shape``; ``attention=False`` leaves out
    the attention scores / values and counts the dense layers only."""
    t, v = hf_config.text_config, hf_config.vision_config
    h, layers, heads, kv = t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads
    hd = h // heads
    lm_layer = h * (heads * hd) + 2 * h * (kv * hd) + (heads * hd) * h + 3 * h * t.intermediate_size
    lm_dense = layers * lm_layer + h * t.vocab_size  # + the output layer; the embedding lookup is no matmul
    # per token and layer: QK^T and AV over a causal context of seq/2 on average
    lm_fwd_per_token = 2 * lm_dense + attention * 2 * shape.seq * heads * hd * layers
    vh, merge = v.hidden_size, v.spatial_merge_size ** 2
    vis_dense = (3 * v.temporal_patch_size * v.patch_size ** 2 * vh + v.depth * (4 * vh * vh + 3 * vh * v.intermediate_size)
                 + ((vh * merge) ** 2 + vh * merge * v.out_hidden_size) / merge)
    window = min(shape.patches, (v.window_size // v.patch_size) ** 2)
    n_full = len(v.fullatt_block_indexes)
    vis_attn = 4 * vh * (n_full * shape.patches + (v.depth - n_full) * window)  # bidirectional
    vis_fwd_per_patch = 2 * vis_dense + attention * vis_attn
    return 3.0 * shape.batch * (shape.seq * lm_fwd_per_token + shape.patches * vis_fwd_per_patch)


def peak_flops(device: torch.device, dtype: torch.dtype, override_tflops: float | None) -> tuple[float, str]:
    """(peak FLOP/s, where it came from): --peak-tflops, the GPU datasheet (dense bf16), or on CPU a matmul
    ceiling measured here."""
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_BF16_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"{name}: dense bf16 datasheet peak"
        raise ValueError(f"unknown GPU {name!r}: pass --peak-tflops with its dense peak")
    n = 1024
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    times = []
    for _ in range(10):  # best of 10: other processes share the cores
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times), f"CPU: measured {str(dtype).removeprefix('torch.')} matmul ceiling, {torch.get_num_threads()} threads"


# --- the two train steps -----------------------------------------------------------------------------------------

def make_inputs(hf_config, shape: StepShape, device: torch.device, seed: int = 0) -> dict:
    """Random image + text sequences: text, <|vision_start|>, the image pads, <|vision_end|>, text to the end.
    The completion (scored tokens) is the text after the image."""
    g = torch.Generator().manual_seed(seed)
    n_img = shape.patches // hf_config.vision_config.spatial_merge_size ** 2
    before = 4
    after = shape.seq - before - n_img - 2
    rows = []
    for _ in range(shape.batch):
        text = lambda n: torch.randint(20, hf_config.text_config.vocab_size, (n,), generator=g)  # noqa: E731
        rows.append(torch.cat([text(before), torch.tensor([hf_config.vision_start_token_id]),
                               torch.full((n_img,), hf_config.image_token_id),
                               torch.tensor([hf_config.vision_end_token_id]), text(after)]))
    ids = torch.stack(rows)
    mask = torch.zeros_like(ids)
    mask[:, before + n_img + 2:-1] = 1
    in_ch = 3 * hf_config.vision_config.temporal_patch_size * hf_config.vision_config.patch_size ** 2
    return dict(input_ids=ids.to(device), targets=torch.roll(ids, -1, 1).to(device), mask=mask.to(device),
                pixel_values=torch.randn(shape.batch * shape.patches, in_ch, generator=g).to(device),
                image_grid_thw=torch.tensor([shape.grid] * shape.batch, device=device))


def megatron_step(hf_config, args, inputs: dict, dtype: torch.dtype):
    """A closure running one megatron train step (DDP + megatron Adam + get_forward_backward_func)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_vr1.config.model import ModelConfig
    from megatron_vr1.config.parallel import ParallelConfig
    from megatron_vr1.models.build import build_model, mrope_position_ids
    from megatron_vr1.models.specs import ddp_settings
    from megatron_vr1.training.logprobs import MicroBatch, token_logprobs

    model_cfg = ModelConfig(dtype=str(dtype).removeprefix("torch."), transformer_impl=args.transformer_impl,
                            attention_backend=args.attention_backend, fp8=args.fp8, fp8_recipe=args.fp8_recipe,
                            recompute=args.recompute)
    # The trainer's build: the same fused kernels (models.specs decides them for both).
    model = build_model(hf_config, model_cfg, ParallelConfig())
    ddp = DistributedDataParallel(config=model.config, module=model,
                                  ddp_config=DistributedDataParallelConfig(**ddp_settings(1)))
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-6, clip_grad=1.0, bf16=dtype == torch.bfloat16,
                                                 params_dtype=dtype), [ddp])
    ids = inputs["input_ids"]
    mb = MicroBatch(input_ids=ids, position_ids=mrope_position_ids(ids, inputs["image_grid_thw"], hf_config),
                    targets=inputs["targets"], loss_mask=inputs["mask"], pixel_values=inputs["pixel_values"].to(dtype),
                    image_grid_thw=inputs["image_grid_thw"])
    vocab = hf_config.text_config.vocab_size

    def forward_step(data_iterator, chunk):
        batch = next(data_iterator)

        def loss_func(logits):
            r = token_logprobs(logits, batch.targets, batch.loss_mask, vocab_size=vocab, compute_entropy=False)
            loss = -(r.logprobs.sum() / r.mask.sum())
            return loss, {"loss": loss.detach().clone()}

        return chunk(**batch.model_kwargs()), loss_func

    def step():
        ddp.zero_grad_buffer()
        opt.zero_grad()
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([mb]), model=[ddp],
                                    num_microbatches=1, seq_length=ids.shape[1], micro_batch_size=ids.shape[0],
                                    forward_only=False)
        opt.step()

    return step, (model, ddp, opt)


def transformers_step(hf_config, inputs: dict, dtype: torch.dtype, device: torch.device):
    """A closure running one plain-transformers train step (SDPA attention, torch AdamW), same loss."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf_config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # allocate on the GPU directly: a 7B fp32 copy on the host is slow and large
            model = Qwen2_5_VLForConditionalGeneration(hf_config).train()
    finally:
        torch.set_default_dtype(previous)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    ids, mask = inputs["input_ids"], inputs["mask"]

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, pixel_values=inputs["pixel_values"].to(dtype),
                       image_grid_thw=inputs["image_grid_thw"], mm_token_type_ids=(ids == hf_config.image_token_id).int(),
                       use_cache=False).logits
        lp = torch.log_softmax(logits.float(), -1).gather(-1, inputs["targets"].unsqueeze(-1)).squeeze(-1)
        (-((lp * mask).sum() / mask.sum())).backward()
        opt.step()

    return step, (model, opt)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device: torch.device, warmup: int, steps: int) -> tuple[float, float]:
    """(median seconds per step, peak memory GB: GPU allocated, or this process's max RSS on CPU)."""
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        mem = torch.cuda.max_memory_allocated(device) / 1e9
    else:
        import resource

        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return statistics.median(times), mem


# --- CLI ---------------------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--shape", choices=sorted(SHAPES), default="3b" if on_gpu else "tiny",
                        help="model shape (random weights): Qwen2.5-VL 3B / 7B, or tiny for CPU (default: 3b on GPU, "
                             "tiny on CPU)")
    parser.add_argument("--seq", type=int, default=4096 if on_gpu else 256, help="tokens per sequence incl. vision")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step")
    parser.add_argument("--image-patches", type=int, default=None,
                        help="image side in 14-px patches (side^2 patches, side^2/4 vision tokens); "
                             "default: a quarter of --seq as vision tokens")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16" if on_gpu else "float32")
    parser.add_argument("--transformer-impl", choices=["auto", "local", "transformer_engine"], default="auto")
    parser.add_argument("--attention-backend", choices=["auto", "local", "sdpa"], default="auto")
    parser.add_argument("--fp8", choices=["none", "e4m3", "hybrid"], default="none")
    parser.add_argument("--fp8-recipe", choices=["delayed", "tensorwise", "blockwise"], default="delayed")
    parser.add_argument("--recompute", choices=["none", "selective", "full"], default="none")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps; the table reports the median")
    parser.add_argument("--no-baseline", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s for MFU (default: datasheet "
                        "bf16 peak of known GPUs; a measured matmul ceiling on CPU)")


def _init_single_process() -> None:
    import os

    from megatron_vr1.config.parallel import ParallelConfig
    from megatron_vr1.parallel import state
    from megatron_vr1.parallel.env import free_port

    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    state.initialize(ParallelConfig())


def _row(name: str, seconds: float, mem: float, tokens: int, flops: float, peak: float) -> list[str]:
    return [name, f"{tokens / seconds:,.0f}", f"{flops / seconds / 1e12:.3g}", f"{100 * flops / seconds / peak:.1f}%",
            f"{seconds:.3f}", f"{mem:.2f}"]


def _print_table(rows: list[list[str]]) -> None:
    head = ["implementation", "tokens/s", "TFLOP/s", "MFU", "step s (median)", "peak mem GB"]
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    for r in [head, ["-" * w for w in widths]] + rows:
        print(" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def run(args: argparse.Namespace) -> int:
    from megatron_vr1.config.base import ConfigError
    from megatron_vr1.models.specs import MissingTransformerEngine, resolve_attention, resolve_impl

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = getattr(torch, args.dtype)
    side = args.image_patches or max(2, 2 * int((args.seq / 4) ** 0.5 // 1))
    try:
        shape = step_shape(args.seq, args.batch, side - side % 2)
        hf_config = hf_config_for(args.shape)
        peak, peak_src = peak_flops(device, dtype, args.peak_tflops)
        _init_single_process()
        from megatron_vr1.config.model import ModelConfig
        from megatron_vr1.config.parallel import ParallelConfig
        from megatron_vr1.models.specs import sequence_multiple

        cfg = ModelConfig(dtype=args.dtype, transformer_impl=args.transformer_impl, fp8=args.fp8,
                          attention_backend=args.attention_backend, fp8_recipe=args.fp8_recipe)
        impl = resolve_impl(cfg)
        attn = "TE" if impl == "transformer_engine" else resolve_attention(cfg)
        multiple = sequence_multiple(cfg, ParallelConfig())
        if shape.seq % multiple:
            raise ValueError(f"--seq {shape.seq} must be a multiple of {multiple} under --fp8 (TE's FP8 GEMM "
                             "alignment; the trainer pads its micro-batches to it)")
        inputs = make_inputs(hf_config, shape, device)
        flops = train_step_flops(hf_config, shape)
        step, held = megatron_step(hf_config, args, inputs, dtype)
    except (ValueError, ConfigError, MissingTransformerEngine) as e:
        print(f"megatron-vr1 bench train: {e}")
        return 2
    tokens = shape.seq * shape.batch
    print(f"shape={args.shape} seq={shape.seq} batch={shape.batch} vision tokens/seq={shape.patches // 4} "
          f"dtype={args.dtype} device={device} | step FLOPs={flops / 1e12:.3f} T | peak={peak / 1e12:.2f} TFLOP/s "
          f"({peak_src})")
    label = f"megatron-core ({impl}, attention={attn}" + (f", fp8 {args.fp8}/{args.fp8_recipe}" if args.fp8 != "none"
                                                          else "") + (f", recompute {args.recompute}" if
                                                                      args.recompute != "none" else "") + ")"
    m_time, m_mem = time_steps(step, device, args.warmup, args.steps)
    rows = [_row(label, m_time, m_mem, tokens, flops, peak)]
    del step, held
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not args.no_baseline:
        step, held = transformers_step(hf_config, inputs, dtype, device)
        b_time, b_mem = time_steps(step, device, args.warmup, args.steps)
        rows.append(_row("transformers (sdpa, torch AdamW)", b_time, b_mem, tokens, flops, peak))
    _print_table(rows)
    if not args.no_baseline:
        print(f"megatron / transformers tokens/s: {b_time / m_time:.2f}x")
    return 0
