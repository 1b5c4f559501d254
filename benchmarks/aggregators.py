"""Benchmark 3: one training step with each aggregator vs a plain optimizer step.

    python -m benchmarks.aggregators

MLP 64->512->512->10, B = 128, SGD. "fused" is :func:`gradsift.aggregate.aggregated_gradient`
(layer by layer; mean and clip>mean never form per-example gradients); "unfused" forms all
per-example gradients (hooks), then calls ``aggregator.update``. Ratios are against the
plain step (``loss.mean().backward(); opt.step()``) and against the unfused mean step.
"""

from __future__ import annotations

import torch

from gradsift import aggregate as A
from gradsift.aggregate import aggregated_gradient
from gradsift.engine import per_example

from .common import CE, batch, median_time, mlp, set_threads, table

AGGREGATORS = {
    "mean": lambda: A.mean(),
    "winsorize c=1": lambda: A.winsorize(1),
    "winsorize c=2": lambda: A.winsorize(2),
    "m3": lambda: A.m3(),
    "trimmed_mean 0.1": lambda: A.trimmed_mean(0.1),
    "clip 1.0 > mean": lambda: A.chain(A.clip(1.0), A.mean()),
}


def run(b: int = 128, repeats: int = 7) -> str:
    threads = set_threads()
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = batch("mlp", b)

    def plain():
        opt.zero_grad(set_to_none=True)
        CE(model(x), y).mean().backward()
        opt.step()

    def step(agg, fuse):
        state = agg.init({})

        def go():
            if fuse:
                update = aggregated_gradient(model, CE, x, y, agg, state).update
            else:
                grads = per_example(model, CE, x, y, method="hooks").grads
                update, _ = agg.update(grads, state)
            A.write_grads(model, update)
            opt.step()

        return go

    t_plain = median_time(plain, repeats)
    times = {}
    for name, make in AGGREGATORS.items():
        for fuse in (True, False):
            times[name, fuse] = median_time(step(make(), fuse), repeats)
    t_mean = times["mean", False]
    rows = [["plain step", "-", t_plain * 1e3, 1.0, t_plain / t_mean]]
    for (name, fuse), t in times.items():
        rows.append([name, "fused" if fuse else "unfused", t * 1e3, t / t_plain, t / t_mean])
    title = (
        f"Training step, MLP 300k params, B={b} (median of {repeats}, {threads} thread(s))"
    )
    return table(title, ["aggregator", "path", "ms", "x plain step", "x unfused mean step"], rows)


if __name__ == "__main__":
    print(run())
