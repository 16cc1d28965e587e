"""Where this process sits in the job: torchrun or Slurm variables, the master address, free ports.

Pure standard library so that launch scripts and tests can use it without torch.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str
    """"torchrun", "slurm" or "single"."""


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm node list such as ``gpu[01-03,07],login5`` into host names (as ``scontrol show hostnames``)."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist):
        m = re.fullmatch(r"([^\[\]]*)\[([^\]]+)\](.*)", item)
        if not m:
            if item:
                hosts.append(item)
            continue
        prefix, ranges, suffix = m.groups()
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-", 1)
                width = len(lo)
                for i in range(int(lo), int(hi) + 1):
                    hosts.extend(expand_nodelist(f"{prefix}{i:0{width}d}{suffix}"))
            else:
                hosts.extend(expand_nodelist(f"{prefix}{part}{suffix}"))
    return hosts


def _split_top_level(text: str) -> list[str]:
    out, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur).strip())
    return [s for s in out if s]


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (bind to 0 and release). Never hard-code ports in tests."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def detect(environ: dict[str, str] | None = None, default_port: int = 29500) -> DistEnv:
    """Read rank / world size / local rank / master from torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or Slurm
    (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR = the first host of SLURM_JOB_NODELIST).
    Without either, a single process on this host."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]), local_rank=int(env.get("LOCAL_RANK", "0")),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=int(env.get("MASTER_PORT", default_port)),
            launcher="torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
        hosts = expand_nodelist(nodelist) if nodelist else []
        master = env.get("MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1")
        port = int(env.get("MASTER_PORT") or (20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return DistEnv(rank=int(env["SLURM_PROCID"]), world_size=int(env["SLURM_NTASKS"]),
                       local_rank=int(env.get("SLURM_LOCALID", "0")), master_addr=master, master_port=port,
                       launcher="slurm")
    # A world of one process only needs a port for its own store: take a free one. An inherited MASTER_PORT
    # (a parent process's, often still bound by it) would fail with EADDRINUSE.
    return DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=free_port(),
                   launcher="single")
