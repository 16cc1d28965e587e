"""The one place that decides fused kernels and communication overlap (models.specs): what each machine gets, and
that megatron-core accepts every setting it hands out."""

import pytest

from megatron_vr1.config.model import ModelConfig
from megatron_vr1.config.parallel import ParallelConfig
from megatron_vr1.models.specs import KernelStack, ddp_settings, fusion_settings, sequence_multiple

CPU = KernelStack(cuda=False, transformer_engine=False, apex_wgrad_accumulation=False, masked_softmax_kernels=False)
GPU = KernelStack(cuda=True, transformer_engine=False, apex_wgrad_accumulation=False, masked_softmax_kernels=False)
GPU_TE = KernelStack(cuda=True, transformer_engine=True, apex_wgrad_accumulation=False, masked_softmax_kernels=False)
GPU_APEX = KernelStack(cuda=True, transformer_engine=False, apex_wgrad_accumulation=True, masked_softmax_kernels=True)


def test_cpu_gets_no_cuda_kernels():
    assert not any(fusion_settings(ModelConfig(transformer_impl="local"), CPU, rows_per_micro_batch=1,
                                   mrope=True).values())


def test_gpu_without_te_gets_the_jit_fusions_only():
    s = fusion_settings(ModelConfig(transformer_impl="local"), GPU, rows_per_micro_batch=1, mrope=True)
    assert s["bias_activation_fusion"] and s["bias_dropout_fusion"]
    assert not (s["apply_rope_fusion"] or s["gradient_accumulation_fusion"] or s["masked_softmax_fusion"])


def test_local_spec_uses_apex_kernels_when_built():
    s = fusion_settings(ModelConfig(transformer_impl="local"), GPU_APEX, rows_per_micro_batch=1, mrope=True)
    assert s["gradient_accumulation_fusion"] and s["masked_softmax_fusion"]


def test_te_rope_fusion_only_for_one_mrope_row(monkeypatch):
    import megatron_vr1.models.specs as specs

    monkeypatch.setattr(specs, "transformer_engine_error", lambda: None)  # resolve_impl: TE "imports"
    te = ModelConfig(transformer_impl="transformer_engine")
    one = fusion_settings(te, GPU_TE, rows_per_micro_batch=1, mrope=True)
    assert one["apply_rope_fusion"] and one["gradient_accumulation_fusion"] and not one["masked_softmax_fusion"]
    # megatron falls back (with a warning) for M-RoPE at batch > 1: ask only for what runs
    assert not fusion_settings(te, GPU_TE, rows_per_micro_batch=2, mrope=True)["apply_rope_fusion"]
    assert fusion_settings(te, GPU_TE, rows_per_micro_batch=2, mrope=False)["apply_rope_fusion"]
    # the local spec's linear layers cannot fuse wgrad accumulation through TE
    local = fusion_settings(ModelConfig(transformer_impl="local"), GPU_TE, rows_per_micro_batch=1, mrope=True)
    assert not local["gradient_accumulation_fusion"] and local["apply_rope_fusion"]


@pytest.mark.parametrize("stack", [CPU, GPU])
def test_megatron_accepts_the_settings(stack):
    """TransformerConfig's own checks pass (TE-dependent fields need TE here, so only stacks without it)."""
    from transformers import Qwen2_5_VLConfig

    from megatron_vr1.models.hf_config import text_arch

    cfg = Qwen2_5_VLConfig(text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}))
    from megatron.core.transformer import TransformerConfig

    import torch.nn.functional as F

    arch = text_arch(cfg)
    settings = fusion_settings(ModelConfig(transformer_impl="local"), stack, rows_per_micro_batch=1, mrope=True)
    TransformerConfig(num_layers=arch.num_layers, hidden_size=arch.hidden_size, num_attention_heads=arch.num_heads,
                      ffn_hidden_size=arch.intermediate_size, gated_linear_unit=True, activation_func=F.silu,
                      add_bias_linear=False, use_cpu_initialization=True, **settings)


def test_ddp_overlaps_the_gradient_reduce_with_data_parallel_ranks():
    assert ddp_settings(1) == {"grad_reduce_in_fp32": True, "overlap_grad_reduce": False,
                               "use_distributed_optimizer": False}
    assert ddp_settings(4)["overlap_grad_reduce"]
    assert ddp_settings(4, distributed_optimizer=True)["use_distributed_optimizer"]


def test_sequence_multiple():
    assert sequence_multiple(ModelConfig(), ParallelConfig()) == 1
    assert sequence_multiple(ModelConfig(), ParallelConfig(tensor_parallel=4, sequence_parallel=True)) == 4
    fp8 = ModelConfig(fp8="hybrid", fp8_recipe="tensorwise")
    assert sequence_multiple(fp8, ParallelConfig(tensor_parallel=2)) == 16  # TE's FP8 GEMM alignment
    assert sequence_multiple(fp8, ParallelConfig(tensor_parallel=2, sequence_parallel=True)) == 32
