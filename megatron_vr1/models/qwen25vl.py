"""Qwen2.5-VL on megatron-core: the transformers vision tower + a megatron-core GPT language model with M-RoPE.

Why GPTModel and not HybridModel: megatron-core 0.19.2 marks GPTModel deprecated in favour of HybridModel, but
HybridModel's ``position_embedding_type`` accepts only learned_absolute / rope / yarn / none: it has no
M-RoPE (``MultimodalRotaryEmbedding``), and Qwen2.5-VL's language model needs 3-D rotary positions.
GPTModel(position_embedding_type="mrope") has them and still receives critical fixes; we switch when
HybridModel gains mrope.

Why the HF vision tower: as in Megatron-Bridge and slime, the ViT + patch merger stay the transformers module
(``visual.*`` keeps HF names, conversion is a pass-through), replicated over tensor-parallel ranks. Its
params carry ``average_gradients_across_tp_domain`` so megatron's ``finalize_model_grads`` all-reduces (averages)
their grads over the TP group; they are identical on every TP rank already, because the grad reaching the image
embeddings is all-reduced by the first column-parallel layer, so averaging only removes rounding drift.
The vision tower lives on the first pipeline stage only.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import sharded_state_dict_default


def attention_mask_from_padding(padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Megatron's bool attention mask [B, 1, S, S] (True = masked: future or padding keys) from a padding mask
    [B, S] (1 = real token). None stays None: plain causal attention, right for right-padded batches.
    The diagonal is never masked so that padding queries keep a finite softmax (their outputs are ignored)."""
    if padding_mask is None:
        return None
    s = padding_mask.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=padding_mask.device).tril()
    allowed = causal[None] & padding_mask.bool()[:, None, :]
    allowed |= torch.eye(s, dtype=torch.bool, device=padding_mask.device)[None]
    return (~allowed)[:, None]


class Qwen25VLModel(MegatronModule):
    """``visual`` (HF Qwen2.5-VL vision tower + merger, first PP stage only) + ``language_model`` (GPTModel)."""

    def __init__(self, config, layer_spec, *, vision_config, vocab_size: int, max_sequence_length: int,
                 image_token_id: int | None, rotary_base: float, mrope: bool, tie_word_embeddings: bool,
                 pre_process: bool = True, post_process: bool = True):
        super().__init__(config=config)
        self.pre_process, self.post_process = pre_process, post_process
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = tie_word_embeddings
        self.image_token_id = image_token_id
        self.visual = None
        if pre_process and vision_config is not None:
            from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

            self.visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(vision_config)
            for p in self.visual.parameters():
                p.average_gradients_across_tp_domain = True
        self.language_model = GPTModel(
            config=config, transformer_layer_spec=layer_spec, vocab_size=vocab_size,
            max_sequence_length=max_sequence_length, pre_process=pre_process, post_process=post_process,
            parallel_output=True, share_embeddings_and_output_weights=tie_word_embeddings,
            position_embedding_type="mrope" if mrope else "rope", rotary_base=rotary_base,
            # We scatter to sequence-parallel regions ourselves, after the image features are in.
            scatter_embedding_sequence_parallel=False)

    # --- what megatron's schedules / DDP / finalize_model_grads look up on the model ---
    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings [S, B, H] with the vision features written into the ``<|image_pad|>`` positions."""
        emb = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [S, B, H]
        if pixel_values is None:
            return emb
        if self.visual is None:
            raise ValueError("pixel_values were given but this model has no vision tower (text-only config)")
        if image_grid_thw is None:
            raise ValueError("pixel_values need image_grid_thw (one [t, h, w] row per image)")
        dtype = next(self.visual.parameters()).dtype
        features = self.visual(pixel_values.to(dtype), grid_thw=image_grid_thw).pooler_output
        is_image = input_ids == self.image_token_id  # [B, S]
        n_tokens = int(is_image.sum())
        if n_tokens != features.shape[0]:
            raise ValueError(f"the prompt has {n_tokens} <|image_pad|> tokens but the images give {features.shape[0]} "
                             f"features; expand each image to grid_t*grid_h*grid_w/merge^2 pad tokens")
        # Fill in batch-major order (image i of row b before row b+1), like transformers.
        emb = emb.transpose(0, 1).masked_scatter(is_image.unsqueeze(-1), features.to(emb.dtype))
        return emb.transpose(0, 1).contiguous()

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, decoder_input: torch.Tensor | None = None):
        """Logits [B, S, V/TP] (vocab-parallel), or the per-token loss [B, S] when ``labels`` are given; on a
        non-last pipeline stage, the hidden states for the next stage.

        ``position_ids``: [3, B, S] from ``mrope_position_ids`` (or [B, S] for a text-only rope model).
        ``attention_mask``: None (causal) or megatron's bool mask from ``attention_mask_from_padding``.
        """
        if self.pre_process and decoder_input is None:
            decoder_input = self.embed(input_ids, pixel_values, image_grid_thw)
            if self.config.sequence_parallel:
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
        return self.language_model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                   decoder_input=decoder_input, labels=labels)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> ShardedStateDict:
        """``visual.*`` as ShardedTensors replicated over TP and DP; ``language_model.*`` as megatron shards it.

        ``sharded_state_dict_default`` gives a plain module's tensors replica id 0 on every rank, i.e. every rank
        claims to hold the main copy, which dist_checkpointing rejects ("Invalid access pattern") as soon as TP or
        DP > 1. Only TP rank 0 of DP rank 0 holds the main copy of the replicated vision tower.
        """
        from megatron.core import parallel_state
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        out = {}
        if self.visual is not None:
            visual = sharded_state_dict_default(self.visual, f"{prefix}visual.", sharded_offsets, metadata)
            if parallel_state.model_parallel_is_initialized():
                replica = (0, parallel_state.get_tensor_model_parallel_rank(),
                           parallel_state.get_data_parallel_rank(with_context_parallel=True))
                for t in visual.values():
                    if isinstance(t, ShardedTensor):
                        t.replica_id = replica
            out.update(visual)
        out.update(self.language_model.sharded_state_dict(f"{prefix}language_model.", sharded_offsets, metadata))
        return out
