"""RewardWorker scores in another process while the caller keeps running; rewards/ stays numpy + scipy."""

import os
import random
import subprocess
import sys
import time

from megatron_vr1.config.reward import RewardConfig
from megatron_vr1.rewards import RewardWorker, score_batch, target_from_row
from megatron_vr1.rewards.synthetic import make_row, noisy_answer


def test_importing_rewards_loads_no_torch_megatron_or_sglang():
    code = ("import sys, megatron_vr1.rewards, megatron_vr1.rewards.reference, megatron_vr1.rewards.synthetic, "
            "megatron_vr1.commands.score, megatron_vr1.benchmarks.reward, megatron_vr1.benchmarks.reward_hacking\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron', 'sglang'))\n"
            "print(bad)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"


def test_worker_scores_in_another_process_while_main_thread_progresses():
    rng = random.Random(3)
    rows = [make_row(rng, 10) for _ in range(1000)]
    completions = [noisy_answer(r, rng) for r in rows]
    targets = [target_from_row(r) for r in rows]
    cfg = RewardConfig(preset="official")
    expected = score_batch(completions, targets, cfg, 0)
    with RewardWorker(cfg) as worker:
        worker.submit(completions[:4], targets[:4]).result()  # process started and warm
        fut = worker.submit(completions, targets, 0)
        units, cpu0 = 0, time.thread_time()
        while not fut.done():
            sum(i * i for i in range(2000))  # main-thread Python work, holding this process's GIL
            units += 1
        main_cpu = time.thread_time() - cpu0
        result = fut.result()
    assert result == expected
    assert fut.worker_pid != os.getpid()
    # The main thread kept executing Python while the batch was scored elsewhere.
    assert units >= 1 and main_cpu > 0


def test_worker_propagates_errors():
    with RewardWorker(RewardConfig(preset="paper")) as worker:
        fut = worker.submit(["[]"], [target_from_row(make_row(random.Random(0), 1))], 5)
        try:
            fut.result()
        except ValueError as e:
            assert "total_steps" in str(e)
        else:
            raise AssertionError("a fraction schedule without run length must fail")
