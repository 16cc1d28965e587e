"""Local sweep of ``megatron-vr1 bench scaling``: this command relaunches itself under torchrun (gloo, CPU, one
thread per process) for each layout and scaling kind, one after the other, each run appending its row.

One thread per process makes a process the unit of compute, as a GPU is on a cluster: world 1 uses one core,
world 2 two. Worlds larger than the host's cores oversubscribe them and say nothing about scaling; the sweep
warns about it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

DEFAULT_LAYOUTS = "1:1:1,2:1:1,2:2:1,2:1:2"
"""world:tp:pp — one process; then two as DP2, TP2 and PP2."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SweepSpec:
    layouts: tuple[tuple[int, int, int], ...]
    modes: tuple[str, ...]
    recipe: str
    model: str
    global_batch: int
    """Strong scaling: sequences per step for every world size."""
    batch_per_proc: int
    """Weak scaling: sequences per step per process."""
    steps: int
    warmup: int
    csv: str
    work_dir: str
    overrides: tuple[str, ...] = ()
    rollout: str = "none"
    timeout_s: float = 900.0

    def __post_init__(self) -> None:
        if not self.layouts:
            raise ValueError("--layouts is empty: give world:tp:pp entries such as 1:1:1,2:2:1")
        for world, tp, pp in self.layouts:
            if min(world, tp, pp) < 1 or world % (tp * pp):
                raise ValueError(f"--layouts entry {world}:{tp}:{pp}: tp x pp = {tp * pp} must divide the world "
                                 f"size {world}; fix that entry")
        bad = [m for m in self.modes if m not in ("strong", "weak")]
        if bad or not self.modes:
            raise ValueError(f"--modes {','.join(self.modes)}: use strong, weak or strong,weak")


def parse_layouts(text: str) -> tuple[tuple[int, int, int], ...]:
    out = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        parts = item.split(":")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise ValueError(f"--layouts entry {item!r}: write world:tp:pp, e.g. 2:2:1 for two processes at TP=2")
        out.append(tuple(int(p) for p in parts))
    return tuple(out)


def child_env() -> dict[str, str]:
    """A clean single-host gloo world: no inherited rendezvous variables, no GPU, one thread per process."""
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "SLURM_PROCID", "SLURM_NTASKS", "SLURM_NNODES", "SLURM_JOB_NUM_NODES"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", GLOO_SOCKET_IFNAME="lo")
    return env


def command(spec: SweepSpec, world: int, tp: int, pp: int, mode: str, port: int) -> list[str]:
    batch = (["--global-batch", str(spec.global_batch)] if mode == "strong"
             else ["--batch-per-proc", str(spec.batch_per_proc)])
    sets = [a for s in spec.overrides for a in ("--set", s)]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--nnodes=1",
            "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "megatron_vr1.cli", "bench", "scaling",
            "--recipe", spec.recipe, "--model", spec.model, "--tp", str(tp), "--pp", str(pp),
            "--steps", str(spec.steps), "--warmup", str(spec.warmup), "--csv", spec.csv, "--work-dir", spec.work_dir,
            "--rollout", spec.rollout, *batch, *sets]


def run_sweep(spec: SweepSpec) -> int:
    """Run every (mode, layout); returns 0, or 1 after the first failing run (its output is printed)."""
    from megatron_vr1.parallel.env import free_port

    cores = os.cpu_count() or 1
    largest = max(w for w, _, _ in spec.layouts)
    print(f"bench scaling --local-sweep: CPU processes (gloo, 1 thread each) stand in for GPUs on a host with "
          f"{cores} cores, shared with whatever else runs here.")
    if largest > cores:
        print(f"WARNING: worlds of up to {largest} processes on {cores} cores: the processes beyond {cores} share "
              "cores, so those rows measure oversubscription, not scaling.")
    for mode in spec.modes:
        for world, tp, pp in spec.layouts:
            cmd = command(spec, world, tp, pp, mode, free_port())
            print(f"  {mode:6s} world={world} TP={tp} PP={pp} DP={world // (tp * pp)} ...", flush=True)
            proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=spec.timeout_s)
            if proc.returncode != 0:
                print(f"bench scaling: the run {mode} {world}:{tp}:{pp} failed ({proc.returncode}): {' '.join(cmd)}\n"
                      f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}", file=sys.stderr)
                return 1
    return 0
