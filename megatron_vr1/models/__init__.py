"""The Megatron policy: Qwen2.5-VL as the transformers vision tower + a megatron-core GPT language model with M-RoPE.

- ``hf_config``: HF config.json -> TransformerConfig, vocabulary padding.
- ``specs``: layer-spec selection (Transformer Engine when importable, else local + SDPA on GPU); the TE probe.
- ``sdpa_attention``: torch SDPA core attention for the local spec.
- ``mrope``: 3-D position ids exactly as transformers' get_rope_index for images.
- ``qwen25vl``: the model; ``build``: ``build_model`` for this rank's pipeline stage.

Submodules import torch / megatron-core; this package file imports nothing so that ``import megatron_vr1.models``
stays cheap.
"""
