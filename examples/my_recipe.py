"""An example user recipe: the released 7B recipe with the paper's KL coefficient and reward preset.

    megatron-vr1 config show --recipe examples/my_recipe.py:paper_beta
"""

from megatron_vr1.config import load_recipe


def paper_beta():
    cfg = load_recipe("qwen25vl_7b_vision_r1")
    cfg.name = "qwen25vl_7b_paper"
    cfg.grpo.beta = 0.2          # paper §4.1 (the released script runs TRL's default 0.04)
    cfg.reward.preset = "paper"  # IoU, content-format checks, staged refinement by training fraction
    cfg.log.run_dir = "runs/qwen25vl_7b_paper"
    return cfg
