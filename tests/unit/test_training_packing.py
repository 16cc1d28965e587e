"""Shared-prompt packing (parallel.pack_groups): a group's completions behind one copy of their prompt give the
logprobs and the update of the unpacked rows, and the packed layout is what training/packing.py says."""

import pytest
import torch

from training_data import make_sample, run_config, tiny_hf_dir, world_of_one

pytestmark = pytest.mark.slow

# Two groups (two images, so two prompts), completions of different lengths, one past the EOS.
GROUPS = [[[40, 41, 42, 43, 44], [50, 51], [60, 61, 62]], [[70], [80, 81, 82, 83], [90, 91]]]
ADVANTAGES = [1.0, -1.0, 0.5, -0.5, 0.8, -0.3]


@pytest.fixture(scope="module")
def policy_env(tmp_path_factory):
    with world_of_one():
        root = tmp_path_factory.mktemp("packing")
        yield tiny_hf_dir(root), root


def _batch(hf_dir, groups=GROUPS, advantages=ADVANTAGES):
    from transformers import AutoTokenizer

    from megatron_vr1.training.batch import build_train_batch, prepare_prompt
    from megatron_vr1.types import Completion, RolloutGroup

    tok = AutoTokenizer.from_pretrained(hf_dir)
    rollout, prompts = [], []
    for g, completions in enumerate(groups):
        prep = prepare_prompt(make_sample(g), tok, min_pixels=56 * 56, max_pixels=56 * 56)
        comps = tuple(Completion(sample_id=prep.sample.sample_id, request_id=f"g{g}r{i}", text="",
                                 token_ids=tuple(ids), logprobs=tuple(-0.5 - 0.1 * j for j in range(len(ids))),
                                 finish_reason="stop", weight_version=0) for i, ids in enumerate(completions))
        rollout.append(RolloutGroup(sample=prep.sample, completions=comps))
        prompts.append(prep)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    return build_train_batch(rollout, prompts, torch.tensor(advantages), eos_ids=[eos])


def _run(hf_dir, run_dir, *, pack, mbs, aggregation="sequence", beta=0.0, tis=False):
    from megatron_vr1.training.policy import Policy, grpo_loss_fn

    cfg = run_config(hf_dir, run_dir, lr=1e-3, beta=beta, lr_schedule="constant", loss_aggregation=aggregation,
                     tis=tis)
    cfg.parallel.pack_groups, cfg.parallel.micro_batch_size = pack, mbs
    policy = Policy(cfg)
    batch = _batch(hf_dir)
    before = policy.logprobs(batch)
    if beta > 0:
        batch.ref_logprobs = policy.logprobs(batch, reference=True)
    step = policy.train_step(batch, grpo_loss_fn(cfg))
    return before, step, policy.logprobs(batch)


def test_batch_records_groups_and_prompts(policy_env):
    hf_dir, _ = policy_env
    batch = _batch(hf_dir)
    assert batch.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    p = batch.prompt_lengths
    assert (batch.loss_mask.sum(1) == batch.lengths - p).all()
    assert torch.equal(batch.input_ids[0, :p[0]], batch.input_ids[2, :p[2]])


def test_pack_layout(policy_env):
    """One row per group; each completion sees the prompt and itself only; score_index points at the logit that
    predicts each token (the prompt's last position for a first token)."""
    from megatron_vr1.models.mrope import mrope_position_ids
    from megatron_vr1.training.packing import group_rows, pack_groups
    from megatron_vr1.training.policy import load_hf_config

    hf_dir, _ = policy_env
    batch = _batch(hf_dir)
    hf_config = load_hf_config(hf_dir)
    packed = pack_groups(batch, group_rows(batch, list(range(6))), hf_config, length_multiple=4)
    p = int(batch.prompt_lengths[0])
    n = [int(batch.lengths[r]) - int(batch.prompt_lengths[r]) for r in range(6)]
    assert packed.input_ids.shape == (2, -(-(p + sum(n[:3])) // 4) * 4)
    assert packed.rows == [0, 1, 2, 3, 4, 5]
    assert packed.pixel_values.shape[0] == int(batch.image_grid_thw.prod(dim=1).sum())  # each group's image once
    assert batch.image_grid_thw.shape[0] == 2  # the batch too stores one image per group
    row0 = packed.input_ids[0]
    assert torch.equal(row0[:p], batch.input_ids[0, :p])
    assert torch.equal(row0[p:p + n[0]], batch.input_ids[0, p:p + n[0]])
    assert torch.equal(row0[p + n[0]:p + n[0] + n[1]], batch.input_ids[1, p:p + n[1]])
    mask = packed.attention_mask[0, 0]  # True = masked
    second = p + n[0]  # first token of completion 2
    assert not mask[second, :p].any() and not mask[second, second]
    assert mask[second, p:p + n[0]].all(), "a completion must not see another completion"
    assert mask[p, p + 1], "causal within a completion"
    # positions: every completion starts where the prompt ends, as in its own unpacked row
    pos = mrope_position_ids(batch.input_ids[1:2, :int(batch.lengths[1])], batch.image_grid_thw[:1], hf_config)
    assert torch.equal(packed.position_ids[:, 0, second:second + n[1]], pos[:, 0, p:])
    width = packed.input_ids.shape[1]
    assert packed.score_index[1, 0] == p - 1 and packed.score_index[1, 1] == second
    assert packed.score_index[3, 0] == width + p - 1  # the second row's prompt end
    assert torch.equal(packed.targets[1, :n[1]], batch.input_ids[1, p:p + n[1]])
    assert packed.loss_mask.sum() == batch.loss_mask.sum()


def test_rows_of_one_group_must_share_their_prompt(policy_env):
    from megatron_vr1.training.packing import pack_groups
    from megatron_vr1.training.policy import load_hf_config

    hf_dir, _ = policy_env
    batch = _batch(hf_dir)
    with pytest.raises(ValueError, match="share prompt and image"):
        pack_groups(batch, [[0, 3]], load_hf_config(hf_dir))


@pytest.mark.parametrize("aggregation,beta,tis", [("sequence", 0.0, False), ("token", 0.04, True)])
def test_packed_equals_unpacked(policy_env, aggregation, beta, tis):
    """Same logprobs before and after one GRPO step, the same gradient norm and the same loss metrics, packed
    (one or two groups per micro-batch) or not; with the KL term (reference logprobs) and TIS (rollout
    logprobs) through the packed layout too."""
    hf_dir, root = policy_env
    keys = ("pg_loss", "num_tokens", "num_sequences", "logprob_gap_mean", "entropy_mean", "tis_weight_mean")
    for mbs in (3, 6):  # 3: the unpacked micro-batches hold the same rows as the packed ones (groups of 3)
        plain = _run(hf_dir, root / f"plain{mbs}-{aggregation}", pack=False, mbs=mbs, aggregation=aggregation,
                     beta=beta, tis=tis)
        packed = _run(hf_dir, root / f"packed{mbs}-{aggregation}", pack=True, mbs=mbs, aggregation=aggregation,
                      beta=beta, tis=tis)
        assert torch.allclose(plain[0], packed[0], atol=1e-5)
        assert packed[1].grad_norm == pytest.approx(plain[1].grad_norm, rel=1e-4)
        for key in keys + (("kl_mean",) if beta else ()):
            if key in plain[1].metrics:
                assert packed[1].metrics[key] == pytest.approx(plain[1].metrics[key], rel=1e-4, abs=1e-6), key
        assert torch.allclose(plain[2], packed[2], atol=1e-5)
        assert not torch.allclose(plain[0], plain[2], atol=1e-4)  # the step did change the policy


def test_policy_refuses_warmup_longer_than_the_run(policy_env):
    """A check across fields, made when the policy is built (--set overrides apply one at a time, so GRPOConfig
    cannot make it), fails before any model is built and names the fields to change."""
    from megatron_vr1.config.base import ConfigError
    from megatron_vr1.training.policy import Policy

    hf_dir, root = policy_env
    with pytest.raises(ConfigError, match="grpo.warmup_steps=3 must be below the run's 3 optimiser steps"):
        Policy(run_config(hf_dir, root / "warmup", train_steps=3, warmup_steps=3))
