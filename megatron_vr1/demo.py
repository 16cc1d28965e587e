"""The CPU demo (``make demo``) and its SFT warm start (``make warmstart``), orchestrated as CLI sub-processes.

warmstart: synthetic shapes -> a random tiny Qwen2.5-VL -> SFT (recipe ``tiny_cpu_warmstart``) to a plateau ->
           the HF checkpoint in ``assets/warmstart`` plus ``warmstart.json`` (steps, time, val mAP and reward).
demo:      fresh synthetic images (seed 1; the warm start's were seed 0) ->
           eval of the warm start -> Vision-R1 GRPO with the real SGLang CPU rollout server (``tiny_cpu_demo``,
           a fixed number of steps, capped in time) -> continued SFT from the same warm start for exactly the
           training seconds GRPO used (``tiny_cpu_demo_sft_control``) ->
           eval of both -> table, plots and ``summary.json``.

Each stage is the command a user would type (``megatron-vr1 data|train|eval``), run as a sub-process so that
process groups, thread pools and the SGLang server never leak between stages; their logs go to ``<out>/logs``.
The budgets count training steps only (not process start, model build or SGLang's start-up); the two runs take
turns on the whole machine rather than sharing it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from megatron_vr1.config.reward import RewardConfig

WARMSTART_DIR = Path("assets/warmstart")
GRPO_RECIPE = "tiny_cpu_demo"
SFT_RECIPE = "tiny_cpu_demo_sft_control"
VAL_PIXELS = 56 * 56


class DemoError(RuntimeError):
    """A demo stage failed; the message names the stage and its log."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoConfig:
    out: Path = Path("runs/demo")
    warmstart: Path = WARMSTART_DIR
    grpo_steps: int = 160
    """GRPO's optimiser steps (its LR schedule spans them): the run's length in the unit that decides how far it
    learns, so a slower machine does not silently get a shorter run."""
    budget_s: float = 500.0
    """Cap on GRPO's training seconds (a slow machine stops early, keeping the demo's wall time bounded).
    Continued SFT then gets exactly the training seconds GRPO used."""
    n_train: int = 4000
    n_val: int = 200
    seed: int = 1
    """Of the demo's synthetic images. The warm start was trained on seed 0's: GRPO and continued SFT both get
    images the warm start never saw, as an RL stage gets its own data after SFT."""
    grpo_sets: tuple[str, ...] = ()
    sft_sets: tuple[str, ...] = ()
    """Extra ``--set a.b=c`` overrides for the two runs (tuning sweeps)."""

    def __post_init__(self) -> None:
        if self.budget_s <= 0 or self.grpo_steps < 1 or self.n_train < 1 or self.n_val < 1:
            raise ValueError(f"demo: budget_s={self.budget_s}, grpo_steps={self.grpo_steps}, "
                             f"n_train={self.n_train}, n_val={self.n_val} must all be positive")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "megatron_vr1.cli", *args]


def run_stage(name: str, cmd: list[str], log_path: Path, *, watch: Path | None = None, budget_s: float = 0) -> float:
    """Run one stage, logging to ``log_path``; while it runs, show its latest metrics line when ``watch`` (a
    metrics.jsonl) is given. Returns the stage's wall seconds; raises DemoError with the log's tail on failure."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    with log_path.open("w") as log, _status(name) as status:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            while proc.poll() is None:
                time.sleep(1.0)
                status(_watch_line(watch, budget_s, time.time() - t0))
        except BaseException:  # Ctrl-C or SIGTERM: SIGTERM lets the stage stop its own rollout server
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        raise DemoError(f"demo stage {name!r} failed (exit {proc.returncode}); log {log_path}:\n" + "\n".join(tail))
    wall = time.time() - t0
    print(f"  {name}: done in {wall:.0f} s", flush=True)
    return wall


class _status:
    """A one-line live status (rich) when attached to a terminal; silent otherwise."""

    def __init__(self, name: str):
        self.name = name
        self._live = None

    def __enter__(self):
        if sys.stdout.isatty():
            from rich.live import Live

            self._live = Live(f"  {self.name} ...", refresh_per_second=2, transient=True)
            self._live.__enter__()
        else:
            print(f"  {self.name} ...", flush=True)
        return self.update

    def update(self, line: str) -> None:
        if self._live is not None:
            self._live.update(f"  {self.name}: {line}")

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)


def _watch_line(metrics: Path | None, budget_s: float, elapsed: float) -> str:
    line = f"{elapsed:.0f} s"
    if metrics is None or not metrics.is_file():
        return line
    lines = metrics.read_text().strip().splitlines()
    if not lines:
        return line
    try:
        last = json.loads(lines[-1])
    except ValueError:
        return line
    shown = [f"step {last.get('step')}"]
    for key in ("reward/total", "train/nll"):
        if isinstance(last.get(key), (int, float)):
            shown.append(f"{key.split('/')[-1]} {last[key]:.3f}")
    return line + (f" of ~{budget_s:.0f} s training" if budget_s else "") + " | " + ", ".join(shown)


# ---- data, evaluation, greedy reward ----------------------------------------------------------------------------

def build_data(out: Path, *, n_train: int, n_val: int, seed: int) -> dict[str, Path]:
    """The synthetic shapes (``demo`` difficulty); reused when already built with the same settings."""
    from megatron_vr1.data.synth import DIFFICULTIES, build_synth

    stamp = out / "synth_config.json"
    if stamp.is_file():
        cfg = json.loads(stamp.read_text())
        knobs = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(DIFFICULTIES["demo"]).items()}
        if (cfg.get("n"), cfg.get("seed"), cfg.get("difficulty")) == (n_train, seed, "demo") and \
                all(cfg.get(k) == v for k, v in knobs.items()) and \
                len((out / "val.jsonl").read_text().splitlines()) == n_val:
            return {k: out / f"{k}.jsonl" if "_" not in k else out / f"{k}.json"
                    for k in ("train", "val", "train_gt", "val_gt")}
    return build_synth(out, n=n_train, n_val=n_val, seed=seed, difficulty="demo")


def greedy_reward(answers: Path, rows: Path, reward: "RewardConfig | None" = None, *,
                  step: int | None = None) -> float:
    """Mean Vision-R1 reward (format + recall + precision, at most 3) of an eval's greedy answers, under
    ``reward`` (default: the official preset) at optimizer step ``step`` of a ``step``-step run (its
    refinement stage there; ``None``: no step, as the released code scores without one)."""
    from megatron_vr1.config.reward import RewardConfig
    from megatron_vr1.data.readers import iter_parsed, open_rows
    from megatron_vr1.rewards.schedule import RefinementSchedule
    from megatron_vr1.rewards.score import score_batch
    from megatron_vr1.rewards.target import target_from_sample

    by_image = {}
    for i, row in iter_parsed(open_rows(rows)):
        sample = row.to_sample(f"val-{i}", min_pixels=VAL_PIXELS, max_pixels=VAL_PIXELS)
        by_image[str(Path(sample.image).resolve())] = target_from_sample(sample)
    texts, targets = [], []
    for line in answers.read_text().splitlines():
        a = json.loads(line)
        key = str(Path(a["image"]).resolve())
        if key not in by_image:
            raise DemoError(f"{answers}: answer for {a['image']} has no row in {rows}")
        texts.append(a.get("text", ""))  # a failed generation scores as an empty answer
        targets.append(by_image[key])
    if len(texts) != len(by_image):
        raise DemoError(f"{answers}: {len(texts)} answers for {len(by_image)} validation rows")
    reward = reward or RewardConfig(preset="official")
    breakdown = score_batch(texts, targets, reward, step,
                            schedule=RefinementSchedule.from_config(reward, total_steps=step))
    return float(sum(r.total for r in breakdown) / max(1, len(breakdown)))


def evaluate(name: str, model: Path, data: dict[str, Path], out: Path, *, hf_config: Path | None = None,
             reward: "RewardConfig | None" = None, reward_step: int | None = None) -> dict:
    """Greedy eval on the validation split: COCO AP / AP50 (pycocotools-compatible), the mean reward under
    ``reward`` at ``reward_step`` (the GRPO run's criteria at its last step) and under the official preset."""
    cmd = _cli("eval", "--model", str(model), "--gt", str(data["val_gt"]), "--data", str(data["val"]),
               "--name", "synth-val", "--out", str(out), "--max-new-tokens", "64", "--batch-size", "50",
               "--min-pixels", str(VAL_PIXELS), "--max-pixels", str(VAL_PIXELS), "--grid-images", "16")
    if hf_config is not None:
        cmd += ["--hf-config", str(hf_config)]
    run_stage(f"eval {name}", cmd, out.parent / "logs" / f"eval_{name}.log")
    from megatron_vr1.eval.localization import localization_stats

    metrics = json.loads((out / "metrics.json").read_text())["datasets"]["synth-val"]
    answers = out / "synth-val" / "answers.jsonl"
    loc = localization_stats(json.loads(data["val_gt"].read_text()),
                             json.loads((out / "synth-val" / "detections.json").read_text()))
    return {"map": float(metrics["AP"]), "ap50": float(metrics["AP50"]), "ap75": float(metrics["AP75"]),
            "reward": greedy_reward(answers, data["val"], reward, step=reward_step),
            "reward_official": greedy_reward(answers, data["val"]),
            "localization": {k: round(v, 4) for k, v in loc.items()}}


# ---- warm start ----------------------------------------------------------------------------------------------

def run_warmstart(*, root: Path = Path("runs/warmstart"), dest: Path = WARMSTART_DIR, sets: tuple[str, ...] = ()) -> dict:
    """SFT from random init to the warm start (resumable: a rerun continues the SFT run's latest checkpoint)."""
    t0 = time.time()
    print(f"megatron-vr1 warmstart: SFT warm start -> {dest}", flush=True)
    data = build_data(root / "data", n_train=8000, n_val=200, seed=0)
    init = root / "init"
    if not (init / "config.json").is_file():
        run_stage("tiny model", _cli("data", "tiny-model", "--out", str(init), "--preset", "demo", "--seed", "0"),
                  root / "logs" / "tiny_model.log")
    run_dir = root / "sft"
    cmd = _cli("train", "--recipe", "tiny_cpu_warmstart", "--resume", "--set", f"model.hf_path={init}",
               "--set", f"data.train_path={data['train']}", "--set", f"log.run_dir={run_dir}",
               "--set", "log.progress=false", *[a for s in sets for a in ("--set", s)])
    run_stage("SFT", cmd, root / "logs" / "sft.log", watch=run_dir / "metrics.jsonl")
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    from megatron_vr1.checkpoint.layout import resolve

    ckpt = resolve(run_dir / "checkpoints")
    run_stage("convert to HF", _cli("convert", "mcore-to-hf", "--ckpt", str(ckpt / "model_optim"), "--hf-config",
                                    str(init), "--out", str(tmp)), root / "logs" / "convert.log")
    result = evaluate("warmstart", tmp, data, root / "eval")
    from megatron_vr1.training.metrics import read_metrics

    records = read_metrics(run_dir)
    info = {"steps": records[-1]["step"] if records else 0, "final_nll": records[-1].get("train/nll") if records else None,
            "val_map": result["map"], "val_ap50": result["ap50"], "val_reward": result["reward"],
            "val_localization": result["localization"],
            "recipe": "tiny_cpu_warmstart", "data": "synth demo, 8000 train / 200 val, seed 0",
            "wall_s_this_invocation": round(time.time() - t0, 1), "command": "make warmstart"}
    (tmp / "warmstart.json").write_text(json.dumps(info, indent=1) + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    print(f"megatron-vr1 warmstart: {dest} (val AP {result['map']:.3f}, AP50 {result['ap50']:.3f}, "
          f"reward {result['reward']:.3f})", flush=True)
    return info


# ---- the demo --------------------------------------------------------------------------------------------------

def _train(name: str, recipe: str, cfg: DemoConfig, data: dict[str, Path], sets: tuple[str, ...], *,
           budget_s: float) -> Path:
    run_dir = cfg.out / name
    if run_dir.exists():  # the demo's own stage dir: a rerun starts fresh (no stale checkpoints or curves)
        shutil.rmtree(run_dir)
    cmd = _cli("train", "--recipe", recipe, "--no-resume", "--set", f"model.hf_path={cfg.warmstart}",
               "--set", f"data.train_path={data['train']}", "--set", f"log.run_dir={run_dir}",
               "--set", f"grpo.time_budget_s={budget_s}", "--set", "log.progress=false",
               *[a for s in sets for a in ("--set", s)])
    run_stage(name, cmd, cfg.out / "logs" / f"{name}.log", watch=run_dir / "metrics.jsonl", budget_s=budget_s)
    return run_dir


def training_seconds(run_dir: Path) -> float:
    """A finished run's training seconds (the loop's clock, what ``grpo.time_budget_s`` counts)."""
    from megatron_vr1.training.metrics import read_metrics

    records = read_metrics(run_dir)
    if not records or "time/elapsed_s" not in records[-1]:
        raise DemoError(f"{run_dir}: no time/elapsed_s in its metrics; the run did not finish a step")
    return float(records[-1]["time/elapsed_s"])


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """The whole demo; returns (and writes to ``<out>/summary.json``) the summary."""
    t0 = time.time()
    if not (cfg.warmstart / "config.json").is_file():
        raise DemoError(f"no warm start at {cfg.warmstart}: run `make warmstart` (SFT from scratch, ~20-35 min on "
                        "2 CPU cores) or pass --warmstart DIR")
    cfg.out.mkdir(parents=True, exist_ok=True)
    print(f"megatron-vr1 demo: GRPO ({cfg.grpo_steps} steps, at most {cfg.budget_s:.0f} s) vs continued SFT for "
          f"the same training time, from {cfg.warmstart}", flush=True)
    data = build_data(cfg.out / "data", n_train=cfg.n_train, n_val=cfg.n_val, seed=cfg.seed)
    from megatron_vr1.config.recipes import load_recipe

    # Every model's greedy answers are scored with the criteria GRPO trains on, in the refinement stage of its
    # last step (and with the official preset, stepless).
    scoring = dict(reward=load_recipe(GRPO_RECIPE, cfg.grpo_sets).reward, reward_step=cfg.grpo_steps)
    start = evaluate("start", cfg.warmstart, data, cfg.out / "eval" / "start", **scoring)
    grpo_dir = _train("grpo", GRPO_RECIPE, cfg, data, (f"grpo.train_steps={cfg.grpo_steps}", *cfg.grpo_sets),
                      budget_s=cfg.budget_s)
    grpo_s = training_seconds(grpo_dir)
    sft_dir = _train("sft_continued", SFT_RECIPE, cfg, data, cfg.sft_sets, budget_s=grpo_s)
    grpo = evaluate("grpo", grpo_dir / "checkpoints", data, cfg.out / "eval" / "grpo", hf_config=cfg.warmstart,
                    **scoring)
    sft = evaluate("sft_continued", sft_dir / "checkpoints", data, cfg.out / "eval" / "sft_continued",
                   hf_config=cfg.warmstart, **scoring)
    summary = {
        "map_start": start["map"], "map_sft_continued": sft["map"], "map_grpo": grpo["map"],
        "reward_start": start["reward"], "reward_grpo": grpo["reward"], "reward_sft_continued": sft["reward"],
        "reward_official_start": start["reward_official"], "reward_official_grpo": grpo["reward_official"],
        "reward_official_sft_continued": sft["reward_official"],
        "reward_label_rule": scoring["reward"].rules().label_rule,
        "ap50_start": start["ap50"], "ap50_sft_continued": sft["ap50"], "ap50_grpo": grpo["ap50"],
        "ap75_start": start["ap75"], "ap75_sft_continued": sft["ap75"], "ap75_grpo": grpo["ap75"],
        # Matched-box IoU and label accuracy (eval/localization.py): what each stage changed besides AP.
        "localization_start": start["localization"], "localization_sft_continued": sft["localization"],
        "localization_grpo": grpo["localization"],
        "steps_grpo": _last_step(grpo_dir), "steps_sft_continued": _last_step(sft_dir),
        "train_s_grpo": round(grpo_s, 1), "train_s_sft_continued": round(training_seconds(sft_dir), 1),
        "budget_s": cfg.budget_s, "wall_s": round(time.time() - t0, 1),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
    }
    summary["checks"] = {"grpo_map_gain_ge_0.02": summary["map_grpo"] >= summary["map_start"] + 0.02,
                         "grpo_reward_up": summary["reward_grpo"] > summary["reward_start"],
                         "wall_le_1200s": summary["wall_s"] <= 1200,
                         "grpo_beats_continued_sft": summary["map_grpo"] > summary["map_sft_continued"]}
    (cfg.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_report(cfg.out, summary, grpo_dir, sft_dir)
    return summary


def _last_step(run_dir: Path) -> int:
    from megatron_vr1.training.metrics import read_metrics

    records = read_metrics(run_dir)
    return int(records[-1]["step"]) if records else 0


def summary_table(s: dict[str, Any]) -> str:
    rows = [("warm start (SFT)", "start", "-"), ("+ continued SFT", "sft_continued", s["steps_sft_continued"]),
            ("+ Vision-R1 GRPO", "grpo", s["steps_grpo"])]
    rule = s.get("reward_label_rule", "ignore")
    reward_col = "greedy reward" + (" (labels matched)" if rule == "match" else "")
    train_s = s.get("train_s_grpo")
    span = f"steps in {train_s:.0f} s" if train_s is not None else f"steps in {s['budget_s']:.0f} s"
    lines = [f"| model | AP | AP50 | AP75 | mean IoU | IoU >= 0.75 | label acc. | {reward_col} | official reward | "
             f"{span} |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, key, steps in rows:
        official = s.get(f"reward_official_{key}", s[f"reward_{key}"])
        loc = s.get(f"localization_{key}", {})
        cells = [f"{s[f'map_{key}']:.3f}", f"{s[f'ap50_{key}']:.3f}", _fmt(s.get(f"ap75_{key}")),
                 _fmt(loc.get("mean_iou")), _fmt(loc.get("iou_ge_75")), _fmt(loc.get("label_acc")),
                 f"{s[f'reward_{key}']:.3f}", f"{official:.3f}", str(steps)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def write_report(out: Path, summary: dict[str, Any], grpo_dir: Path, sft_dir: Path) -> None:
    """table.md, the runs' metric curves (``plot``) and a bar chart of AP / reward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_vr1.commands.plot import write_plots

    table = summary_table(summary)
    (out / "table.md").write_text(table + "\n")
    write_plots(grpo_dir, out / "plots" / "grpo")
    write_plots(sft_dir, out / "plots" / "sft_continued")
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    names = ["start", "cont. SFT", "GRPO"]
    for ax, (key, title) in zip(axes, (("map", "val AP (COCO)"), ("reward", "val greedy reward"))):
        vals = [summary[f"{key}_start"], summary[f"{key}_sft_continued"], summary[f"{key}_grpo"]]
        ax.bar(names, vals, color=["#999999", "#4c72b0", "#dd8452"])
        ax.set_title(title)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "plots" / "comparison.png", dpi=120)
    plt.close(fig)
    print("\n" + table + f"\n\nwall {summary['wall_s']:.0f} s; summary {out / 'summary.json'}; plots {out / 'plots'}",
          flush=True)
