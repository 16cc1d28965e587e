"""SGLang's CPU engine with a batched decode attention: ``python sglang_cpu_server.py <sglang.launch_server args>``.

Runs in the SGLang interpreter (``.venv-sglang``), not the trainer's, so it imports only SGLang and torch, and it is
run by path, never imported as part of megatron_vr1.

Why: SGLang 0.5.10's ``torch_native`` attention backend (the one the CPU engine uses) runs decode attention one
sequence at a time, a Python loop of one SDPA call per running request per layer. With the demo's 128 running
completions that loop was 70% of the scheduler's decode time (py-spy). ``BatchedDecodeTorchNativeAttnBackend``
gathers every request's keys and values into one padded [requests, heads, max_len, dim] tensor and calls SDPA once
per layer with a length mask. Prefill (extend) keeps SGLang's own per-request path.

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


class BatchedDecodeTorchNativeAttnBackend(TorchNativeAttnBackend):
    """SGLang's torch_native backend with decode attention batched over requests (see the module docstring)."""

    def _run_sdpa_forward_decode(self, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                                 scaling=None, enable_gqa=False, causal=False):
        if seq_lens.shape[0] == 0:
            return output
        # query/output: [tokens = requests, heads, dim]; one query token per request, so causal is moot.
        output[:] = batched_decode_attention(query, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                                             scaling=scaling, enable_gqa=enable_gqa)
        return output


BACKEND_LOG_LINE = "megatron-vr1: torch_native attention with batched decode"
"""Printed by the scheduler when it builds the backend: the server log's proof that the replacement is in force."""


@register_attention_backend("torch_native")
def _create_batched_torch_native_backend(runner):
    print(BACKEND_LOG_LINE, flush=True)
    return BatchedDecodeTorchNativeAttnBackend(runner)


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
