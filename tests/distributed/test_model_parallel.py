"""The Qwen2.5-VL policy at TP=2, TP=2+SP, PP=2 (untied and tied embeddings), TP2xPP2 and DP=4 (4 gloo ranks under real torchrun, one launch)
against transformers with the same weights: logits, logprobs, entropy, gradients after a 1F1B step over
variable-length micro-batches with megatron DDP, and pipelined logprobs reaching every pipeline rank."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import torchrun

WORKER = Path(__file__).with_name("model_worker.py")
TOL = 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return torchrun(WORKER, 4, [], tmp_path_factory.mktemp("model_parallel"), timeout=420)


@pytest.mark.slow
@pytest.mark.parametrize("layout,tp,pp,sp", [("tp2pp2", 2, 2, False), ("tp2", 2, 1, False), ("tp2sp", 2, 1, True),
                                              ("pp2", 1, 2, False), ("pp2tied", 1, 2, False), ("dp", 1, 1, False)])
def test_layout_matches_transformers(results, layout, tp, pp, sp):
    ranks = [r[layout] for r in results]
    assert all(r["sequence_parallel"] == sp for r in ranks)
    assert sorted({r["tp_rank"] for r in ranks}) == list(range(tp))
    assert sorted({r["pp_rank"] for r in ranks}) == list(range(pp))
    n_dp = 4 // (tp * pp)
    for r in ranks:
        assert r["n_microbatches"] == 4 // n_dp
        assert r["has_visual"] == (r["pp_rank"] == 0)  # the vision tower lives on the first stage only
        assert r["grad_rel"] < TOL, (r["worst_grad"], r["grad_rel"])
        # the last stage computed them; every pipeline rank received them
        assert r["n_pipelined"] == r["n_microbatches"] and r["pipelined_logprob_abs"] < TOL
        if r["pp_rank"] == pp - 1:
            assert r["logits_rel"] < TOL and r["logprob_abs"] < TOL and r["entropy_abs"] < TOL
