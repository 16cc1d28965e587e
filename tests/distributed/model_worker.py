"""torchrun worker: the megatron Qwen2.5-VL policy under several (TP, PP, DP) layouts in one launch, each checked
against transformers' Qwen2_5_VLForConditionalGeneration with the same weights (built identically on every rank).

For each layout: megatron DDP + the schedule from get_forward_backward_func (1F1B under PP) over micro-batches
of different sequence lengths (one sample each, split over DP ranks); in the loss function the last stage
compares the TP-gathered logits, logprobs and entropy with transformers; after the step every rank compares its
parameter shards' grads with the transformers grads of the same global loss; then a forward-only pass through
``pipelined_token_logprobs`` must deliver the logprobs to every pipeline rank. Writes OUT/rank{r}.json.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from model_loading import IMAGE_TOKEN, VOCAB, hf_logits, image_prompt, load_hf_into, megatron_shard_from_hf, tiny_hf_model  # noqa: E402

# name: (TP, PP, sequence parallel, tied embeddings); DP = 4 / (TP x PP)
LAYOUTS = {"tp2pp2": (2, 2, False, False), "tp2": (2, 1, False, False), "tp2sp": (2, 1, True, False),
           "pp2": (1, 2, False, False), "pp2tied": (1, 2, False, True), "dp": (1, 1, False, False)}
# (text before, grid, text after): different lengths per micro-batch
SAMPLES = [(7, (1, 4, 8), 9), (3, (1, 8, 4), 20), (12, (1, 4, 4), 5), (5, (1, 4, 12), 14)]


def reference(hf, hf_config):
    """Per-sample HF logits / logprobs / entropy and the HF grads of the mean per-sample loss."""
    from megatron_vr1.models.build import mrope_position_ids

    data, total = [], 0.0
    for i, (before, grid, after) in enumerate(SAMPLES):
        ids, pix, thw = image_prompt(100 + i, before, grid, after)
        targets = torch.roll(ids, -1, 1)
        mask = torch.zeros_like(ids)
        mask[:, -6:-1] = 1
        logits = hf_logits(hf, ids, pix, thw).float()
        lp_all = torch.log_softmax(logits, -1)
        lp = lp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask
        ent = -(lp_all.exp() * lp_all).sum(-1) * mask
        total = total + (-(lp.sum() / mask.sum())) / len(SAMPLES)
        data.append(dict(ids=ids, pix=pix, thw=thw, targets=targets, mask=mask, pos=mrope_position_ids(ids, thw, hf_config),
                         logits=logits.detach(), lp=lp.detach(), ent=ent.detach()))
    total.backward()
    grads = {k: p.grad.detach().clone() for k, p in hf.named_parameters()}
    return data, grads


def _pad_to(t, length, value=0):
    return torch.nn.functional.pad(t, (0, length - t.shape[-1]), value=value)


def micro_batch(d, multiple):
    """The sample as a MicroBatch, right-padded (pad id 0, mask 0) to a multiple of ``multiple`` for SP."""
    from megatron_vr1.training.logprobs import MicroBatch

    s = d["ids"].shape[1]
    n = -(-s // multiple) * multiple
    pos = torch.cat([d["pos"], torch.arange(s, n).expand(3, 1, n - s)], dim=2)
    return MicroBatch(input_ids=_pad_to(d["ids"], n), position_ids=pos, targets=_pad_to(d["targets"], n),
                      loss_mask=_pad_to(d["mask"], n), pixel_values=d["pix"], image_grid_thw=d["thw"])


def run_layout(name, tp, pp, sp, hf, data, hf_grads):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_vr1.config.model import ModelConfig
    from megatron_vr1.config.parallel import ParallelConfig
    from megatron_vr1.models.build import build_model
    from megatron_vr1.models.hf_config import padded_vocab_size
    from megatron_vr1.parallel import state
    from megatron_vr1.training.logprobs import pipelined_token_logprobs, token_logprobs

    pcfg = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, sequence_parallel=sp)
    state.initialize(pcfg)
    model = build_model(hf.config, ModelConfig(dtype="float32"), pcfg)
    load_hf_into(model, hf)
    ddp = DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                  module=model)
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = data[dp_rank::dp]
    batches = [micro_batch(d, tp if sp else 1) for d in mine]
    checks = {"logits_rel": 0.0, "logprob_abs": 0.0, "entropy_abs": 0.0}
    it = iter(zip(batches, mine))

    def forward_step(data_iterator, chunk):
        mb, ref = next(data_iterator)

        def loss_func(output):
            s = ref["ids"].shape[1]  # compare the real tokens; SP padding is masked out of the loss
            full = gather_from_tensor_model_parallel_region(output.detach())[:, :s, :VOCAB]
            checks["logits_rel"] = max(checks["logits_rel"],
                                       ((full - ref["logits"]).abs().max() / ref["logits"].abs().max()).item())
            r = token_logprobs(output, mb.targets, mb.loss_mask, vocab_size=VOCAB)
            checks["logprob_abs"] = max(checks["logprob_abs"], (r.logprobs[:, :s] - ref["lp"]).abs().max().item())
            checks["entropy_abs"] = max(checks["entropy_abs"], (r.entropy[:, :s] - ref["ent"]).abs().max().item())
            loss = -(r.logprobs.sum() / r.mask.sum())
            return loss, {"loss": loss.detach().clone()}

        return chunk(**mb.model_kwargs()), loss_func

    ddp.zero_grad_buffer()
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=it, model=[ddp],
                                num_microbatches=len(batches), seq_length=max(b.input_ids.shape[1] for b in batches),
                                micro_batch_size=1, forward_only=False)
    lm = model.language_model
    offset = lm.decoder.layers[0].layer_number - 1
    expected = megatron_shard_from_hf(hf_grads, hf.config, ps.get_tensor_model_parallel_rank(), tp, offset,
                                      len(lm.decoder.layers), padded_vocab_size(VOCAB, tp), model.pre_process,
                                      model.post_process)
    grad_rel, worst = 0.0, ""
    for pname, p in model.named_parameters():
        rel = ((p.main_grad - expected[pname]).abs().max() / expected[pname].abs().max().clamp_min(1e-12)).item()
        if rel > grad_rel:
            grad_rel, worst = rel, pname
    piped = pipelined_token_logprobs(ddp, batches, vocab_size=VOCAB)
    piped_abs = max((p.logprobs[:, :d["lp"].shape[1]] - d["lp"]).abs().max().item() for p, d in zip(piped, mine))
    out = dict(checks if ps.is_pipeline_last_stage() else {}, grad_rel=grad_rel, worst_grad=worst,
               n_params=len(expected), pipelined_logprob_abs=piped_abs, n_pipelined=len(piped),
               n_microbatches=len(batches), sequence_parallel=model.config.sequence_parallel, pp_rank=ps.get_pipeline_model_parallel_rank(),
               tp_rank=ps.get_tensor_model_parallel_rank(), has_visual=model.visual is not None)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    refs = {}  # tied -> (HF model, per-sample data, HF grads); the tied model is the Qwen2.5-VL-3B case
    results = {}
    for name in args.layouts.split(","):
        tp, pp, sp, tied = LAYOUTS[name]
        if tied not in refs:
            hf = tiny_hf_model(0, tie_word_embeddings=tied)
            refs[tied] = (hf, *reference(hf, hf.config))
        results[name] = run_layout(name, tp, pp, sp, *refs[tied])
    from megatron_vr1.parallel import state

    rank = int(os.environ["RANK"])
    state.destroy()
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
