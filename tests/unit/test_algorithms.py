"""GRPO algorithm functions against values worked by hand with plain python math (never by calling the same
function): advantages, the released loss, PPO clipping, KL estimators, TIS, aggregation, SFT loss, filters."""

import ast
import math
import statistics
from pathlib import Path

import pytest
import torch

import megatron_vr1.algorithms
from megatron_vr1.algorithms import (apply_overlong_filter, group_advantages, kl_penalty, policy_loss, sft_loss,
                                     sft_loss_from_logits, zero_variance_groups)


def _approx(x: torch.Tensor | float, expected: float, rel: float = 1e-6):
    value = float(x.detach()) if isinstance(x, torch.Tensor) else float(x)
    assert value == pytest.approx(expected, rel=rel, abs=1e-7), (value, expected)


# ---------------------------------------------------------------- advantages

def test_group_advantages_unbiased_matches_hand_values():
    rewards = [1.0, 2.0, 3.0, 6.0, 0.5, 0.5, 0.5, 0.5]
    out = group_advantages(rewards=rewards, group_size=4)
    g = rewards[:4]
    mean = sum(g) / 4  # 3.0
    std = math.sqrt(sum((r - mean) ** 2 for r in g) / 3)  # unbiased: sqrt(14/3)
    expected = [(r - mean) / (std + 1e-4) for r in g] + [0.0] * 4
    assert out.advantages.dtype == torch.float32
    for a, e in zip(out.advantages.tolist(), expected):
        _approx(a, e)
    assert out.zero_variance.tolist() == [False, True]
    _approx(out.group_std[0], std, rel=1e-12)


def test_group_advantages_biased_std_and_eps():
    rewards = [0.0, 1.0]
    out = group_advantages(rewards=rewards, group_size=2, unbiased_std=False, eps=0.5)
    # mean 0.5, biased std 0.5 -> (+-0.5) / (0.5 + 0.5)
    assert out.advantages.tolist() == [-0.5, 0.5]
    unbiased = group_advantages(rewards=rewards, group_size=2)
    std = statistics.stdev(rewards)  # sqrt(0.5)
    _approx(unbiased.advantages[1], 0.5 / (std + 1e-4))


def test_zero_variance_is_exact_even_with_round_off_prone_rewards():
    # 0.1 * 3 sums to 0.30000000000000004 in float64, so mean != 0.1: a naive (r - mean) is not 0.
    r = 0.1
    assert sum([r, r, r]) / 3 != r
    nasty = 0.9 + 1 / 3  # a non-binary partial reward
    rewards = [r, r, r, nasty, nasty, nasty, 0.0, 1.0, 1.0]
    out = group_advantages(rewards=rewards, group_size=3)
    assert out.zero_variance.tolist() == [True, True, False]
    assert out.advantages[:6].tolist() == [0.0] * 6
    assert zero_variance_groups(rewards=rewards, group_size=3).tolist() == [True, True, False]
    # no NaN even with eps = 0
    assert group_advantages(rewards=rewards, group_size=3, eps=0.0).advantages[:6].tolist() == [0.0] * 6
    # float32 rewards that differ only below float32 resolution stay distinct in float64
    assert zero_variance_groups(rewards=[1.0, 1.0 + 1e-12], group_size=2).tolist() == [False]


def test_group_advantages_rejects_bad_input():
    with pytest.raises(ValueError, match="groups of group_size=4"):
        group_advantages(rewards=[1.0, 2.0, 3.0], group_size=4)
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(rewards=[1.0, float("nan")], group_size=2)


# ---------------------------------------------------------------- policy loss

def _two_sequences():
    """Two sequences, lengths 3 and 1 (padding masked)."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -9.0, -9.0]], requires_grad=True)
    ref = torch.tensor([[-1.2, -1.5, -0.5], [-0.1, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([0.7, -1.3])
    return logp, ref, mask, adv


def test_released_loss_is_minus_advantage_plus_beta_k3_per_sequence_then_batch():
    logp, ref, mask, adv = _two_sequences()
    beta = 0.04
    out = policy_loss(logprobs=logp, old_logprobs=logp.detach(), advantages=adv, loss_mask=mask,
                      ref_logprobs=ref, beta=beta, kl_estimator="k3")
    lp, rf = logp.tolist(), ref.tolist()
    lengths = [3, 1]
    per_seq = []
    for i, a in enumerate(adv.tolist()):
        terms = []
        for t in range(lengths[i]):
            d = rf[i][t] - lp[i][t]
            k3 = math.exp(d) - d - 1
            terms.append(-a + beta * k3)
        per_seq.append(sum(terms) / lengths[i])
    expected = sum(per_seq) / 2
    _approx(out.loss, expected)
    # Gradient of the released form: d/dlogp [-A * exp(logp - sg(logp)) + beta*k3] = -A + beta*(1 - exp(ref - logp)),
    # scaled by 1/len(seq)/num_seqs.
    out.loss.backward()
    for i, a in enumerate(adv.tolist()):
        for t in range(3):
            g = (-a + beta * (1 - math.exp(rf[i][t] - lp[i][t]))) / lengths[i] / 2 if t < lengths[i] else 0.0
            _approx(logp.grad[i, t], g, rel=1e-5)
    _approx(out.metrics["clip_fraction"], 0.0)
    _approx(out.metrics["ratio_mean"], 1.0)


def test_k1_versus_k3():
    logp = torch.tensor([[-1.0, -0.2]])
    ref = torch.tensor([[-0.5, -0.9]])
    k1 = kl_penalty(logprobs=logp, ref_logprobs=ref, estimator="k1")
    k3 = kl_penalty(logprobs=logp, ref_logprobs=ref, estimator="k3")
    _approx(k1[0, 0], -1.0 - (-0.5))
    _approx(k1[0, 1], -0.2 - (-0.9))
    for t, (lp, rf) in enumerate([(-1.0, -0.5), (-0.2, -0.9)]):
        _approx(k3[0, t], math.exp(rf - lp) - (rf - lp) - 1)
    assert (k3 >= 0).all() and (k1 < 0).any()  # k1 can be negative per sample, k3 cannot
    mask = torch.ones(1, 2)
    outs = {est: policy_loss(logprobs=logp, old_logprobs=logp, advantages=torch.zeros(1), loss_mask=mask,
                             ref_logprobs=ref, beta=0.2, kl_estimator=est) for est in ("k1", "k3")}
    _approx(outs["k1"].loss, 0.2 * (-0.5 + 0.7) / 2)
    _approx(outs["k3"].loss, 0.2 * float(k3.mean()))
    _approx(outs["k3"].metrics["kl_mean"], float(k3.mean()))


@pytest.mark.parametrize("adv", [1.0, -1.0])
def test_ppo_clipping_for_positive_and_negative_advantages(adv):
    eps_low, eps_high = 0.2, 0.28
    ratios = [0.5, 0.9, 1.1, 1.5]
    old = torch.zeros(1, 4)
    logp = torch.tensor([[math.log(r) for r in ratios]], requires_grad=True)
    out = policy_loss(logprobs=logp, old_logprobs=old, advantages=torch.tensor([adv]), loss_mask=torch.ones(1, 4),
                      clip_eps_low=eps_low, clip_eps_high=eps_high)
    expected_terms, clipped = [], []
    for r in ratios:
        rc = min(max(r, 1 - eps_low), 1 + eps_high)
        expected_terms.append(max(-adv * r, -adv * rc))
        clipped.append(-adv * rc > -adv * r)
    _approx(out.loss, sum(expected_terms) / 4)
    # A>0: ratio 1.5 (> 1.28) is clipped; ratio 0.5 is not (pessimistic bound keeps the unclipped term).
    # A<0: ratio 0.5 (< 0.8) is clipped; ratio 1.5 is not.
    assert clipped == ([False, False, False, True] if adv > 0 else [True, False, False, False])
    _approx(out.metrics["clip_fraction"], 0.25)
    out.loss.backward()
    # clipped tokens get no gradient; the others get -A * ratio / 4
    for t, r in enumerate(ratios):
        _approx(logp.grad[0, t], 0.0 if clipped[t] else -adv * r / 4, rel=1e-5)


def test_tis_weight_is_capped_and_detached():
    old = torch.tensor([[-1.0, -1.0, -1.0]])
    rollout = torch.tensor([[-1.0, -1.5, -4.0]])  # weights exp(0)=1, exp(0.5)=1.6487, exp(3) -> cap 2
    logp = old.clone().requires_grad_(True)
    out = policy_loss(logprobs=logp, old_logprobs=old, advantages=torch.tensor([2.0]), loss_mask=torch.ones(1, 3),
                      rollout_logprobs=rollout, tis_cap=2.0)
    w = [1.0, math.exp(0.5), 2.0]
    _approx(out.loss, sum(-2.0 * x for x in w) / 3)
    _approx(out.metrics["tis_weight_mean"], sum(w) / 3)
    _approx(out.metrics["logprob_gap_mean"], (0.0 + 0.5 + 3.0) / 3)
    out.loss.backward()
    for t in range(3):  # the weight scales the gradient but is not differentiated itself
        _approx(logp.grad[0, t], -2.0 * w[t] / 3, rel=1e-5)


def test_token_and_sequence_aggregation_differ_when_lengths_differ():
    logp, ref, mask, adv = _two_sequences()
    kw = dict(logprobs=logp, old_logprobs=logp.detach(), advantages=adv, loss_mask=mask)
    seq = policy_loss(**kw, aggregation="sequence").loss
    tok = policy_loss(**kw, aggregation="token").loss
    _approx(seq, ((-0.7 * 3) / 3 + 1.3 / 1) / 2)  # (-0.7 + 1.3) / 2 = 0.3
    _approx(tok, (-0.7 * 3 + 1.3) / 4)  # -0.2
    assert float(seq.detach()) != pytest.approx(float(tok.detach()))
    # equal lengths: both agree
    full = torch.ones(2, 3)
    kw["loss_mask"] = full
    _approx(policy_loss(**kw, aggregation="sequence").loss, float(policy_loss(**kw, aggregation="token").loss.detach()))
    # a global denominator (e.g. tokens over all micro-batches) replaces the local count
    _approx(policy_loss(**kw, aggregation="token", denominator=12.0).loss, (-0.7 * 3 + 1.3 * 3) / 12)


def test_entropy_metric_and_argument_errors():
    logp = torch.zeros(1, 2)
    ent = torch.tensor([[0.5, 1.5]])
    out = policy_loss(logprobs=logp, old_logprobs=logp, advantages=torch.ones(1), loss_mask=torch.tensor([[1.0, 0.0]]),
                      entropy=ent)
    _approx(out.metrics["entropy_mean"], 0.5)
    assert float(out.metrics["num_tokens"]) == 1.0
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(logprobs=logp, old_logprobs=logp, advantages=torch.ones(1), loss_mask=logp, beta=0.1)
    with pytest.raises(ValueError, match="advantages must be"):
        policy_loss(logprobs=logp, old_logprobs=logp, advantages=torch.ones(2), loss_mask=logp)
    with pytest.raises(ValueError, match="rollout_logprobs"):
        policy_loss(logprobs=logp, old_logprobs=logp, advantages=torch.ones(1), loss_mask=logp, tis_cap=2.0)


def test_fully_masked_sequences_are_not_counted():
    logp = torch.zeros(2, 2, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    out = policy_loss(logprobs=logp, old_logprobs=logp.detach(), advantages=torch.tensor([1.0, 5.0]), loss_mask=mask)
    _approx(out.loss, -1.0)  # only the first sequence, averaged over 1 sequence
    out.loss.backward()
    assert logp.grad[1].tolist() == [0.0, 0.0]


# ---------------------------------------------------------------- filters and SFT

def test_overlong_filter_masks_truncated_completions():
    mask = torch.ones(3, 4)
    out = apply_overlong_filter(loss_mask=mask, finish_reasons=["stop", "length", "stop"])
    assert out.tolist() == [[1.0] * 4, [0.0] * 4, [1.0] * 4]
    assert mask.sum() == 12  # not modified in place
    with pytest.raises(ValueError, match="one row per finish reason"):
        apply_overlong_filter(loss_mask=mask, finish_reasons=["stop"])


def test_sft_loss_is_answer_token_cross_entropy():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [3.0, 3.0, 3.0]]])
    labels = torch.tensor([[0, 1, 2]])
    mask = torch.tensor([[0.0, 1.0, 1.0]])  # the first token is prompt
    row = logits[0].tolist()

    def nll(values, label):
        return -(values[label] - math.log(sum(math.exp(v) for v in values)))

    expected = (nll(row[1], 1) + nll(row[2], 2)) / 2
    _approx(sft_loss_from_logits(logits=logits, labels=labels, loss_mask=mask), expected)
    _approx(sft_loss(token_logprobs=torch.tensor([[-1.0, -2.0], [-4.0, 0.0]]),
                     loss_mask=torch.tensor([[1.0, 1.0], [1.0, 0.0]])), 7.0 / 3)
    _approx(sft_loss(token_logprobs=torch.tensor([[-1.0, -2.0], [-4.0, 0.0]]),
                     loss_mask=torch.tensor([[1.0, 1.0], [1.0, 0.0]]), aggregation="sequence"), (1.5 + 4.0) / 2)


def test_algorithms_import_neither_megatron_nor_sglang():
    """Layering: the algorithm package is pure torch (checked on the source, including its own imports)."""
    package = Path(megatron_vr1.algorithms.__file__).parent
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                root = name.split(".")[0]
                assert root not in ("megatron", "sglang"), (path.name, name)
                if root == "megatron_vr1":
                    assert name.startswith("megatron_vr1.algorithms"), (path.name, name)
