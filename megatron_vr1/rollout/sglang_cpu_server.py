"""SGLang's CPU engine with attention batched over requests.

Usage: ``python sglang_cpu_server.py <sglang.launch_server args>``.
Runs in the SGLang interpreter (``.venv-sglang``), not the trainer's, so it imports only SGLang and torch, and it is
run by path, never imported as part of megatron_vr1.

Why: SGLang 0.5.10's ``torch_native`` attention backend (the one the CPU engine uses) runs decode attention one
sequence at a time, a Python loop of one SDPA call per running request per layer. With the demo's 128 running
completions that loop was 70% of the scheduler's decode time (py-spy). ``BatchedTorchNativeAttnBackend``
gathers every request's keys and values into one padded [requests, heads, max_len, dim] tensor and calls SDPA once
per layer with a length mask. Extend (prefill) is batched the same way: with parallel sampling every one of a
prompt's n copies is an extend of one token over the cached prompt, and SGLang's loop there (which also pads each
request's query to its whole key length) was 20% of a rollout once decode was batched.

The class is registered under the name ``torch_native`` itself, replacing SGLang's entry, because SGLang keys
CPU-specific choices on that name (no Triton for KV-slot lookups, CUDA graphs off). The scheduler runs in a
process started with multiprocessing's spawn, which re-executes this file's top level in the child as
``__mp_main__``, so the registration below is in force where the model actually runs.
"""

from __future__ import annotations

import os
import sys

import torch
from torch.nn.functional import scaled_dot_product_attention

from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS, register_attention_backend
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend


def batched_decode_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, *,
                             scaling: float | None, enable_gqa: bool) -> torch.Tensor:
    """One decode query per request against its cached keys/values, all requests in one SDPA call.

    query [B, Hq, D]; k_cache / v_cache [slots, Hk, D]; req_to_token [max_reqs, max_context]; seq_lens [B] (the
    query's own key included). Returns [B, Hq, Dv]. Slots past a request's length are gathered (they index the
    pool, always in range) and masked out.
    """
    lengths = seq_lens.to(torch.long)
    max_len = int(lengths.max())
    slots = req_to_token[req_pool_indices.to(torch.long), :max_len].to(torch.long)  # [B, L]
    keys = k_cache[slots].transpose(1, 2)  # [B, Hk, L, D]
    values = v_cache[slots].transpose(1, 2)
    if keys.dtype != query.dtype:
        keys, values = keys.to(query.dtype), values.to(query.dtype)
    valid = torch.arange(max_len, device=query.device)[None, :] < lengths[:, None]  # [B, L]
    out = scaled_dot_product_attention(query.unsqueeze(2), keys, values, attn_mask=valid[:, None, None, :],
                                       scale=scaling, enable_gqa=enable_gqa)  # [B, Hq, 1, Dv]
    return out.squeeze(2)


def batched_extend_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                             extend_prefix_lens: torch.Tensor, extend_seq_lens: torch.Tensor, *, scaling: float | None,
                             enable_gqa: bool, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill/extend attention of every request in one SDPA call.

    query [tokens, Hq, D] holds each request's ``extend_seq_lens[i]`` new tokens back to back; request i's keys
    are its first ``seq_lens[i]`` cached slots, of which the first ``extend_prefix_lens[i]`` were cached before
    (the radix cache's shared prefix, or the prompt of a parallel-sampling copy). Query j of request i sees keys
    up to ``prefix + j`` when ``causal``, all of them otherwise. Returns (out [valid, Hq, Dv], token index [valid])
    for the rows of ``query`` to fill.
    """
    device = query.device
    ext, pre, kv = (t.to(torch.long) for t in (extend_seq_lens, extend_prefix_lens, seq_lens))
    max_q, max_kv = int(ext.max()), int(kv.max())
    starts = torch.cumsum(ext, 0) - ext
    j = torch.arange(max_q, device=device)
    valid_q = j[None, :] < ext[:, None]  # [B, Q]
    q_index = (starts[:, None] + j[None, :]).clamp(max=query.shape[0] - 1)
    queries = query[q_index].transpose(1, 2)  # [B, Hq, Q, D]
    slots = req_to_token[req_pool_indices.to(torch.long), :max_kv].to(torch.long)  # [B, K]
    keys = k_cache[slots].transpose(1, 2)  # [B, Hk, K, D]
    values = v_cache[slots].transpose(1, 2)
    if keys.dtype != queries.dtype:
        keys, values = keys.to(queries.dtype), values.to(queries.dtype)
    t = torch.arange(max_kv, device=device)
    allowed = (t[None, None, :] < kv[:, None, None]).expand(-1, max_q, -1)  # [B, Q, K]
    if causal:
        allowed = allowed & (t[None, None, :] <= (pre[:, None] + j[None, :])[:, :, None])
    allowed = allowed | ((t[None, None, :] == 0) & ~valid_q[:, :, None])  # padding queries: a finite softmax
    out = scaled_dot_product_attention(queries, keys, values, attn_mask=allowed[:, None], scale=scaling,
                                       enable_gqa=enable_gqa)  # [B, Hq, Q, Dv]
    out = out.transpose(1, 2)  # [B, Q, Hq, Dv]
    return out[valid_q], q_index[valid_q]


class BatchedTorchNativeAttnBackend(TorchNativeAttnBackend):
    """SGLang's torch_native backend with decode and extend (prefill) attention batched over requests (see the
    module docstring)."""

    def _run_sdpa_forward_extend(self, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                                 extend_prefix_lens, extend_seq_lens, scaling=None, enable_gqa=False, causal=False):
        if seq_lens.shape[0] == 0:
            return output
        out, index = batched_extend_attention(query, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                                              extend_prefix_lens, extend_seq_lens, scaling=scaling,
                                              enable_gqa=enable_gqa, causal=causal)
        output[index] = out
        return output

    def _run_sdpa_forward_decode(self, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                                 scaling=None, enable_gqa=False, causal=False):
        if seq_lens.shape[0] == 0:
            return output
        # query/output: [tokens = requests, heads, dim]; one query token per request, so causal is moot.
        output[:] = batched_decode_attention(query, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                                             scaling=scaling, enable_gqa=enable_gqa)
        return output


BACKEND_LOG_LINE = "megatron-vr1: torch_native attention batched over requests (decode and extend)"
"""Printed by the scheduler when it builds the backend: the server log's proof that the replacement is in force."""


@register_attention_backend("torch_native")
def _create_batched_torch_native_backend(runner):
    print(BACKEND_LOG_LINE, flush=True)
    return BatchedTorchNativeAttnBackend(runner)


assert ATTENTION_BACKENDS["torch_native"] is _create_batched_torch_native_backend


def main(argv: list[str]) -> None:
    from sglang.launch_server import run_server
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    server_args = prepare_server_args(argv)
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main(sys.argv[1:])
