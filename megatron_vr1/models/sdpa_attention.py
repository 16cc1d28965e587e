"""Core attention through ``torch.nn.functional.scaled_dot_product_attention`` for megatron's local spec.

A drop-in for megatron-core's ``DotProductAttention`` (same constructor and forward signature, same
[s, b, heads, dim] layout). With a causal mask and no padding mask it lets torch pick the flash / memory-
efficient kernel on GPU; on CPU it runs torch's math kernel, which is what the unit test compares against the
unfused path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule


class SDPAttention(MegatronModule):
    """Softmax(QK^T / sqrt(d)) V with GQA, for queries [sq, b, np, hn] and keys/values [sk, b, ng, hn]."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not implement context parallelism; use the Transformer Engine spec "
                             "(model.transformer_impl=transformer_engine) for context_parallel_size > 1")
        if config.softmax_type != "vanilla":
            raise ValueError(f"SDPAttention supports softmax_type='vanilla' only, got {config.softmax_type!r}")
        from megatron.core.process_groups_config import ProcessGroupCollection

        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp_size = pg_collection.tp.size()
        self.heads_per_partition = config.num_attention_heads // tp_size
        self.head_dim = config.kv_channels
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """Attention over [s, b, heads, dim] inputs; ``attention_mask`` is megatron's bool mask (True = masked)
        of shape [b or 1, 1, sq, sk], or None for plain causal attention."""
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention does not support packed sequences or attention bias; use the TE spec")
        sq, b = query.shape[0], query.shape[1]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, dim]
        dropout = self.dropout_p if self.training else 0.0
        kwargs = dict(dropout_p=dropout, scale=self.softmax_scale, enable_gqa=q.shape[1] != k.shape[1])
        if attention_mask is None:
            kwargs["is_causal"] = True
        else:
            kwargs["attn_mask"] = ~attention_mask
        if dropout > 0.0 and not self.config.sequence_parallel:
            # Same RNG stream as megatron's attention dropout, so TP ranks drop independently.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = F.scaled_dot_product_attention(q, k, v, **kwargs)
        else:
            out = F.scaled_dot_product_attention(q, k, v, **kwargs)
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.heads_per_partition * self.head_dim)
