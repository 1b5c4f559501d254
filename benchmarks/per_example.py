"""Benchmarks 1 and 2: per-example gradients and per-example gradient norms.

    python -m benchmarks.per_example            # both tables
    python -m benchmarks.per_example --peak ...  # (internal) one memory measurement

Per-example gradients: gradsift (hooks) vs Opacus GradSampleModule vs torch.func
``vmap(grad)`` vs a loop of single-example backward passes; MLP and CNN; B = 64, 256.
Norms: gradsift ghost norms vs Opacus (grad samples, then norms) vs a plain backward pass
of the mean loss (the floor).
"""

from __future__ import annotations

import copy
import sys
import warnings

import torch
from torch.func import functional_call, grad, vmap

from gradsift.engine import per_example, per_example_norms

from .common import CE, MODELS, batch, measure_peak, median_time, peak_rss_mb, set_threads, table

warnings.filterwarnings("ignore")


def gradsift_grads(model, x, y):
    return per_example(model, CE, x, y, method="hooks").grads


def make_vmap(model):
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, xi, yi):
        return CE(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0)).sum()

    mapped = vmap(grad(loss), in_dims=(None, 0, 0))
    return lambda x, y: mapped(params, x, y)


def make_opacus(model):
    from opacus import GradSampleModule

    gsm = GradSampleModule(model, loss_reduction="sum")

    def run(x, y):
        for p in gsm.parameters():
            p.grad_sample = None
            p.grad = None
        CE(gsm(x), y).sum().backward()
        return {n: p.grad_sample for n, p in gsm.named_parameters()}

    return run


def loop_grads(model, x, y):
    params = list(model.parameters())
    out = []
    for i in range(len(x)):
        g = torch.autograd.grad(CE(model(x[i : i + 1]), y[i : i + 1]).sum(), params)
        out.append(g)
    return [torch.stack(gs) for gs in zip(*out)]


def grad_methods(model):
    """Each method gets its own copy (Opacus adds hooks to the module it wraps)."""
    m = [copy.deepcopy(model) for _ in range(4)]
    return {
        "gradsift": lambda x, y: gradsift_grads(m[0], x, y),
        "opacus": make_opacus(m[1]),
        "torch.func": make_vmap(m[2]),
        "loop": lambda x, y: loop_grads(m[3], x, y),
    }


def norm_methods(model):
    ghost, model = copy.deepcopy(model), copy.deepcopy(model)
    opacus = make_opacus(copy.deepcopy(model))

    def opacus_norms(x, y):
        g = opacus(x, y)
        return torch.stack([v.flatten(1).square().sum(1) for v in g.values()]).sum(0).sqrt()

    def plain(x, y):
        model.zero_grad(set_to_none=True)
        CE(model(x), y).mean().backward()

    return {
        "gradsift ghost": lambda x, y: per_example_norms(ghost, CE, x, y, method="hooks"),
        "opacus": opacus_norms,
        "plain backward": plain,
    }


def peak_main(kind: str, model_name: str, b: str, method: str) -> None:
    set_threads()
    torch.manual_seed(0)
    model = MODELS[model_name][0]()
    fn = (grad_methods if kind == "grads" else norm_methods)(model)[method]
    x, y = batch(model_name, int(b))
    measure_peak(lambda: fn(x[:2], y[:2]), lambda: fn(x, y))


def run(kind: str, repeats: int = 7) -> str:
    threads = set_threads()
    rows = []
    for model_name in ("mlp", "cnn"):
        for b in (64, 256):
            torch.manual_seed(0)
            model = MODELS[model_name][0]()
            x, y = batch(model_name, b)
            methods = (grad_methods if kind == "grads" else norm_methods)(model)
            times = {m: median_time(lambda f=f: f(x, y), repeats=3 if m == "loop" else repeats) for m, f in methods.items()}
            peaks = {m: peak_rss_mb("benchmarks.per_example", kind, model_name, str(b), m) for m in methods}
            base = times["gradsift" if kind == "grads" else "gradsift ghost"]
            for m in methods:
                rows.append([model_name, b, m, times[m] * 1e3, times[m] / base, peaks[m]])
    title = (
        f"Per-example {'gradients' if kind == 'grads' else 'gradient norms'} "
        f"(median of {repeats} runs, {threads} thread(s); ratio = time / gradsift time; "
        "peak = peak-RSS growth in MB)"
    )
    return table(title, ["model", "B", "method", "ms", "x gradsift", "peak MB"], rows)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--peak":
        peak_main(*sys.argv[2:])
    else:
        print(run("grads"))
        print()
        print(run("norms"))
