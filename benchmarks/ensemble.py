"""Benchmark 4: 32 small models trained as one vmapped ensemble vs one after another.

    python -m benchmarks.ensemble

Each member: MLP 40 -> 64 -> 10 trained with SGD on its own random half of 1,024
synthetic examples, batch 32, 2 epochs (32 steps per member). Throughput ratio =
sequential time / vmapped time for the same schedule.
"""

from __future__ import annotations

import torch
from torch import nn

from gradsift.ensemble import subset_masks, train_ensemble

from .common import CE, median_time, set_threads, table


def small() -> nn.Module:
    return nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 10))


def run(members: int = 32, repeats: int = 3) -> str:
    threads = set_threads()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 40, generator=g)
    y = torch.randint(0, 10, (1024,), generator=g)
    masks = subset_masks(1024, members, 0.5, seed=0)
    kw = dict(epochs=2, lr=0.1, batch_size=32)
    t = {
        m: median_time(lambda m=m: train_ensemble(small, CE, x, y, masks, method=m, **kw), repeats)
        for m in ("vmap", "sequential")
    }
    rows = [[m, members, t[m], t["sequential"] / t[m]] for m in t]
    title = f"Ensemble of {members} small MLPs, 2 epochs (median of {repeats}, {threads} thread(s))"
    return table(title, ["method", "models", "seconds", "x sequential throughput"], rows)


if __name__ == "__main__":
    print(run())
