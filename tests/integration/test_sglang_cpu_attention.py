"""The batched decode and extend (prefill) attention of the CPU server launcher (megatron_vr1/rollout/
sglang_cpu_server.py) equal SGLang's own per-request torch_native attention, run in SGLang's interpreter on ragged
requests with GQA, a KV pool in arbitrary slot order, stale slots past each request's length, cached prefixes
(parallel-sampling copies extending one token) and causal / non-causal extends. That a launched server's spawned
scheduler really uses it is checked on a live server in test_sglang_server.py (its log line)."""

import subprocess
import textwrap

import pytest

from megatron_vr1.rollout.sglang_server import CPU_LAUNCHER, SGLangNotInstalled, find_sglang_python

CHECK = textwrap.dedent("""
    import importlib.util, json, sys
    import torch
    spec = importlib.util.spec_from_file_location("launcher", sys.argv[1])
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    gen = torch.Generator().manual_seed(0)
    results = []
    for hq, hk, d, lens in ((4, 2, 32, [1, 7, 40, 13, 2]), (8, 8, 16, [5]), (4, 1, 64, [90, 3, 3, 64])):
        slots, max_reqs, ctx = 512, 16, 128
        k_cache = torch.randn(slots, hk, d, generator=gen)
        v_cache = torch.randn(slots, hk, d, generator=gen)
        req_to_token = torch.randint(0, slots, (max_reqs, ctx), generator=gen, dtype=torch.int32)
        pool = torch.randperm(max_reqs, generator=gen)[:len(lens)]
        seq_lens = torch.tensor(lens, dtype=torch.int64)
        query = torch.randn(len(lens), hq, d, generator=gen)
        args = (k_cache, v_cache, req_to_token, pool, seq_lens)
        kw = dict(scaling=d ** -0.5, enable_gqa=hq != hk, causal=False)
        ref = TorchNativeAttnBackend._run_sdpa_forward_decode(None, query, torch.empty_like(query), *args, **kw)
        out = launcher.BatchedTorchNativeAttnBackend._run_sdpa_forward_decode(
            None, query, torch.empty_like(query), *args, **kw)
        results.append(float((out - ref).abs().max()))
    for hq, hk, d, exts, pres, causal in ((4, 2, 32, [58, 1, 1, 3], [0, 57, 57, 10], True),
                                           (2, 2, 16, [1] * 9, [5, 0, 30, 2, 2, 2, 7, 1, 60], True),
                                           (4, 1, 32, [6, 2], [0, 4], False)):
        slots, max_reqs, ctx = 1024, 16, 128
        k_cache = torch.randn(slots, hk, d, generator=gen)
        v_cache = torch.randn(slots, hk, d, generator=gen)
        req_to_token = torch.randint(0, slots, (max_reqs, ctx), generator=gen, dtype=torch.int32)
        pool = torch.randperm(max_reqs, generator=gen)[:len(exts)]
        ext, pre = torch.tensor(exts), torch.tensor(pres)
        query = torch.randn(int(ext.sum()), hq, d, generator=gen)
        args = (k_cache, v_cache, req_to_token, pool, ext + pre, pre, ext)
        kw = dict(scaling=d ** -0.5, enable_gqa=hq != hk, causal=causal)
        ref = TorchNativeAttnBackend._run_sdpa_forward_extend(None, query, torch.empty_like(query), *args, **kw)
        out = launcher.BatchedTorchNativeAttnBackend._run_sdpa_forward_extend(
            None, query, torch.full_like(query, float("nan")), *args, **kw)
        results.append(float((out - ref).abs().max()))  # NaN (a row left unwritten) fails the check below
    print(json.dumps({"max_abs_diff": results,
                      "registered": ATTENTION_BACKENDS["torch_native"].__name__}))
""")


def test_batched_attention_equals_sglang():
    try:
        python = find_sglang_python()
    except SGLangNotInstalled as e:
        pytest.skip(str(e))
    proc = subprocess.run([python, "-c", CHECK, str(CPU_LAUNCHER)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["registered"] == "_create_batched_torch_native_backend"
    assert len(result["max_abs_diff"]) == 6 and all(d < 1e-5 for d in result["max_abs_diff"]), result
