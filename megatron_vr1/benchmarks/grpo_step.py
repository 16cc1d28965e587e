"""``megatron-vr1 bench grpo-step``: the CPU demo's GRPO step, rollout and update, each against its baseline.

Rollout: P prompts x G samples of the demo's synthetic images (T = 0.7, one ``n = G`` request per prompt) from a
real SGLang CPU server, launched twice: stock SGLang (``python -m sglang.launch_server``, whose torch_native
backend runs decode attention one request at a time) with 64 running requests (the earlier CPU default), and the
project's launcher (``sglang_cpu_server.py``: decode and extend attention batched over requests) with
128.

Update: one GRPO optimiser step of the megatron-core policy on that rollout batch, unpacked (every completion
repeats its prompt and image) and with shared-prompt packing (``parallel.pack_groups``: one copy per group),
micro-batch of 128 both ways; their logprobs are compared too (they must agree).

Medians over ``--repeats`` after one warm-up; the two variants of each part alternate, in one process, so a
busy machine slows both alike. Needs the data and warm start the demo uses (``megatron-vr1 data synth`` is run
if the data is missing).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="assets/warmstart", help="HF checkpoint (default: the demo's warm start)")
    parser.add_argument("--data", default="runs/demo/data", help="demo data dir (built if missing)")
    parser.add_argument("--prompts", type=int, default=16,
                        help="prompts per step (the demo recipe: 32; 16 x 8 is the same 128 completions)")
    parser.add_argument("--generations", type=int, default=8, help="samples per prompt (the demo recipe: 4)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work-dir", default="runs/bench_grpo_step")


def _prompts(args, tokenizer, count: int, offset: int):
    from megatron_vr1.data.dataset import LocalizationDataset
    from megatron_vr1.training.batch import prepare_prompt

    dataset = LocalizationDataset(Path(args.data) / "train.jsonl")
    it = iter(dataset)
    samples = [next(it) for _ in range(offset + count)][offset:]
    return [prepare_prompt(s, tokenizer, min_pixels=56 * 56, max_pixels=56 * 56) for s in samples]


def _rollout_seconds(args, prompts_per_rep, *, batched: bool, running: int) -> tuple[list[float], list]:
    from megatron_vr1.rollout.engine import GenerationRequest, SamplingParams
    from megatron_vr1.rollout.sglang_engine import SGLangEngine, image_pad_id_of
    from megatron_vr1.rollout.sglang_server import SGLangServer, ServerSpec

    server = SGLangServer(ServerSpec(model_path=args.model, device="cpu", max_running_requests=running,
                                     batched_cpu_decode=batched, log_dir=str(Path(args.work_dir) / "logs")))
    server.start()
    engine = SGLangEngine([server], image_pad_id=image_pad_id_of(args.model), parallel_sampling=True)
    sampling = SamplingParams(temperature=0.7, max_new_tokens=48, n=args.generations)
    seconds, groups = [], []
    try:
        for rep, prompts in enumerate(prompts_per_rep):
            requests = [GenerationRequest(request_id=f"b{rep}-{i}", sample_id=p.sample.sample_id, prompt=p.prompt,
                                          image=p.sample.image, sampling=sampling) for i, p in enumerate(prompts)]
            t0 = time.perf_counter()
            out = engine.generate(requests)
            seconds.append(time.perf_counter() - t0)
            groups.append(out)
    finally:
        engine.close()
        server.stop()
    return seconds[1:], groups  # the first call warms the server up


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    from megatron_vr1.algorithms.advantages import group_advantages
    from megatron_vr1.config.recipes import load_recipe
    from megatron_vr1.parallel import state
    from megatron_vr1.rewards.score import score_batch
    from megatron_vr1.rewards.target import target_from_sample
    from megatron_vr1.rollout.sglang_server import SGLangNotInstalled, find_sglang_python
    from megatron_vr1.training.batch import build_train_batch
    from megatron_vr1.training.policy import Policy, grpo_loss_fn
    from megatron_vr1.types import RolloutGroup

    try:
        find_sglang_python()
    except SGLangNotInstalled as e:
        print(f"bench grpo-step: {e}")
        return 2
    if not (Path(args.data) / "train.jsonl").is_file():
        from megatron_vr1.data.synth import build_synth

        build_synth(Path(args.data), n=4000, n_val=200, seed=1, difficulty="demo")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    reps = args.repeats + 1
    prompts = [_prompts(args, tokenizer, args.prompts, rep * args.prompts) for rep in range(reps)]

    # ---- rollout: stock SGLang vs batched attention (alternating servers would double start-up; one after another)
    stock, _ = _rollout_seconds(args, prompts, batched=False, running=64)
    batched, groups = _rollout_seconds(args, prompts, batched=True, running=128)

    # ---- update: unpacked vs packed, on the batched server's rollouts
    cfg = load_recipe("tiny_cpu_demo", (f"model.hf_path={args.model}",))
    state.initialize(cfg.parallel)
    try:
        batches = []
        for rep_groups, rep_prompts in zip(groups, prompts):
            rewards = score_batch([c.text for g in rep_groups for c in g],
                                  [target_from_sample(p.sample) for p in rep_prompts for _ in range(args.generations)],
                                  cfg.reward)
            adv = group_advantages(rewards=[r.total for r in rewards], group_size=args.generations).advantages
            rollout = [RolloutGroup(sample=p.sample, completions=tuple(g)) for p, g in zip(rep_prompts, rep_groups)]
            batches.append(build_train_batch(rollout, rep_prompts, adv, eos_ids=[tokenizer.convert_tokens_to_ids(
                "<|im_end|>")]))
        policies = {}
        for packed in (False, True):
            c = load_recipe("tiny_cpu_demo", (f"model.hf_path={args.model}", f"parallel.pack_groups={packed}",
                                              "parallel.micro_batch_size=128", f"log.run_dir={args.work_dir}/run"))
            policies[packed] = (Policy(c), grpo_loss_fn(c))
        lp_gap = float((policies[False][0].logprobs(batches[0]) - policies[True][0].logprobs(batches[0])).abs().max())
        update = {False: [], True: []}
        tokens = {}
        for rep, batch in enumerate(batches):
            for packed in (False, True):
                policy, loss_fn = policies[packed]
                t0 = time.perf_counter()
                policy.train_step(batch, loss_fn)
                if rep:
                    update[packed].append(time.perf_counter() - t0)
                mbs = policy.micro_batches(batch)
                tokens[packed] = sum(int(mb.input_ids.numel()) for _, mb in mbs)
    finally:
        state.destroy()

    completions = args.prompts * args.generations
    med = statistics.median
    print(f"\nbench grpo-step: the CPU demo's step, {args.prompts} prompts x {args.generations} samples "
          f"({completions} completions), model {args.model}; medians of {args.repeats} (threads: "
          f"{torch.get_num_threads()})")
    print(f"{'part':<44} {'seconds':>8} {'speed-up':>9}")
    print(f"{'rollout, stock SGLang (64 running)':<44} {med(stock):>8.3f} {1.0:>9.2f}")
    print(f"{'rollout, batched attention (128 running)':<44} {med(batched):>8.3f} {med(stock) / med(batched):>9.2f}")
    unpacked = f"update, unpacked ({tokens[False]} tokens incl. pad)"
    packed = f"update, shared-prompt packing ({tokens[True]} tokens)"
    print(f"{unpacked:<44} {med(update[False]):>8.3f} {1.0:>9.2f}")
    print(f"{packed:<44} {med(update[True]):>8.3f} {med(update[False]) / med(update[True]):>9.2f}")
    before, after = med(stock) + med(update[False]), med(batched) + med(update[True])
    print(f"{'rollout + update':<44} {before:>8.3f} -> {after:.3f} ({before / after:.2f}x)")
    print(f"packed vs unpacked logprobs: max |diff| {lp_gap:.2e}")
    return 0
