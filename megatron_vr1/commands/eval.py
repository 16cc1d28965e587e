"""``megatron-vr1 eval``: generate boxes with a model and score them by the paper's protocol (spec §4).

    megatron-vr1 eval --model HF_DIR --gt GT.json --data ROWS_OR_IMAGE_DIR [--gt ... --data ...]
                      [--mode coco|grounding] [--score constant|logprob] [--engine hf|sglang] --out DIR

Each ``--gt``/``--data`` pair is one dataset (ODinW-13: thirteen pairs, reported with their average). Writes
``metrics.json``, ``detections.json``, ``table.md`` (shaped like the paper's Table 1), ``pr_curves.png`` and
``grid_<dataset>.png`` into DIR, plus ``<dataset>/answers.jsonl`` with every raw answer.

Pixel budget: with ``--engine hf`` the in-process processor uses --min/--max-pixels (default: the released eval's
28*28 .. 12800*28*28). With ``--engine sglang`` the server resizes images with the image processor of the
checkpoint it serves, which a request cannot change; eval therefore evaluates at that checkpoint's budget (read
from --model, which must be the served checkpoint) and refuses --min/--max-pixels that differ from it, since boxes
would otherwise be rescaled from a size the model never saw (tests/integration/test_eval_sglang.py).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import json
import sys
from pathlib import Path
from typing import Any

ENGINES = ("hf", "sglang")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="a Hugging Face model directory, or a Megatron checkpoint: a training run's checkpoint "
                             "dir (its `latest` is used), one iter_ directory, or a `convert hf-to-mcore` output "
                             "(needs --hf-config)")
    parser.add_argument("--hf-config", default=None,
                        help="for a Megatron --model: the HF directory it came from (config, tokenizer, processor)")
    parser.add_argument("--gt", action="append", required=True, help="COCO ground truth of a dataset (repeatable)")
    parser.add_argument("--data", action="append", required=True,
                        help="images of the matching --gt: rows (.jsonl/.json/.parquet with 'image' and 'image_id' or "
                             "a file name matching the GT) or a directory holding the GT file_names (repeatable)")
    parser.add_argument("--name", action="append", default=None,
                        help="dataset names for the report (repeatable; default: the GT file's parent directory)")
    parser.add_argument("--mode", choices=("coco", "grounding"), default="coco",
                        help="coco: one query per image, all categories; grounding: one per (image, present category)")
    parser.add_argument("--score", choices=("constant", "logprob"), default="constant",
                        help="box confidence: 0.99 (the paper's Qwen protocol) or Griffon's token-probability score")
    parser.add_argument("--engine", choices=ENGINES, default="hf", help="rollout engine that generates the answers")
    parser.add_argument("--sglang-url", default=None, help="with --engine sglang: URL of a running SGLang server")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8, help="queries per generate call")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N images of each dataset")
    parser.add_argument("--min-pixels", type=int, default=None,
                        help="image processor budget, lower bound (default: 28*28 with --engine hf; with --engine "
                             "sglang, the served checkpoint's own value, which is what the server resizes with)")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="image processor budget, upper bound (default: 12800*28*28 as in the released eval with "
                             "--engine hf; with --engine sglang, the served checkpoint's own value)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--model-label", default=None, help="model name in table.md (default: the --model dir name)")
    parser.add_argument("--grid-images", type=int, default=16, help="images in each grid figure")


class EngineUnavailable(RuntimeError):
    """The requested rollout engine cannot be used here; the message says what to do instead."""


def make_engine(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    """(engine, render(problem) -> prompt, decode(ids) -> text, input_size(image) or None) for ``args.engine``."""
    if args.engine == "hf":
        from megatron_vr1.rollout.hf_engine import HFEngine

        args.min_pixels, args.max_pixels = resolve_pixel_budget(args)
        engine = HFEngine(args.model, dtype=args.dtype, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                          max_batch_size=args.batch_size)
        return engine, engine.render_prompt, engine.decode, engine.input_size
    if args.engine == "sglang":
        try:
            from megatron_vr1.rollout.sglang_engine import SGLangEngine, image_pad_id_of
            from megatron_vr1.rollout.sglang_http import Endpoint
        except ImportError as e:
            raise EngineUnavailable(f"--engine sglang is unavailable here ({e}); install the rollout extra "
                                    "(`make` builds .venv-sglang on CPU) or use --engine hf") from None
        if not args.sglang_url:
            raise EngineUnavailable("--engine sglang needs --sglang-url of a running server "
                                    "(start one with `megatron-vr1 serve-rollout`)")
        processor = _checkpoint_processor(args.model)
        args.min_pixels, args.max_pixels = resolve_pixel_budget(args, processor.image_processor)
        input_size = _server_input_size(processor.image_processor)
        engine = SGLangEngine([Endpoint(url=args.sglang_url)], image_pad_id=image_pad_id_of(args.model),
                              max_batch=args.batch_size)

        def render(problem: str) -> str:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": problem}]}]
            return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

        def decode(ids: Any) -> str:
            return processor.tokenizer.decode(list(ids), skip_special_tokens=True)

        return engine, render, decode, input_size
    raise EngineUnavailable(f"--engine {args.engine!r} is unknown; use one of {ENGINES}")


def _checkpoint_processor(model: str) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model, local_files_only=True)


def checkpoint_pixel_budget(image_processor: Any) -> tuple[int, int]:
    """(min_pixels, max_pixels) of a checkpoint's Qwen2-VL image processor as loaded from its files (transformers
    5 spells them size={shortest_edge, longest_edge}; a Qwen release's preprocessor_config.json sets both)."""
    size = image_processor.size
    return int(size["shortest_edge"]), int(size["longest_edge"])


def _server_input_size(image_processor: Any):
    """input_size(image) -> (width, height) the SGLang server feeds the model: SGLang 0.5.10 resizes an image only
    inside the HF processor it loads from the served checkpoint (no per-request size, no resize of its own for
    Qwen2.5-VL images), i.e. smart_resize of the image file's size with that processor's factor and budget."""
    from PIL import Image

    from megatron_vr1.data.image import smart_resize

    min_pixels, max_pixels = checkpoint_pixel_budget(image_processor)
    factor = int(image_processor.patch_size) * int(image_processor.merge_size)

    def input_size(image: str) -> tuple[int, int]:
        with Image.open(image) as im:  # reads the header only
            width, height = im.size
        h, w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
        return w, h

    return input_size


class PixelBudgetMismatch(ValueError):
    """--min/--max-pixels differ from what the engine will resize images with."""


def resolve_pixel_budget(args: argparse.Namespace, served_processor: Any = None) -> tuple[int, int]:
    """The (min_pixels, max_pixels) the evaluation runs at.

    --engine hf: the flags, else the released eval's 28*28 and 12800*28*28 (the in-process processor is built with
    them). --engine sglang: the server resizes with the image processor of the checkpoint it serves (``--model``,
    the same files) and a request cannot change that, so eval uses that budget; a flag that asks for a different
    one is an error, since boxes would be rescaled from a size the model never saw.
    """
    from megatron_vr1.eval.queries import EVAL_MAX_PIXELS, EVAL_MIN_PIXELS

    if args.engine != "sglang":
        return (EVAL_MIN_PIXELS if args.min_pixels is None else args.min_pixels,
                EVAL_MAX_PIXELS if args.max_pixels is None else args.max_pixels)
    if served_processor is None:
        served_processor = _checkpoint_processor(args.model).image_processor
    served = checkpoint_pixel_budget(served_processor)
    asked = (served[0] if args.min_pixels is None else args.min_pixels,
             served[1] if args.max_pixels is None else args.max_pixels)
    if asked != served:
        raise PixelBudgetMismatch(
            f"--engine sglang: the server resizes images with the image processor of the checkpoint it serves "
            f"(min_pixels={served[0]}, max_pixels={served[1]} in {args.model}), but --min-pixels/--max-pixels ask "
            f"for {asked[0]}/{asked[1]}; boxes would be rescaled from a size the model never saw. Drop the flags "
            f"(or pass --min-pixels {served[0]} --max-pixels {served[1]}), or serve a copy of the checkpoint whose "
            "processor config sets the budget you want, or use --engine hf.")
    if args.min_pixels is None or args.max_pixels is None:
        print(f"megatron-vr1 eval: --engine sglang evaluates at the served checkpoint's pixel budget "
              f"min_pixels={served[0]} max_pixels={served[1]}", file=sys.stderr, flush=True)
    return served


def _dataset_names(args: argparse.Namespace) -> list[str]:
    if args.name:
        return list(args.name)
    names = []
    for gt in args.gt:
        p = Path(gt)
        base = p.parent.name or p.stem
        names.append(base if base not in names else f"{base}_{len(names)}")
    return names


def hf_model_dir(model: str, hf_config: str | None, out: str) -> str:
    """``model`` itself when it is an HF directory; for a Megatron checkpoint, an HF copy written to
    ``<out>/hf_model`` by ``convert mcore-to-hf`` (in its own process: it sets up process groups and the CPU
    compatibility layer, which must not leak into the evaluating engine)."""
    path = Path(model)
    if (path / "config.json").is_file():
        return model
    from megatron_vr1.checkpoint.layout import resolve

    if (path / ".metadata").is_file():
        ckpt = path  # a torch_dist model checkpoint (convert hf-to-mcore)
    else:
        found = resolve(path)
        if found is None:
            raise FileNotFoundError(f"--model {model} is not a Hugging Face model directory (no config.json) nor a "
                                    "Megatron checkpoint (an iter_ directory, a save dir with `latest`, or a "
                                    "torch_dist directory)")
        ckpt = found / "model_optim"
    if not hf_config:
        raise FileNotFoundError(f"--model {model} is a Megatron checkpoint: pass --hf-config with the HF directory "
                                "it was trained from (its config, tokenizer and processor files are used)")
    dest = Path(out) / "hf_model"
    if dest.exists():  # eval's own conversion from an earlier evaluation into this --out: convert afresh
        shutil.rmtree(dest)
    proc = subprocess.run([sys.executable, "-m", "megatron_vr1.cli", "convert", "mcore-to-hf", "--ckpt", str(ckpt),
                           "--hf-config", hf_config, "--out", str(dest)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise FileNotFoundError(f"--model {model}: converting the checkpoint to HF failed: "
                                f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    print(f"megatron-vr1 eval: evaluating {ckpt} as the HF checkpoint {dest}", flush=True)
    return str(dest)


def run(args: argparse.Namespace) -> int:
    from megatron_vr1.eval.coco_metrics import CocoInputError, load_json_file, validate_ground_truth
    from megatron_vr1.eval.queries import EvalDataError
    from megatron_vr1.eval.runner import EvalSettings

    def fail(msg: str) -> int:
        print(f"megatron-vr1 eval: {msg}", file=sys.stderr)
        return 2

    if len(args.gt) != len(args.data):
        return fail(f"got {len(args.gt)} --gt and {len(args.data)} --data; pass one --data per --gt")
    names = _dataset_names(args)
    if len(names) != len(args.gt) or len(set(names)) != len(names):
        return fail(f"--name must be given once per --gt with distinct values, got {names}")
    try:
        EvalSettings(mode=args.mode, score=args.score, max_new_tokens=args.max_new_tokens,  # fail fast on bad flags
                     batch_size=args.batch_size, limit=args.limit)
        gts = [validate_ground_truth(load_json_file(p, "ground-truth"), source=str(p)) for p in args.gt]
        for p in args.data:
            if not Path(p).exists():
                raise EvalDataError(f"--data {p} does not exist")
        args.model = hf_model_dir(args.model, args.hf_config, args.out)
        engine, render, decode, input_size = make_engine(args)  # settles args.min_pixels/max_pixels
    except (CocoInputError, EvalDataError, EngineUnavailable, FileNotFoundError, ValueError) as e:
        return fail(str(e))
    try:
        settings = EvalSettings(mode=args.mode, score=args.score, max_new_tokens=args.max_new_tokens,
                                batch_size=args.batch_size, limit=args.limit, min_pixels=args.min_pixels,
                                max_pixels=args.max_pixels)
    except ValueError as e:
        engine.close()
        return fail(str(e))
    try:
        return _evaluate_all(args, settings, names, gts, engine, render, decode, input_size)
    except (CocoInputError, EvalDataError) as e:
        return fail(str(e))
    finally:
        engine.close()


def _evaluate_all(args, settings, names, gts, engine, render, decode, input_size) -> int:
    from megatron_vr1.eval.figures import grid_items, plot_image_grid, plot_pr_curves
    from megatron_vr1.eval.report import odinw_average, per_category_table, table1_markdown
    from megatron_vr1.eval.runner import evaluate_dataset

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name, gt, data in zip(names, gts, args.data):
        res = evaluate_dataset(engine, gt, data, name=name, settings=settings, render=render, decode=decode,
                               input_size=input_size, progress=lambda m: print(m, file=sys.stderr))
        results.append(res)
        ds_dir = out / name
        ds_dir.mkdir(parents=True, exist_ok=True)
        (ds_dir / "detections.json").write_text(json.dumps(res.detections))
        (ds_dir / "metrics.json").write_text(json.dumps({**res.metrics.to_json(), "answers": res.counts.to_json()},
                                                        indent=2))
        with (ds_dir / "answers.jsonl").open("w") as f:
            for a in res.answers:
                f.write(json.dumps(a) + "\n")
        images = {q.image_id: q.image for q in res.queries}
        plot_image_grid(grid_items(gt, res.detections, images, args.grid_images), out / f"grid_{name}.png")
        c = res.counts
        print(f"{name}: AP={res.metrics.stats['AP']:.4f} AP50={res.metrics.stats['AP50']:.4f} "
              f"queries={c.n_queries} unparsable={c.n_unparsable} repaired={c.n_repaired} failed={c.n_failed} "
              f"unknown_labels={c.n_unknown_label} detections={c.n_detections}")

    per_dataset = {r.name: r.metrics.stats["AP"] for r in results}
    summary: dict[str, Any] = {
        "mode": settings.mode, "score": settings.score, "engine": args.engine, "model": str(args.model),
        "weight_version": engine.weight_version,
        "datasets": {r.name: {**r.metrics.to_json(), "answers": r.counts.to_json()} for r in results},
    }
    if len(results) > 1:
        summary["average_mAP"] = odinw_average(per_dataset)
    if len(results) == 1:
        summary.update(results[0].metrics.stats)
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    dets = results[0].detections if len(results) == 1 else {r.name: r.detections for r in results}
    (out / "detections.json").write_text(json.dumps(dets))
    plot_pr_curves([(r.name, r.metrics) for r in results], out / "pr_curves.png")

    label = args.model_label or Path(args.model).name
    coco = results[0].metrics.stats if settings.mode == "coco" and len(results) == 1 else None
    odinw = per_dataset if coco is None else None
    lines = [f"# Evaluation of {label} ({settings.mode} mode, {settings.score} scores)", "",
             table1_markdown(label, "Dynamic", coco, odinw), ""]
    for r in results:
        c = r.counts
        lines += [f"## {r.name}", "", f"AP {100 * r.metrics.stats['AP']:.1f}, AP50 {100 * r.metrics.stats['AP50']:.1f}, "
                  f"AR100 {100 * max(r.metrics.stats['AR100'], 0):.1f}; {c.n_queries} queries, {c.n_unparsable} "
                  f"unparsable, {c.n_repaired} repaired, {c.n_truncated} truncated, {c.n_failed} failed, "
                  f"{c.n_unknown_label} boxes with unknown labels dropped.", "", per_category_table(r.metrics.per_category), ""]
    (out / "table.md").write_text("\n".join(lines))
    print(f"wrote {out}/metrics.json, detections.json, table.md, pr_curves.png")
    return 0
