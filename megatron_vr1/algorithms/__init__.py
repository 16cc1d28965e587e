"""Pure GRPO / SFT algorithm functions (torch only: no megatron, no sglang)."""

from megatron_vr1.algorithms.advantages import GroupAdvantages, group_advantages, zero_variance_groups
from megatron_vr1.algorithms.dynamic_sampling import DynamicSampler
from megatron_vr1.algorithms.filters import apply_overlong_filter, overlong_keep
from megatron_vr1.algorithms.policy_loss import PolicyLossOutput, aggregate, kl_penalty, policy_loss
from megatron_vr1.algorithms.sft_loss import sft_loss, sft_loss_from_logits, token_logprobs_from_logits

__all__ = ["DynamicSampler", "GroupAdvantages", "PolicyLossOutput", "aggregate", "apply_overlong_filter",
           "group_advantages", "kl_penalty", "overlong_keep", "policy_loss", "sft_loss", "sft_loss_from_logits",
           "token_logprobs_from_logits", "zero_variance_groups"]
