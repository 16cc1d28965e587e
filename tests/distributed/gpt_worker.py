"""torchrun worker: one tiny GPT run at a given layout; each rank writes OUT/rank{r}.json."""

import argparse
import json
import os


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--sp", action="store_true")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--load", default=None)
    ap.add_argument("--save", default=None)
    ap.add_argument("--save-init", default=None)
    args = ap.parse_args()

    from megatron_vr1.config.parallel import ParallelConfig
    from megatron_vr1.parallel import state
    from megatron_vr1.training.smoke import run_smoke

    cfg = ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp, sequence_parallel=args.sp)
    state.initialize(cfg)
    res = run_smoke(cfg, steps=args.steps, load_dir=args.load, save_dir=args.save,
                    save_init_dir=args.save_init)
    rank = int(os.environ["RANK"])
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump({"losses": res.losses, "grad_norms": res.grad_norms, "eval_loss": res.eval_loss,
                   "is_last_stage": res.is_last_stage}, f)
    state.destroy()


if __name__ == "__main__":  # dist_checkpointing's spawn worker re-imports this file
    main()
