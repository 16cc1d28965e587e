"""``megatron-vr1 bench reward``: completions/s of the batched reward vs a plain per-completion implementation.

Batches of 64 synthetic policy-like answers (jittered, missed and extra boxes, ~5% truncated) at 1, 10 and 30
ground-truth boxes. Both implementations run single-threaded in this process on the same inputs:
``rewards.score_batch`` and ``rewards.reference`` (the released per-completion logic, numpy in place of
torch). Rates use the thread's CPU time (``time.thread_time``), which a busy shared machine inflates less
than wall time; the wall-clock rate is shown too. Medians over ``--repeats``. The last two columns are the
rate of json.loads alone on the same answers, the floor of a scorer that decodes every answer as JSON,
under the same machine load, and the official scorer's time as a multiple of it (the spelled-answer lane
of ``rewards/extract.py`` reads most answers without json.loads, so it can go below 1).

The second table shows the GIL question: a pure-Python loop in the main thread (a stand-in for the
trainer's generation bookkeeping) timed alone, while a RewardWorker process scores a large batch, and while
a thread of this process scores the same batch.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time

from megatron_vr1.config.reward import RewardConfig
from megatron_vr1.rewards import RewardWorker, reference, score_batch, target_from_row
from megatron_vr1.rewards.synthetic import make_row, noisy_answer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=64, help="completions per batch (default 64)")
    parser.add_argument("--gt", type=int, nargs="+", default=[1, 10, 30], help="GT boxes per query")
    parser.add_argument("--repeats", type=int, default=30, help="timed repeats of the batched scorer")
    parser.add_argument("--baseline-repeats", type=int, default=3, help="timed repeats of the baseline")
    parser.add_argument("--overlap-batch", type=int, default=4096, help="batch size of the GIL demo (0: skip)")
    parser.add_argument("--seed", type=int, default=0)


def _median_time(fn, repeats: int) -> tuple[float, float]:
    """Median (thread CPU seconds, wall seconds) of ``fn()``."""
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.thread_time(), time.perf_counter()
        fn()
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(cpu), statistics.median(wall)


def _batch(rng: random.Random, n: int, gt: int) -> tuple[list[str], list[dict]]:
    rows = [make_row(rng, gt) for _ in range(n)]
    return [noisy_answer(r, rng) for r in rows], rows


def _try_json(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _python_work(iterations: int) -> int:
    # Pure-Python bookkeeping: holds the GIL the whole time, like a generation loop's host code.
    acc = 0
    for i in range(iterations):
        acc = (acc * 31 + i) % 1_000_003
    return acc


def _overlap_table(batch: int, seed: int) -> None:
    rng = random.Random(seed)
    completions, rows = _batch(rng, batch, 10)
    targets = [target_from_row(r) for r in rows]
    cfg = RewardConfig(preset="official")
    iters = 1_000_000

    def timed_loop() -> tuple[float, float]:
        w0, c0 = time.perf_counter(), time.thread_time()
        _python_work(iters)
        return time.perf_counter() - w0, time.thread_time() - c0

    def with_process(worker: RewardWorker) -> tuple[tuple[float, float], bool]:
        fut = worker.submit(completions, targets)
        timing = timed_loop()
        done = fut.done()
        fut.result()
        return timing, done

    def with_thread() -> tuple[tuple[float, float], bool]:
        thread = threading.Thread(target=score_batch, args=(completions, targets, cfg))
        thread.start()
        timing = timed_loop()
        done = not thread.is_alive()
        thread.join()
        return timing, done

    # Interleaved repeats, medians: the machine's background load drifts between runs.
    runs: dict[str, list] = {"alone": [], "process": [], "thread": []}
    with RewardWorker(cfg) as worker:
        worker.submit(completions[:8], targets[:8]).result()  # start the process outside the timing
        for _ in range(3):
            runs["alone"].append((timed_loop(), "-"))
            runs["process"].append(with_process(worker))
            runs["thread"].append(with_thread())

    def med(name: str) -> tuple[tuple[float, float], str]:
        walls = sorted(runs[name], key=lambda r: r[0][0])
        (wall, cpu), done = walls[len(walls) // 2]
        return (wall, cpu), str(done)

    alone, _ = med("alone")
    (w_p, c_p), done_process = med("process")
    (w_t, c_t), done_thread = med("thread")
    with_process_t, with_thread_t = (w_p, c_p), (w_t, c_t)
    print(f"\nmain-thread Python loop ({iters:,} iterations) while {batch} completions (10 GT) are scored "
          "(median of 3 interleaved runs)")
    print("| scoring runs in        | loop wall s | slowdown | loop CPU / wall | scoring done before loop |")
    print("|------------------------|-------------|----------|-----------------|--------------------------|")
    for name, (wall, cpu), done in (("nowhere (loop alone)", alone, "-"),
                                    ("RewardWorker process", with_process_t, done_process),
                                    ("thread of this process", with_thread_t, done_thread)):
        print(f"| {name:<22} | {wall:11.3f} | {wall / alone[0]:7.2f}x | {cpu / wall:15.0%} | {done:<24} |")
    print("loop CPU / wall: the share of the loop's wall time it actually ran. A scoring thread takes the GIL")
    print("from it; the worker process only competes for a core (this machine's other load included).")


def run(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    official, paper = RewardConfig(preset="official"), RewardConfig(preset="paper")
    print(f"reward scoring, batches of {args.batch} completions, single thread, median of {args.repeats} "
          f"(baseline: {args.baseline_repeats}); rates from thread CPU time (wall-clock rate in brackets)")
    print("| GT boxes | batched official c/s | batched paper c/s | per-completion baseline c/s | speed-up "
          "| json.loads only c/s | official / json.loads time |")
    print("|----------|----------------------|-------------------|-----------------------------|----------"
          "|---------------------|----------------------------|")
    for gt in args.gt:
        completions, rows = _batch(rng, args.batch, gt)
        targets = [target_from_row(r) for r in rows]
        cpu_o, wall_o = _median_time(lambda: score_batch(completions, targets, official, None), args.repeats)
        cpu_p, wall_p = _median_time(lambda: score_batch(completions, targets, paper, None), args.repeats)
        cpu_b, wall_b = _median_time(lambda: reference.score_rows(completions, rows, None), args.baseline_repeats)
        # The floor of any Python scorer: one json.loads per completion (the answer bodies, nothing else).
        bodies = [c.strip()[8:-3] if c.strip().endswith("```") else c for c in completions]
        cpu_j, _ = _median_time(lambda: [_try_json(x) for x in bodies], args.repeats)
        n = args.batch
        print(f"| {gt:8d} | {n / cpu_o:9,.0f} ({n / wall_o:8,.0f}) | {n / cpu_p:7,.0f} ({n / wall_p:7,.0f}) "
              f"| {n / cpu_b:15,.0f} ({n / wall_b:9,.0f}) | {cpu_b / cpu_o:7.1f}x | {n / cpu_j:19,.0f} "
              f"| {cpu_o / cpu_j:25.2f}x |")
    if args.overlap_batch:
        _overlap_table(args.overlap_batch, args.seed)
    return 0
