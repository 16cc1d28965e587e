"""Buckets and the flattened layout every transport sends; completion parsing of SGLang results."""

from __future__ import annotations

import pytest
import torch

from megatron_vr1.rollout.sglang_engine import fill_missing_logprobs, is_aborted, to_completion
from megatron_vr1.rollout.sglang_payloads import GenerateItem
from megatron_vr1.weight_sync.buckets import bucket_nbytes, flatten_bucket, rebucket, unflatten_bucket


def test_flatten_roundtrip_keeps_every_dtype_and_shape():
    bucket = [("a", torch.randn(3, 4)), ("b", torch.arange(5, dtype=torch.int64)),
              ("c", torch.randn(2, 2, 2).to(torch.bfloat16)), ("d", torch.randn(7)[::2])]  # non-contiguous view
    flat, entries = flatten_bucket(bucket)
    assert flat.dtype == torch.uint8 and flat.numel() == bucket_nbytes(bucket)
    for (name, want), (got_name, got) in zip(bucket, unflatten_bucket(flat, entries)):
        assert name == got_name and got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)


def test_rebucket_respects_the_size_cap_and_order():
    tensors = [(f"t{i}", torch.zeros(256)) for i in range(10)]  # 1 KiB each
    buckets = list(rebucket(tensors, 3 * 1024))
    assert [len(b) for b in buckets] == [3, 3, 3, 1]
    assert [n for b in buckets for n, _ in b] == [n for n, _ in tensors]
    assert [len(b) for b in rebucket([("big", torch.zeros(4096))], 1024)] == [1]  # an oversized tensor goes alone
    with pytest.raises(ValueError, match="bucket_bytes"):
        list(rebucket(tensors, 0))


def test_completion_from_sglang_result_keeps_the_servers_logprobs():
    """A generated <|image_pad|> (12 in the tiny model) keeps its logprob: SGLang scores it like any other token,
    and overwriting it with 0.0 was the post-sync logprob gap of issue #7."""
    item = GenerateItem(rid="r-0", prompt="p", image=None, temperature=1.0, top_p=1.0, max_new_tokens=3)
    out = {"text": "ab", "output_ids": [5, 12, 7],
           "meta_info": {"id": "r-0", "finish_reason": {"type": "length", "length": 3}, "weight_version": "4",
                         "output_token_logprobs": [[-1.5, 5, None], [-0.1, 12, None], [-2.0, 7, None]]}}
    c = to_completion("r-0", item, "s", out)
    assert c.token_ids == (5, 12, 7) and c.logprobs == (-1.5, -0.1, -2.0)
    assert c.finish_reason == "length" and c.weight_version == 4 and c.request_id == "r-0"
    assert fill_missing_logprobs([None, -3.0]) == [0.0, -3.0]
    assert is_aborted({"meta_info": {"finish_reason": {"type": "abort"}}}) and not is_aborted(out)
