"""``megatron-vr1 data <sub>``: build and check datasets and tiny-model assets.

Subcommands: synth, coco, odinw, refcoco, tiny-model, check. User errors (bad paths, malformed files or
rows, invalid values) print one line naming the problem and return 2; they never print a traceback.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-instances", type=int, default=1)
    p.add_argument("--max-instances", type=int, default=30)
    p.add_argument("--hard-threshold", type=int, default=10, help="a row is hard with more instances than this")
    p.add_argument("--hard-fraction", type=float, default=None, help="resample so this fraction of rows is hard")
    p.add_argument("--negative-ratio", type=float, default=0.0, help="negative rows kept per positive row")
    p.add_argument("--max-rows", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)


def _convert_common(p: argparse.ArgumentParser, annotations_help: str) -> None:
    p.add_argument("annotations", help=annotations_help)
    p.add_argument("--images", required=True, help="folder holding the images named by file_name")
    p.add_argument("--out", required=True, help="output rows file (.jsonl or .parquet)")
    p.add_argument("--template", choices=["qwen25vl", "griffon"], default="qwen25vl")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_cmd", metavar="<sub>", required=True)

    p = sub.add_parser("synth", help="procedural localization dataset: rows + COCO GT for train/val")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, required=True, help="training images (val gets n/10 unless --n-val)")
    p.add_argument("--n-val", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--difficulty", default="demo", help="demo | shapes | labels | easy | medium | hard")
    p.add_argument("--template", choices=["qwen25vl", "griffon"], default="qwen25vl")
    p.set_defaults(_data_run=_synth)

    p = sub.add_parser("coco", help="COCO instances json -> detection rows (one query per image)")
    _convert_common(p, "COCO instances json")
    _filters(p)
    p.set_defaults(_data_run=_coco)

    p = sub.add_parser("odinw", help="COCO-format (ODinW) json -> grounding rows (one per image x category)")
    _convert_common(p, "COCO-format annotation json of one ODinW set")
    _filters(p)
    p.set_defaults(_data_run=_odinw)

    p = sub.add_parser("refcoco", help="RefCOCO refs + COCO instances -> REC rows")
    _convert_common(p, "COCO instances json the refs point into")
    p.add_argument("--refs", required=True,
                   help="RefCOCO refs: the refer toolkit's refs(unc).p / refs(google).p pickle, or the same list "
                        "as JSON")
    p.add_argument("--split", default=None, help="keep refs of this split only (train, val, testA, ...)")
    p.add_argument("--all-sentences", action="store_true", help="one row per sentence instead of per ref")
    p.set_defaults(_data_run=_refcoco)

    p = sub.add_parser("tiny-model", help="write an offline tiny Qwen2.5-VL (tokenizer, processor, random weights)")
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--preset", choices=["test", "demo"], default="test",
                   help="test: ~0.4M params for unit tests; demo: tiny-demo's ~2.2M model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tie-word-embeddings", action="store_true", help="share embed_tokens and lm_head")
    p.set_defaults(_data_run=_tiny_model)

    p = sub.add_parser("check", help="validate rows and report every bad one (file, row, field)")
    p.add_argument("rows", help=".jsonl, .parquet or an HF save_to_disk folder")
    p.add_argument("--no-images", action="store_true", help="skip decoding images")
    p.set_defaults(_data_run=_check)


def _synth(args: argparse.Namespace) -> int:
    from megatron_vr1.data.synth import build_synth

    paths = build_synth(args.out, n=args.n, seed=args.seed, difficulty=args.difficulty, n_val=args.n_val,
                        template=args.template)
    print("wrote " + ", ".join(f"{k}={v}" for k, v in paths.items()))
    return 0


def _row_filter(args: argparse.Namespace):
    from megatron_vr1.data.converters import RowFilter

    return RowFilter(min_instances=args.min_instances, max_instances=args.max_instances,
                     hard_threshold=args.hard_threshold, hard_fraction=args.hard_fraction,
                     negative_ratio=args.negative_ratio, max_rows=args.max_rows, seed=args.seed)


def _write(rows, out: str) -> int:
    from megatron_vr1.data.coco import write_jsonl, write_parquet

    n = write_parquet(rows, out) if out.endswith(".parquet") else write_jsonl(rows, out)
    print(f"wrote {n} rows to {out}")
    return 0


def _coco(args: argparse.Namespace) -> int:
    from megatron_vr1.data.converters import coco_detection_rows

    return _write(coco_detection_rows(args.annotations, args.images, template=args.template,
                                      row_filter=_row_filter(args)), args.out)


def _odinw(args: argparse.Namespace) -> int:
    from megatron_vr1.data.converters import odinw_grounding_rows

    return _write(odinw_grounding_rows(args.annotations, args.images, template=args.template,
                                       row_filter=_row_filter(args)), args.out)


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles lists, dicts, strings and numbers only: any class or function reference is refused, so a refs
    file cannot run code. The refer toolkit's refs pickles (written by Python 2) need nothing else."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"it references {module}.{name}; a refs pickle holds only lists, dicts, "
                                     "strings and numbers")


def load_refs(path: str | Path) -> list:
    """RefCOCO refs as the refer toolkit ships them (``refs(unc).p``, a pickle) or the same list as JSON."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such refs file; pass refs(unc).p / refs(google).p or a JSON list of refs")
    if p.suffix in (".p", ".pkl", ".pickle"):
        try:
            with p.open("rb") as f:
                refs = _PlainDataUnpickler(f, encoding="utf-8").load()
        except (pickle.UnpicklingError, EOFError, UnicodeDecodeError, ValueError, KeyError, IndexError,
                TypeError) as e:
            raise ValueError(f"{p}: not a readable refs pickle ({e})") from None
    else:
        try:
            refs = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{p}: not valid JSON ({e}); pass the refs pickle or a JSON list of refs") from None
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise ValueError(f"{p}: expected a list of refs (objects with ann_id, image_id, sentences, split), "
                         f"got {type(refs).__name__}")
    return refs


def _refcoco(args: argparse.Namespace) -> int:
    from megatron_vr1.data.converters import refcoco_rows

    return _write(refcoco_rows(args.annotations, load_refs(args.refs), args.images, template=args.template,
                               split=args.split, all_sentences=args.all_sentences), args.out)


def _tiny_model(args: argparse.Namespace) -> int:
    from megatron_vr1.data.tiny_model import build_tiny_model

    out = build_tiny_model(args.out, preset=args.preset, seed=args.seed,
                           tie_word_embeddings=True if args.tie_word_embeddings else None)
    print(f"wrote tiny Qwen2.5-VL ({args.preset}, seed {args.seed}) to {out}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from megatron_vr1.data.check import check_rows

    report = check_rows(args.rows, decode_images=not args.no_images)
    for e in report.errors:
        print(f"BAD {e}")
    print(report.summary())
    return 0 if report.ok else 1


def run(args: argparse.Namespace) -> int:
    try:
        return int(args._data_run(args) or 0)
    except (ValueError, OSError, ImportError) as e:  # user errors (RowError, ConfigError are ValueErrors)
        print(f"megatron-vr1 data {args.data_cmd}: error: {e}", file=sys.stderr)
        return 2
