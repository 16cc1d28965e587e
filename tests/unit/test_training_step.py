"""The Megatron policy's GRPO step at TP=1 in-process: logprobs equal transformers', and one step on a
positive-advantage completion raises its logprob (a negative one lowers it)."""

import pytest
import torch

from training_data import completion_batch, run_config, tiny_hf_dir, world_of_one

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def policy_env(tmp_path_factory):
    with world_of_one():
        root = tmp_path_factory.mktemp("policy")
        yield tiny_hf_dir(root), root


def _batch(hf_dir, completions, advantages):
    return completion_batch(hf_dir, completions, advantages)


def test_policy_logprobs_equal_transformers(policy_env):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_vr1.training.policy import Policy

    hf_dir, root = policy_env
    policy = Policy(run_config(hf_dir, root / "run"), with_reference=False)
    batch, prep, _tok = _batch(hf_dir, [[40, 41, 42, 43], [50, 51]], [1.0, -1.0])
    ours = policy.logprobs(batch)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = batch.input_ids[:1, :int(batch.lengths[0])]
    with torch.no_grad():
        logits = hf(input_ids=ids, pixel_values=prep.pixel_values, image_grid_thw=batch.image_grid_thw[:1],
                    mm_token_type_ids=(ids == hf.config.image_token_id).int()).logits.float()
    ref = torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    p = len(prep.prompt_ids)
    # Alignment check: on this random checkpoint transformers' own eager and sdpa paths differ by ~5e-3.
    assert torch.allclose(ours[0, p:ids.shape[1]], ref[p - 1:], atol=1e-2)
    assert not torch.allclose(ours[0, p:ids.shape[1]], ref[p - 2:-1], atol=1e-2)  # off-by-one would fail
    assert (ours[0, :p] == 0).all() and (ours[0] * batch.loss_mask[0] == ours[0]).all()


def test_positive_advantage_raises_logprob(policy_env):
    from megatron_vr1.training.policy import Policy, grpo_loss_fn

    hf_dir, root = policy_env
    cfg = run_config(hf_dir, root / "run2", lr=1e-3, beta=0.04, lr_schedule="constant")
    policy = Policy(cfg)
    batch, _prep, _tok = _batch(hf_dir, [[40, 41, 42, 43], [50, 51, 52]], [1.0, -1.0])
    before = policy.logprobs(batch)
    batch.ref_logprobs = policy.logprobs(batch, reference=True)
    assert torch.equal(before, batch.ref_logprobs)  # the reference starts as the policy
    result = policy.train_step(batch, grpo_loss_fn(cfg))
    after = policy.logprobs(batch)
    seq = lambda lp, b: float((lp[b] * batch.loss_mask[b]).sum())  # noqa: E731
    assert seq(after, 0) > seq(before, 0) + 1e-3, "the positive-advantage completion must become more likely"
    assert seq(after, 1) < seq(before, 1) - 1e-3, "the negative-advantage completion must become less likely"
    assert result.grad_norm > 0 and result.metrics["kl_mean"] == pytest.approx(0.0, abs=1e-6)
    assert result.metrics["num_tokens"] > 0 and "logprob_gap_mean" in result.metrics


@pytest.mark.parametrize("aggregation", ["sequence", "token"])
def test_packed_micro_batches_equal_one_sequence_each(policy_env, aggregation):
    """parallel.micro_batch_size=3 (groups of 3 + 1, right-padded) gives the logprobs and the update of one
    sequence per micro-batch: padding is exact under the causal mask, and the loss denominators keep the
    step's aggregation over all sequences."""
    from megatron_vr1.training.policy import Policy, grpo_loss_fn

    hf_dir, root = policy_env
    completions = [[40, 41, 42, 43, 44], [50, 51], [60, 61, 62], [70]]
    results = {}
    for mbs in (1, 3):
        cfg = run_config(hf_dir, root / f"pack{mbs}{aggregation}", lr=1e-3, beta=0.0, lr_schedule="constant",
                         loss_aggregation=aggregation)
        cfg.parallel.micro_batch_size = mbs
        policy = Policy(cfg)
        batch, _prep, _tok = _batch(hf_dir, completions, [1.0, -1.0, 0.5, -0.5])
        before = policy.logprobs(batch)
        step = policy.train_step(batch, grpo_loss_fn(cfg))
        results[mbs] = (before, step, policy.logprobs(batch))
    (b1, s1, a1), (b3, s3, a3) = results[1], results[3]
    assert torch.allclose(b1, b3, atol=1e-5)
    assert s1.grad_norm == pytest.approx(s3.grad_norm, rel=1e-4)
    assert torch.allclose(a1, a3, atol=1e-5)
    assert not torch.allclose(a1, b1, atol=1e-4)  # the step did change the policy


def test_minibatch_step_trains_on_its_rows_only(policy_env):
    """train_step(rows=...) (a PPO mini-batch) is the step of a batch holding just those rows: the other rows
    add nothing to the gradient or to the loss's denominator."""
    from megatron_vr1.training.policy import Policy, grpo_loss_fn

    hf_dir, root = policy_env
    completions, advantages = [[40, 41, 42, 43, 44], [50, 51], [60, 61, 62], [70]], [1.0, -1.0, 0.5, -0.5]
    after = {}
    for name, comps, adv, rows in (("rows", completions, advantages, [0, 1]),
                                   ("alone", completions[:2], advantages[:2], None)):
        cfg = run_config(hf_dir, root / f"mini-{name}", lr=1e-3, beta=0.0, lr_schedule="constant")
        policy = Policy(cfg)
        batch, _prep, _tok = _batch(hf_dir, comps, adv)
        step = policy.train_step(batch, grpo_loss_fn(cfg), rows=rows)
        alone, _, _ = _batch(hf_dir, completions[:2], advantages[:2])
        after[name] = (step.grad_norm, policy.logprobs(alone))
    assert after["rows"][0] == pytest.approx(after["alone"][0], rel=1e-5)
    assert torch.allclose(after["rows"][1], after["alone"][1], atol=1e-6)


@pytest.mark.parametrize("packed", [False, True])
def test_padding_to_a_length_multiple_is_exact(policy_env, packed):
    """Micro-batches padded to a multiple of 16 (TE's FP8 GEMM alignment; TP under sequence parallelism) give the
    logprobs and the update of unpadded ones: pads sit right of every real token, with loss mask 0."""
    from megatron_vr1.training.policy import Policy, grpo_loss_fn

    hf_dir, root = policy_env
    completions = [[40, 41, 42, 43, 44], [50, 51], [60, 61, 62], [70]]
    results = {}
    for multiple in (1, 16):
        cfg = run_config(hf_dir, root / f"multiple{multiple}{packed}", lr=1e-3, beta=0.0, lr_schedule="constant")
        cfg.parallel.micro_batch_size, cfg.parallel.pack_groups = (4 if packed else 3), packed
        policy = Policy(cfg)
        assert policy.length_multiple == 1  # fp32 on the CPU, no SP: nothing to align to
        policy.length_multiple = multiple  # what specs.sequence_multiple gives under FP8
        batch, _prep, _tok = _batch(hf_dir, completions, [1.0, -1.0, 0.5, -0.5])
        widths = [mb.input_ids.shape[1] for _, mb in policy.micro_batches(batch)]
        assert all(w % multiple == 0 for w in widths), widths
        before = policy.logprobs(batch)
        step = policy.train_step(batch, grpo_loss_fn(cfg))
        results[multiple] = (before, step, policy.logprobs(batch))
    (b1, s1, a1), (b16, s16, a16) = results[1], results[16]
    assert torch.allclose(b1, b16, atol=1e-5)
    assert s1.grad_norm == pytest.approx(s16.grad_norm, rel=1e-4)
    assert s1.metrics["num_tokens"] == s16.metrics["num_tokens"]
    assert torch.allclose(a1, a16, atol=1e-5)
