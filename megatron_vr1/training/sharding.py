"""Data parallelism for the update: a step's TrainBatch split into one shard per data-parallel rank.

Rank 0 holds the step's rollouts. It cuts the batch into PPO mini-batches of whole groups, then gives each
data-parallel rank its part of every mini-batch: whole groups, round-robin, when a mini-batch has at least as many
groups as there are ranks, else its rows round-robin. A shard carries its rows and each of its groups' images
once; the TP / PP ranks of one data-parallel rank receive the same shard. Every rank then trains on exactly its
rows, and the loss denominators use the mini-batch's totals over all ranks, so the step's loss is the configured
aggregation over all its sequences whatever the split.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_vr1.training.batch import select_rows
from megatron_vr1.types import TrainBatch


@dataclass(slots=True)
class Shard:
    """One data-parallel rank's part of a step."""

    batch: TrainBatch
    """This rank's rows, mini-batch after mini-batch, each of their groups' images once."""
    minibatches: list[list[int]]
    """Row indices (into ``batch``) of each PPO mini-batch; the same number on every rank, none empty."""
    totals: list[tuple[int, float]]
    """Per mini-batch, over all data-parallel ranks: (sequences, loss tokens) (the loss denominators)."""


def group_order(batch: TrainBatch) -> list[list[int]]:
    """The batch's rows grouped by ``group_ids``, groups in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for r in range(batch.input_ids.shape[0]):
        groups.setdefault(int(batch.group_ids[r]), []).append(r)
    return list(groups.values())


def minibatch_rows(batch: TrainBatch, minibatches: int) -> list[list[int]]:
    """The rows of each PPO mini-batch: whole groups, as even as the number of groups allows (a dynamic-sampling
    batch may be short); never an empty mini-batch."""
    groups = group_order(batch)
    k = max(1, min(minibatches, len(groups)))
    bounds = [round(i * len(groups) / k) for i in range(k + 1)]
    return [[r for g in groups[bounds[i]:bounds[i + 1]] for r in g] for i in range(k)]


def shard_batch(batch: TrainBatch, data_parallel: int, minibatches: int = 1) -> list[Shard] | None:
    """One Shard per data-parallel rank (see the module docstring). Every rank must train on at least one
    sequence of every mini-batch: a short batch (rows dropped from the loss, a thin dynamic-sampling round) is cut
    into fewer mini-batches, and one with fewer sequences than ranks gives None (no update this step)."""
    split_rows = None
    for k in range(max(1, min(minibatches, len(group_order(batch)))), 0, -1):
        split_rows = minibatch_rows(batch, k)
        if all(len(rows) >= data_parallel for rows in split_rows):
            break
    else:
        return None
    parts: list[list[list[int]]] = [[] for _ in range(data_parallel)]  # rank -> mini-batch -> global rows
    totals = []
    for rows in split_rows:
        by_group: dict[int, list[int]] = {}
        for r in rows:
            by_group.setdefault(int(batch.group_ids[r]), []).append(r)
        groups = list(by_group.values())
        if len(groups) >= data_parallel:
            split = [[r for g in groups[d::data_parallel] for r in g] for d in range(data_parallel)]
        else:  # fewer groups than ranks: split the rows (a group's image then goes to each rank it reaches)
            split = [rows[d::data_parallel] for d in range(data_parallel)]
        for d in range(data_parallel):
            parts[d].append(split[d])
        totals.append((len(rows), float(sum(float(batch.loss_mask[r].sum()) for r in rows))))
    shards = []
    for d in range(data_parallel):
        flat = [r for mb in parts[d] for r in mb]
        local, start = [], 0
        for mb in parts[d]:
            local.append(list(range(start, start + len(mb))))
            start += len(mb)
        shards.append(Shard(batch=select_rows(batch, flat), minibatches=local, totals=list(totals)))
    return shards
