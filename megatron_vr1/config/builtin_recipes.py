"""Built-in recipes. Each returns a complete RunConfig; variants derive from a base by replacement."""

from __future__ import annotations

from megatron_vr1.config.checkpoint import CheckpointConfig
from megatron_vr1.config.data import DataConfig
from megatron_vr1.config.grpo import GRPOConfig
from megatron_vr1.config.log import LogConfig
from megatron_vr1.config.model import ModelConfig
from megatron_vr1.config.parallel import ParallelConfig
from megatron_vr1.config.recipes import recipe
from megatron_vr1.config.reward import RewardConfig
from megatron_vr1.config.rollout import RolloutConfig
from megatron_vr1.config.run import RunConfig


@recipe
def qwen25vl_7b_vision_r1() -> RunConfig:
    """The released Vision-R1 recipe for Qwen2.5-VL-7B-Instruct on 2 nodes x 8 H100.

    Hyper-parameters of Vision-R1/run_qwen_vision_r1.sh + TRL 0.14 defaults: G=4, 16 prompts per step,
    lr 1e-6 linear, no warm-up, beta 0.04 (the paper says 0.2: --set grpo.beta=0.2), temperature 1.0,
    512 new tokens, max_pixels 401408, one update per batch, k3 KL, std + 1e-4.
    Layout: TP=4 (sequence parallel) x PP=1, DP=4 over the 16 GPUs, the distributed optimizer sharding the Adam
    state over the DP ranks; SGLang rollout servers as the sbatch script places them.
    """
    return RunConfig(
        name="qwen25vl_7b_vision_r1",
        model=ModelConfig(hf_path="checkpoints/Qwen2.5-VL-7B-Instruct", dtype="bfloat16"),
        parallel=ParallelConfig(tensor_parallel=4, pipeline_parallel=1, sequence_parallel=True,
                                distributed_optimizer=True),
        rollout=RolloutConfig(temperature=1.0, max_new_tokens=512, bucket_mb=1024),
        reward=RewardConfig(preset="official"),
        grpo=GRPOConfig(num_generations=4, prompts_per_step=16, lr=1e-6, beta=0.04, train_steps=3060),
        data=DataConfig(train_path="data/vision_r1/train", max_pixels=401408, min_instances=1, max_instances=30),
        checkpoint=CheckpointConfig(save_interval=200),
        log=LogConfig(run_dir="runs/qwen25vl_7b_vision_r1"),
    )


@recipe
def qwen25vl_3b_vision_r1() -> RunConfig:
    """Qwen2.5-VL-3B-Instruct with the released hyper-parameters on one node x 8 H100 (TP=2, DP=4)."""
    cfg = qwen25vl_7b_vision_r1()
    cfg.name = "qwen25vl_3b_vision_r1"
    cfg.model.hf_path = "checkpoints/Qwen2.5-VL-3B-Instruct"
    cfg.parallel = ParallelConfig(tensor_parallel=2, pipeline_parallel=1, sequence_parallel=True,
                                  distributed_optimizer=True)
    cfg.log.run_dir = "runs/qwen25vl_3b_vision_r1"
    return cfg


@recipe
def tiny_cpu_demo() -> RunConfig:
    """The CPU demo's GRPO run: the ~2M-parameter Qwen2.5-VL warm start on synthetic shapes, SGLang CPU rollout
    server. ``make demo`` runs its 160 steps (``grpo.train_steps``), capped at 500 training seconds.

    Tuned in docs/demo.md. The warm start boxes well (mean IoU 0.95) and names about two objects in three right,
    so the reward is the official criteria in the refinement schedule's advanced stage from the first step
    (``switch_step=0``: true positives from IoU 0.75; in the beginner stage a box gained nothing above IoU 0.75
    and GRPO let the boxes loosen) with ``label_rule=match`` (a box with the wrong label is a miss, as COCO AP
    counts it; the released reward ignores labels). Precision is graded over IoU 0.75-1.0 (released: 0.75-0.9,
    where 83% of the warm start's boxes already saturate it) and averaged over all predictions (the paper's and
    the EasyR1 port's denominator; averaged over matched pairs only, GRPO learned to hedge with extra boxes).
    32 prompts x 4 samples (the released G) at T=0.7: the same 128 completions per step as 16 x 8, but twice the
    images, and the AP curve rose steadily where 16 x 8's swung by +-0.03. Tokens scored at the sampling
    temperature (the trainer then matches SGLang's logprobs to ~1e-6). lr 3e-4 (1e-3 broke the policy; 1e-4
    learned the labels too slowly), 10 warm-up steps, then linear to 3e-5 so the run ends on small steps.
    """
    return RunConfig(
        name="tiny_cpu_demo",
        model=ModelConfig(hf_path="assets/warmstart", dtype="float32", transformer_impl="local"),
        parallel=ParallelConfig(tensor_parallel=1, pipeline_parallel=1, micro_batch_size=128, pack_groups=True),
        rollout=RolloutConfig(temperature=0.7, max_new_tokens=48, bucket_mb=64, reward_overlap_chunks=1),
        reward=RewardConfig(preset="official", label_rule="match", switch_step=0, advanced_precision_band=(0.75, 1.0),
                            precision_denominator="all_predictions"),
        grpo=GRPOConfig(num_generations=4, prompts_per_step=32, lr=3e-4, min_lr=3e-5, lr_schedule="linear",
                        warmup_steps=10, beta=0.0, train_steps=160, logprob_temperature="rollout"),
        data=DataConfig(train_path="runs/demo/data/train.jsonl", val_path="runs/demo/data/val.jsonl",
                        val_gt_path="runs/demo/data/val_gt.json", min_pixels=56 * 56, max_pixels=56 * 56),
        checkpoint=CheckpointConfig(save_interval=100000, keep_last=1),
        log=LogConfig(run_dir="runs/demo/grpo"),
    )


@recipe
def tiny_cpu_demo_sft_control() -> RunConfig:
    """The demo's control: continued SFT from the same warm start on the same rows for the same wall time, with
    its learning rate tuned (see docs/demo.md), never weakened."""
    cfg = tiny_cpu_demo()
    cfg.name = "tiny_cpu_demo_sft_control"
    # One completion per prompt: nothing to pack; 16 rows in one micro-batch (its fastest layout, measured).
    cfg.parallel = ParallelConfig(tensor_parallel=1, pipeline_parallel=1, micro_batch_size=16)
    cfg.grpo = GRPOConfig(mode="sft", prompts_per_step=16, train_steps=100000, lr=2e-4, lr_schedule="constant",
                          weight_decay=0.01, adam_beta2=0.98, grad_clip=1.0, loss_aggregation="token")
    cfg.log = LogConfig(run_dir="runs/demo/sft_continued")
    return cfg


@recipe
def tiny_cpu_warmstart() -> RunConfig:
    """SFT warm start of the CPU demo (``make warmstart``): the demo's tiny Qwen2.5-VL, from random init, taught
    the JSON answer, the boxes and then the labels by teacher forcing on the synthetic shapes.

    tiny-demo.md's SFT recipe (bs 16, lr 2e-3, 30 warm-up steps, cosine to 0.1x, AdamW 0.9/0.98, wd 0.01, clip 1)
    on a 6,000-step schedule, stopped at step 4,200 (``stop_at_step``): by then the boxes are good (mean IoU 0.95)
    and the labels are being learned (about two in three right). docs/demo.md has the whole curve: the labels sit
    at chance until step ~3,000, then climb to 0.93 by step 6,000 (AP 0.82 on its val images, 0.88 on the demo's),
    a point where neither GRPO nor continued SFT has much left to gain in the demo's minutes. 16 sequences per
    micro-batch: on CPU the cost of a tiny model is per operation, not per FLOP.
    """
    cfg = tiny_cpu_demo()
    cfg.name = "tiny_cpu_warmstart"
    cfg.model.hf_path = "runs/warmstart/init"
    cfg.parallel = ParallelConfig(tensor_parallel=1, pipeline_parallel=1, micro_batch_size=16)
    cfg.grpo = GRPOConfig(mode="sft", prompts_per_step=16, train_steps=6000, stop_at_step=4200, lr=2e-3, min_lr=2e-4,
                          lr_schedule="cosine", warmup_steps=30, weight_decay=0.01, adam_beta2=0.98, grad_clip=1.0,
                          loss_aggregation="token")
    cfg.data = DataConfig(train_path="runs/warmstart/data/train.jsonl", val_path="runs/warmstart/data/val.jsonl",
                          val_gt_path="runs/warmstart/data/val_gt.json", min_pixels=56 * 56, max_pixels=56 * 56)
    cfg.checkpoint = CheckpointConfig(save_interval=600, keep_last=2)
    cfg.log = LogConfig(run_dir="runs/warmstart/sft")
    return cfg
