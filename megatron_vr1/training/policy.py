"""The Megatron policy: a Qwen2.5-VL built from an HF directory, wrapped in megatron DDP with megatron's optimizer
and LR schedule, and trained over TrainBatch micro-batches with ``get_forward_backward_func`` (1F1B under PP).

``parallel.micro_batch_size`` sequences per micro-batch (default 1: images of different sizes and prompts of
different lengths need no padding; more packs small models' many short sequences into fewer, larger matmuls, the
main cost on CPU). Each micro-batch is right-padded to its longest row, which is exact under causal attention,
and further to the length multiple the kernels need (``specs.sequence_multiple``: TP under sequence
parallelism, TE's FP8 GEMM alignment under FP8).

Device placement: the TrainBatch is host memory (this rank's shard of the step's rollouts); micro-batches are
cut from it on the host, with everything the loss reads, and cross to the run device in one place
(``MicroBatch.to`` in ``micro_batches``). Results come back to the host once per call (``logprobs``) or as
Python floats (``train_step``'s metrics).

The loss gets a ``denominator`` so that, after megatron's schedule divides each micro-batch loss by their
number, the step's loss is the configured aggregation over all its sequences: the released "mean over each
sequence's tokens, then over sequences", or a mean over all tokens.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from megatron_vr1.config.run import RunConfig
from megatron_vr1.training.logprobs import MicroBatch, pipelined_token_logprobs, token_logprobs
from megatron_vr1.types import TrainBatch

LossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""``loss_fn(logprobs=, entropy=, mask=, advantages=, old_logprobs=, ref_logprobs=, rollout_logprobs=,
denominator=)`` over one micro-batch ([k, S] tensors, [k] advantages) -> (scalar loss, scalar metrics).
``denominator`` is the sequence (or token) count that makes megatron's per-micro-batch average come out as a
mean over all sequences (or tokens) of the step."""


def grpo_loss_fn(cfg: RunConfig) -> LossFn:
    """The algorithms' GRPO policy loss with the run's clip / KL / TIS / aggregation settings."""
    from megatron_vr1.algorithms.policy_loss import policy_loss

    g = cfg.grpo

    def loss_fn(*, logprobs, entropy, mask, advantages, old_logprobs, ref_logprobs, rollout_logprobs, denominator):
        out = policy_loss(
            logprobs=logprobs, old_logprobs=logprobs.detach() if old_logprobs is None else old_logprobs,
            advantages=advantages, loss_mask=mask, ref_logprobs=ref_logprobs, beta=g.beta,
            kl_estimator=g.kl_estimator, clip_eps_low=g.clip_eps_low, clip_eps_high=g.clip_eps_high,
            aggregation=g.loss_aggregation, rollout_logprobs=rollout_logprobs,
            tis_cap=g.tis_cap if g.tis else None, entropy=entropy, denominator=denominator)
        return out.loss, out.metrics

    return loss_fn


def load_hf_config(hf_dir: str | Path) -> dict:
    """config.json of an HF checkpoint directory, with an actionable error when it is missing."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: model.hf_path must be a Hugging Face Qwen2.5-VL directory "
                                "(build a tiny one with `megatron-vr1 data tiny-model`)")
    return json.loads(path.read_text())


def vocab_size_of(hf_config: dict) -> int:
    """The real (unpadded) vocabulary of an HF config dict."""
    return int((hf_config.get("text_config") or {}).get("vocab_size") or hf_config["vocab_size"])


def build_loaded_model(hf_dir: str | Path, hf_config: dict, cfg: RunConfig):
    """This rank's model chunk with the HF weights of ``hf_dir`` loaded (needs megatron's parallel state)."""
    from megatron_vr1.convert.hf_loader import load_hf_weights
    from megatron_vr1.convert.safetensors_io import SafetensorsReader
    from megatron_vr1.models.build import build_model

    model = build_model(hf_config, cfg.model, cfg.parallel)
    load_hf_weights(model, SafetensorsReader(hf_dir), hf_config)
    return model


@dataclass(slots=True)
class StepResult:
    """Scalars of one optimiser step (means over micro-batches, valid on every rank)."""

    metrics: dict[str, float]
    grad_norm: float
    lr: float


class Policy:
    """Trainable policy (+ optional frozen reference for the KL term) for this rank."""

    def __init__(self, cfg: RunConfig, *, hf_dir: str | Path | None = None, with_reference: bool | None = None):
        from megatron.core import parallel_state
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        from megatron_vr1.config.base import ConfigError
        from megatron_vr1.models.specs import ddp_settings, sequence_multiple
        from megatron_vr1.parallel import state

        self.cfg = cfg
        self.device = state.device()
        """The run device (this rank's GPU, else the CPU): the model, micro-batches and loss inputs live there."""
        self.length_multiple = sequence_multiple(cfg.model, cfg.parallel)
        g = cfg.grpo
        if g.warmup_steps and g.warmup_steps >= g.optimizer_steps:
            # Checked here, not in GRPOConfig: --set overrides apply one at a time, so a run shortened with
            # train_steps=2 before warmup_steps=0 would be refused halfway through its own overrides.
            raise ConfigError(f"grpo.warmup_steps={g.warmup_steps} must be below the run's {g.optimizer_steps} "
                              "optimiser steps (train_steps x updates_per_batch x minibatches): set "
                              "grpo.warmup_steps=0 or a longer grpo.train_steps")
        if cfg.parallel.pack_groups:
            from megatron_vr1.models.specs import resolve_impl

            if resolve_impl(cfg.model) != "local":
                raise ConfigError("parallel.pack_groups=true needs the local layer spec (its attention takes the "
                                  "packed rows' arbitrary mask); set model.transformer_impl=local or "
                                  "parallel.pack_groups=false")
        self.hf_dir = Path(hf_dir or cfg.model.hf_path)
        self.hf_config = load_hf_config(self.hf_dir)
        self.vocab_size = vocab_size_of(self.hf_config)
        t = cfg.rollout.temperature
        # SFT's NLL and greedy rollouts (T = 0, no tempered distribution) are scored at T = 1.
        tempered = cfg.grpo.mode == "grpo" and cfg.grpo.logprob_temperature == "rollout" and t > 0
        self.logprob_temperature = t if tempered else 1.0
        model = build_loaded_model(self.hf_dir, self.hf_config, cfg)
        bf16 = cfg.model.dtype == "bfloat16"
        ddp_config = DistributedDataParallelConfig(**ddp_settings(parallel_state.get_data_parallel_world_size(),
                                                                  cfg.parallel.distributed_optimizer))
        self.model = DistributedDataParallel(config=model.config, module=model, ddp_config=ddp_config)
        model.config.finalize_model_grads_func = finalize_model_grads
        model.config.no_sync_func = self.model.no_sync
        if ddp_config.overlap_grad_reduce:  # as Megatron-LM: every pipeline stage launches its reduce together
            model.config.grad_sync_func = self.model.start_grad_sync
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=g.lr, min_lr=g.min_lr, weight_decay=g.weight_decay, adam_beta1=g.adam_beta1,
            adam_beta2=g.adam_beta2, clip_grad=g.grad_clip, bf16=bf16, params_dtype=model.config.params_dtype,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer), [self.model])
        style = {"constant": "constant", "linear": "linear", "cosine": "cosine"}[g.lr_schedule]
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if g.warmup_steps else g.lr, max_lr=g.lr, min_lr=g.min_lr,
            lr_warmup_steps=g.warmup_steps, lr_decay_steps=max(1, g.optimizer_steps), lr_decay_style=style,
            start_wd=g.weight_decay, end_wd=g.weight_decay, wd_incr_steps=max(1, g.optimizer_steps),
            wd_incr_style="constant")
        need_ref = g.mode == "grpo" and g.beta > 0 if with_reference is None else with_reference
        self.reference = build_loaded_model(self.hf_dir, self.hf_config, cfg).eval() if need_ref else None
        if self.reference is not None:
            self.reference.requires_grad_(False)

    # ---- inputs ------------------------------------------------------------------------------------------------

    def micro_batches(self, batch: TrainBatch, rows: list[int] | None = None,
                      micro_batch_size: int | None = None, *,
                      loss_inputs: bool = False) -> list[tuple[list[int], MicroBatch]]:
        """``rows`` (default: all) grouped ``micro_batch_size`` at a time (default: ``parallel.micro_batch_size``),
        each group right-padded to its longest row (then to ``length_multiple``), with its images and mrope
        positions, on the run device. ``loss_inputs``: also the advantages and the old / reference / rollout
        logprobs, laid out like the targets.

        Right padding is exact under the causal mask: a real token never attends to a later pad. Pads have loss
        mask 0 and mrope position 0, as transformers gives padding.
        """
        rows = list(range(batch.input_ids.shape[0])) if rows is None else list(rows)
        k = micro_batch_size or self.cfg.parallel.micro_batch_size
        host = (self._packed_micro_batches(batch, rows, k) if self.cfg.parallel.pack_groups
                else self._padded_micro_batches(batch, rows, k))
        if loss_inputs:
            host = [(group, self._with_loss_inputs(batch, group, mb)) for group, mb in host]
        return [(group, mb.to(self.device)) for group, mb in host]

    def _padded_micro_batches(self, batch: TrainBatch, rows: list[int], k: int) -> list[tuple[list[int], MicroBatch]]:
        """Host micro-batches of ``k`` rows each, right-padded."""
        from megatron_vr1.models.mrope import mrope_position_ids
        from megatron_vr1.training.batch import row_images

        out = []
        for g in range(0, len(rows), k):
            group = rows[g:g + k]
            longest = max(int(batch.lengths[b]) for b in group)
            length = -(-longest // self.length_multiple) * self.length_multiple
            index = torch.tensor(group)
            ids = _fit(batch.input_ids.index_select(0, index), length)
            real = torch.arange(length)[None, :] < batch.lengths.index_select(0, index)[:, None]
            thw = pix = None
            if batch.image_grid_thw is not None:  # one image per row (its group's)
                pix, thw = row_images(batch, group)
            targets = torch.roll(ids, -1, dims=1)
            # The logit at position t scores token t+1: shift the completion mask left by one.
            mask = torch.roll(_fit(batch.loss_mask.index_select(0, index), length) * real, -1, dims=1)
            mask[:, -1] = 0
            positions = mrope_position_ids(ids, thw, self.hf_config, attention_mask=None if bool(real.all()) else real)
            out.append((group, MicroBatch(input_ids=ids, position_ids=positions, targets=targets, loss_mask=mask,
                                          pixel_values=pix, image_grid_thw=thw)))
        return out

    def _packed_micro_batches(self, batch: TrainBatch, rows: list[int],
                              max_completions: int) -> list[tuple[list[int], MicroBatch]]:
        """Shared-prompt packing (training/packing.py): whole groups per micro-batch, up to ``max_completions``
        completions (at least one group), each group one row."""
        from megatron_vr1.training.packing import group_rows, pack_groups

        out, chunk, count = [], [], 0
        groups = group_rows(batch, rows)
        for i, members in enumerate(groups):
            chunk.append(members)
            count += len(members)
            if i + 1 == len(groups) or count + len(groups[i + 1]) > max_completions:
                p = pack_groups(batch, chunk, self.hf_config, length_multiple=self.length_multiple)
                out.append((p.rows, MicroBatch(
                    input_ids=p.input_ids, position_ids=p.position_ids, targets=p.targets, loss_mask=p.loss_mask,
                    attention_mask=p.attention_mask, pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw,
                    score_index=p.score_index, token_index=p.token_index)))
                chunk, count = [], 0
        return out

    def _with_loss_inputs(self, batch: TrainBatch, rows: list[int], mb: MicroBatch) -> MicroBatch:
        """``mb`` (host) with the loss's per-row and per-token inputs for ``rows``."""
        return dataclasses.replace(
            mb, advantages=batch.advantages.index_select(0, torch.tensor(rows)).float(),
            old_logprobs=self._scored(batch.old_logprobs, rows, mb), ref_logprobs=self._scored(batch.ref_logprobs, rows, mb),
            rollout_logprobs=self._scored(batch.rollout_logprobs, rows, mb))

    @staticmethod
    def _shift(t: torch.Tensor | None, rows: list[int], length: int) -> torch.Tensor | None:
        """Per-token values stored at the token's own position -> at the position that predicts it."""
        if t is None:
            return None
        s = torch.roll(_fit(t.index_select(0, torch.tensor(rows)).float(), length), -1, dims=1)
        s[:, -1] = 0
        return s

    @classmethod
    def _scored(cls, t: torch.Tensor | None, rows: list[int], mb: MicroBatch) -> torch.Tensor | None:
        """Per-token batch values (stored at each token's own position) laid out like ``mb.targets``."""
        if mb.token_index is None:
            return cls._shift(t, rows, mb.input_ids.shape[1])
        if t is None:
            return None
        return t.index_select(0, torch.tensor(rows)).float().gather(1, mb.token_index) * mb.loss_mask.gt(0)

    # ---- forward-only ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def logprobs(self, batch: TrainBatch, *, reference: bool = False) -> torch.Tensor:
        """[B, S] log-probabilities of each completion token at its own position (0 elsewhere)."""
        model = self.reference if reference else self.model
        if model is None:
            raise RuntimeError("Policy.logprobs(reference=True) needs the reference model (grpo.beta > 0)")
        model.eval()
        groups = self.micro_batches(batch)
        res = pipelined_token_logprobs(model, [mb for _, mb in groups], vocab_size=self.vocab_size,
                                       compute_entropy=False, temperature=self.logprob_temperature)
        out = torch.zeros(batch.input_ids.shape, dtype=torch.float32, device=self.device)
        for (rows, mb), r in zip(groups, res):
            for i, b in enumerate(rows):
                if mb.token_index is not None:  # packed: token_index says where each scored token sits
                    keep = mb.loss_mask[i] > 0
                    out[b, mb.token_index[i][keep]] = r.logprobs[i][keep]
                    continue
                length = int(batch.lengths[b])
                out[b, 1:length] = r.logprobs[i, :length - 1]  # back to the scored token's own position
        return out.cpu()  # the TrainBatch is host memory: one device-to-host copy per call

    # ---- training ----------------------------------------------------------------------------------------------

    def train_step(self, batch: TrainBatch, loss_fn: LossFn, rows: list[int] | None = None,
                   totals: tuple[int, float] | None = None) -> StepResult:
        """One optimiser step over the sequences ``rows`` of this rank's ``batch`` (default: all of them; a PPO
        mini-batch otherwise; its data-parallel shard, ``training.sharding``), gradients averaged over the
        data-parallel ranks. ``totals``: (sequences, loss tokens) of the step over all data-parallel ranks, which
        the loss divides by; default: summed over the ranks here (a collective)."""
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.model.train()
        rows = list(range(batch.input_ids.shape[0])) if rows is None else list(rows)
        if not rows:
            raise ValueError("train_step: no sequences on this rank; shard the step with training.sharding."
                             "shard_batch, which gives every data-parallel rank at least one")
        dp = parallel_state.get_data_parallel_world_size()
        if totals is None:
            totals = self._global_totals(batch, rows)
        groups = self.micro_batches(batch, rows, loss_inputs=True)
        n = len(groups)
        # The schedule divides each micro-batch loss by n and DDP averages over the dp ranks: dividing each
        # micro-batch by total / (n * dp) makes the step's loss sum / total over all ranks' sequences (sequence
        # aggregation: of per-sequence means) or tokens (token aggregation), however unevenly the ranks hold them.
        total = totals[1] if self.cfg.grpo.loss_aggregation == "token" else totals[0]
        denominator = max(float(total), 1.0) / (n * dp)
        items = iter(groups)

        def forward_step(data_iterator, chunk):
            rows, mb = next(data_iterator)

            def loss_func(output):
                r = token_logprobs(mb.scoring_logits(output), mb.targets, mb.loss_mask, vocab_size=self.vocab_size,
                                   temperature=self.logprob_temperature)
                loss, metrics = loss_fn(
                    logprobs=r.logprobs, entropy=r.entropy, mask=r.mask, advantages=mb.advantages,
                    old_logprobs=mb.old_logprobs, ref_logprobs=mb.ref_logprobs,
                    rollout_logprobs=mb.rollout_logprobs, denominator=denominator)
                return loss, {k: v.detach().float().clone() for k, v in metrics.items()}

            return chunk(**mb.model_kwargs()), loss_func

        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=items, model=[self.model], num_microbatches=n,
            seq_length=max(mb.input_ids.shape[1] for _, mb in groups),
            micro_batch_size=max(mb.input_ids.shape[0] for _, mb in groups), forward_only=False)
        _ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        metrics = _mean_metrics(losses if parallel_state.is_pipeline_last_stage() else None, self.device)
        return StepResult(metrics=metrics, grad_norm=float(grad_norm or 0.0),
                          lr=float(self.optimizer.param_groups[0]["lr"]))

    def _global_totals(self, batch: TrainBatch, rows: list[int]) -> tuple[int, float]:
        """(sequences, loss tokens) of ``rows`` summed over the data-parallel ranks."""
        import torch.distributed as dist
        from megatron.core import parallel_state

        counts = torch.tensor([float(len(rows)), float(batch.loss_mask.index_select(0, torch.tensor(rows)).sum())],
                              dtype=torch.float64, device=self.device)
        if parallel_state.get_data_parallel_world_size() > 1:
            dist.all_reduce(counts, group=parallel_state.get_data_parallel_group())
        return int(counts[0]), float(counts[1])

    # ---- weights out -------------------------------------------------------------------------------------------

    def export_buckets(self, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """HF-named full tensors in buckets (collective over the model-parallel group)."""
        from megatron_vr1.convert.exporter import export_buckets

        return export_buckets(self.model, bucket_bytes, self.hf_config)


def _fit(t: torch.Tensor, length: int) -> torch.Tensor:
    """``t`` [rows, width] cut or zero-padded on the right to ``length`` columns."""
    if t.shape[1] >= length:
        return t[:, :length]
    return torch.cat([t, t.new_zeros(t.shape[0], length - t.shape[1])], dim=1)


def _mean_metrics(losses: list[dict] | None, device: torch.device) -> dict[str, float]:
    """Mean of each metric over micro-batches and DP ranks, broadcast from the last pipeline stage."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_vr1.training.logprobs import broadcast_from_last_stage

    keys_obj: list[Any] = [sorted(losses[0]) if losses else None]
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast_object_list(keys_obj, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                   group=parallel_state.get_pipeline_model_parallel_group())
    keys = keys_obj[0] or []
    local = None
    if losses is not None:
        local = [torch.stack([d[k].reshape(()) for d in losses]).mean().reshape(1) for k in keys]
        vec = torch.cat(local) if local else torch.zeros(0, device=device)
        dist.all_reduce(vec, group=parallel_state.get_data_parallel_group())
        local = [vec / parallel_state.get_data_parallel_world_size()]
    vec = broadcast_from_last_stage(local, device)[0] if keys else torch.zeros(0)
    return {k: float(v) for k, v in zip(keys, vec.tolist())}  # one device-to-host copy
