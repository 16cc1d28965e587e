"""GRPOConfig: the policy-optimisation algorithm (GRPO or SFT) and the optimiser."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_vr1.config.base import require


@dataclass(kw_only=True, slots=True)
class GRPOConfig:
    mode: Literal["grpo", "sft"] = "grpo"
    num_generations: int = 4
    """G: completions sampled per prompt (released recipe: 4)."""
    prompts_per_step: int = 16
    """Prompts per optimiser step (released recipe: 16 -> 64 completions)."""
    train_steps: int = 1000
    lr: float = 1e-6
    min_lr: float = 0.0
    lr_schedule: Literal["constant", "linear", "cosine"] = "linear"
    warmup_steps: int = 0
    """In optimiser steps (``optimizer_steps`` in all; the LR schedule decays over them)."""
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    beta: float = 0.04
    """KL coefficient (released script: TRL default 0.04; paper: 0.2)."""
    kl_estimator: Literal["k1", "k3"] = "k3"
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    updates_per_batch: int = 1
    """Passes (PPO epochs) over each rollout batch; 1 with ``minibatches=1`` makes the PPO ratio identically 1
    (released recipe)."""
    minibatches: int = 1
    """Optimiser steps per pass: the batch's groups are split into this many mini-batches of whole groups
    (verl's ppo_mini_batch_size = prompts_per_step / minibatches prompts). With more than one step per batch the
    old log-probabilities are the trainer's, computed once before the first step, and the clip applies."""
    loss_aggregation: Literal["sequence", "token"] = "sequence"
    """"sequence": mean over tokens, then over sequences (released); "token": mean over all tokens."""
    adv_eps: float = 1e-4
    std_unbiased: bool = True
    """torch.std default (N-1), as the released trainer uses."""
    tis: bool = False
    """Truncated importance sampling against the rollout engine's logprobs."""
    tis_cap: float = 2.0
    dynamic_sampling: bool = False
    """Drop zero-variance groups and refill the batch with fresh prompts (DAPO)."""
    dynamic_sampling_max_rounds: int = 4
    """Rollout rounds per step at most when refilling; a step still short after them trains on what it has."""
    time_budget_s: float = 0.0
    """Stop after the step that reaches this many seconds of training (0 = run all train_steps). The last step
    is checkpointed. Equal-wall-time comparisons (the demo's GRPO vs continued SFT) use it."""
    stop_at_step: int = 0
    """End the run after this step (0 = at train_steps), checkpointing it; the LR schedule still spans train_steps.
    A checkpoint taken partway through a longer schedule (the CPU demo's warm start) is reproducible this way."""
    overlong_filter: bool = False
    """Mask completions truncated at max_new_tokens out of the loss."""
    logprob_temperature: Literal["one", "rollout"] = "one"
    """Score tokens under softmax(logits / T) with T = 1 ("one": the released TRL 0.14 trainer) or T =
    rollout.temperature ("rollout": the distribution the samples came from, as verl does; SGLang's logprobs are
    of that distribution too, so the logged train/rollout gap and TIS then compare like with like)."""

    @property
    def optimizer_steps(self) -> int:
        """Optimiser steps of the whole run: the LR schedule's length."""
        return self.train_steps * self.updates_per_batch * self.minibatches

    @property
    def steps_per_batch(self) -> int:
        return self.updates_per_batch * self.minibatches

    def __post_init__(self) -> None:
        require(self.num_generations >= 2 or self.mode == "sft", "grpo.num_generations", self.num_generations,
                "GRPO needs at least 2 samples per prompt to form an advantage")
        require(self.prompts_per_step >= 1, "grpo.prompts_per_step", self.prompts_per_step, "use >= 1")
        require(self.train_steps >= 0, "grpo.train_steps", self.train_steps, "use >= 0")
        require(self.lr > 0, "grpo.lr", self.lr, "use a positive learning rate")
        require(0 <= self.min_lr <= self.lr, "grpo.min_lr", self.min_lr, "use a value in [0, lr]")
        require(self.beta >= 0, "grpo.beta", self.beta, "use >= 0 (0 disables the KL term)")
        require(0 <= self.clip_eps_low < 1, "grpo.clip_eps_low", self.clip_eps_low, "use a value in [0, 1)")
        require(self.clip_eps_high >= 0, "grpo.clip_eps_high", self.clip_eps_high, "use >= 0")
        require(self.updates_per_batch >= 1, "grpo.updates_per_batch", self.updates_per_batch, "use >= 1")
        require(self.minibatches >= 1 and (self.mode == "sft" or self.prompts_per_step % self.minibatches == 0),
                "grpo.minibatches", self.minibatches,
                f"use a divisor of grpo.prompts_per_step ({self.prompts_per_step}): mini-batches hold whole groups")
        require(self.mode == "grpo" or (self.minibatches == 1 and self.updates_per_batch == 1), "grpo.minibatches",
                self.minibatches, "SFT takes one optimiser step per batch: leave minibatches and updates_per_batch at 1")
        require(self.adv_eps >= 0, "grpo.adv_eps", self.adv_eps, "use >= 0")
        require(self.tis_cap >= 1, "grpo.tis_cap", self.tis_cap, "use a cap >= 1 (e.g. 2)")
        require(self.dynamic_sampling_max_rounds >= 1, "grpo.dynamic_sampling_max_rounds",
                self.dynamic_sampling_max_rounds, "use >= 1")
        require(self.time_budget_s >= 0, "grpo.time_budget_s", self.time_budget_s, "use >= 0 (0 = no budget)")
        require(0 <= self.stop_at_step <= self.train_steps, "grpo.stop_at_step", self.stop_at_step,
                f"use 0 (run to train_steps) or a step in 1..{self.train_steps}")
        require(self.grad_clip >= 0, "grpo.grad_clip", self.grad_clip, "use >= 0 (0 disables clipping)")
