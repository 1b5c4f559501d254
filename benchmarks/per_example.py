"""Sections 1 and 2: per-example gradients and per-example gradient norms.

    python -m benchmarks.per_example [--quick] [--threads 1]
    python -m benchmarks.per_example --peak ...  # (internal) one memory measurement

Per-example gradients (issue 14, target 1), MLP 64-512-512-10 and a small CNN at
B = 64 and 256:

* ``gradsift``: ``gs.per_example_gradients`` (``method="auto"``);
* ``floor`` (MLP): a plain forward/backward of the summed loss plus, per Linear layer, one
  ``bmm`` of output gradients x activations (and a copy of the bias gradients) into
  buffers allocated once and reused across calls: the cost of writing B x P floats that
  no per-example method can beat;
* ``torch.func``: ``vmap(grad(loss))`` over ``functional_call``;
* ``plain fwd+bwd``: forward and backward of the mean loss (the model's own cost).

Peak memory target: gradsift's peak-RSS growth at most one B x P float32 workspace plus
the plain forward/backward's growth. (ResNet-18-GN is measured in section 4.)

Per-example norms (target 2): ``gs.per_example_norms`` vs a plain backward of the mean
loss, every configuration (MLP and CNN at B = 64 and 256, ResNet-18-GN at B = 32).
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from . import common as C
from .models import build, call, n_params, select

warnings.filterwarnings("ignore")

GRAD_CONFIGS = [("mlp", 64), ("mlp", 256), ("cnn", 64), ("cnn", 256)]
NORM_CONFIGS = [("mlp", 64), ("mlp", 256), ("cnn", 64), ("cnn", 256), ("resnet18-gn", 32)]


class Floor:
    """Plain forward/backward + per-layer ``bmm(output grads, activations)`` into reused
    buffers (Linear layers only: the MLP floor of issue 14)."""

    def __init__(self, model: nn.Module, loss_fn, b: int) -> None:
        self.model, self.loss_fn = model, loss_fn
        self.linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if len(self.linears) != sum(1 for m in model.modules() if any(True for _ in m.parameters(recurse=False))):
            raise TypeError("the floor is defined for models whose only parameters are in Linear layers")
        self.w = {m: torch.empty(b, *m.weight.shape) for m in self.linears}
        self.b = {m: torch.empty(b, *m.bias.shape) for m in self.linears if m.bias is not None}
        self.acts: dict[nn.Module, torch.Tensor] = {}
        self.gouts: dict[nn.Module, torch.Tensor] = {}
        for m in self.linears:
            m.register_forward_hook(self._forward)

    def _forward(self, m: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        self.acts[m] = inp[0].detach()
        out.register_hook(lambda g, m=m: self.gouts.__setitem__(m, g))

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        self.model.zero_grad(set_to_none=True)
        self.loss_fn(self.model(x), y).sum().backward()
        for m in self.linears:
            g, a = self.gouts[m], self.acts[m]
            torch.bmm(g.unsqueeze(2), a.unsqueeze(1), out=self.w[m])
            if m in self.b:
                self.b[m].copy_(g)
        return self.w


def make_vmap(model: nn.Module, loss_fn):
    """torch.func ``vmap(grad)`` per-example gradients (tensor or dict inputs)."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b for n, b in model.named_buffers()}

    def loss(p, xi, yi):
        xb = {k: v.unsqueeze(0) for k, v in xi.items()} if isinstance(xi, dict) else xi.unsqueeze(0)
        kwargs = xb if isinstance(xb, dict) else None
        args = () if kwargs is not None else (xb,)
        out = functional_call(model, {**p, **buffers}, args, kwargs)
        return loss_fn(out, yi.unsqueeze(0)).sum()

    mapped = vmap(grad(loss), in_dims=(None, 0, 0), randomness="different")
    return lambda x, y: mapped(params, x, y)


def plain_backward(model: nn.Module, loss_fn):
    def run(x, y):
        model.zero_grad(set_to_none=True)
        loss_fn(call(model, x), y).mean().backward()

    return run


def grad_methods(name: str, b: int) -> tuple[dict[str, Any], Any, torch.Tensor, int]:
    model, x, y, loss_fn = build(name, b)
    m = [copy.deepcopy(model) for _ in range(4)]
    methods = {
        "gradsift": lambda x, y: C.per_example_grads(m[0], loss_fn, x, y),
        "torch.func": make_vmap(m[1], loss_fn),
        "plain fwd+bwd": plain_backward(m[2], loss_fn),
    }
    if name == "mlp":
        methods["floor"] = Floor(m[3], loss_fn, b)
    return methods, x, y, n_params(model)


def norm_methods(name: str, b: int) -> tuple[dict[str, Any], Any, torch.Tensor]:
    model, x, y, loss_fn = build(name, b)
    m = [copy.deepcopy(model) for _ in range(2)]
    return {
        "gradsift norms": lambda x, y: C.per_example_norms(m[0], loss_fn, x, y),
        "plain backward": plain_backward(m[1], loss_fn),
    }, x, y


def peak_main(kind: str, name: str, b: str, method: str) -> None:
    C.set_threads()
    b_ = int(b)
    methods, x, y = (grad_methods(name, b_)[:3] if kind == "grads" else norm_methods(name, b_))
    fn = methods[method]
    if method == "floor":  # its buffers are sized for the full batch
        C.measure_peak(lambda: fn(x, y), lambda: fn(x, y))
    else:
        C.measure_peak(lambda: fn(select(x, slice(0, 2)), y[:2]), lambda: fn(x, y))


def run_grads(threads: int, s: C.Settings) -> C.Section:
    C.set_threads(threads)
    sec = C.Section()
    tab = C.Table(
        f"1. Per-example gradients ({threads} thread(s); median of up to {s.repeats}, interleaved; "
        "peak = peak-RSS growth MB, 1-thread pass)",
        ["model", "B", "P", "method", "ms", "x floor", "torch.func / this", "peak MB"],
        notes=[C.TIMED_FEW, "floor = plain fwd/bwd + per-layer bmm into reused buffers (MLP only)"],
    )
    for name, b in GRAD_CONFIGS:
        b = s.b(b)
        methods, x, y, p = grad_methods(name, b)
        order = ["plain fwd+bwd"] + (["floor"] if "floor" in methods else []) + ["gradsift", "torch.func"]
        t = C.compare({k: (lambda f=methods[k]: f(x, y)) for k in order}, s)
        peaks = {}
        if s.peaks and threads == 1 and name == "mlp":
            for k in ("plain fwd+bwd", "gradsift"):
                peaks[k] = C.peak_rss_mb("benchmarks.per_example", "grads", name, str(b), k)
        for k in order:
            tab.rows.append([name, b, p, C.method_cell(k, t[k], tab, f"{name} B={b}"), C.ms(t[k]),
                             C.ratio(t[k], t["floor"]) if "floor" in t else float("nan"),
                             C.ratio(t["torch.func"], t[k]), peaks.get(k, float("nan"))])
        g, tf = t["gradsift"], t["torch.func"]
        if name == "mlp":
            sec.targets.append(C.Target.of_ratio("14", f"per-example grads MLP B={b}: gradsift / floor", g, t["floor"],
                                                 "<=", 1.3, threads))
            sec.targets.append(C.Target.of_ratio("14", f"per-example grads MLP B={b}: torch.func / gradsift", tf, g,
                                                 ">=", 3, threads))
            if peaks:
                budget = b * p * 4 / 2**20 + peaks["plain fwd+bwd"]
                sec.targets.append(C.Target("14", f"per-example grads MLP B={b}: peak MB / (one BxP workspace + plain fwd/bwd)",
                                            peaks["gradsift"] / budget, "<=", 1.0, threads,
                                            f"{peaks['gradsift']:.0f} MB vs {budget:.0f} MB"))
        else:
            sec.targets.append(C.Target.of_ratio("14", f"per-example grads {name.upper()} B={b}: torch.func / gradsift",
                                                 tf, g, ">=", 2, threads))
    sec.tables.append(tab)
    return sec


def run_norms(threads: int, s: C.Settings) -> C.Section:
    C.set_threads(threads)
    sec = C.Section()
    tab = C.Table(f"2. Per-example gradient norms ({threads} thread(s); median of up to {s.repeats}, interleaved)",
                  ["model", "B", "method", "ms", "x plain backward"], notes=[C.TIMED_FEW])
    for name, b in NORM_CONFIGS:
        b = s.b(b)
        methods, x, y = norm_methods(name, b)
        t = C.compare({k: (lambda f=f: f(x, y)) for k, f in methods.items()}, s)
        for k in methods:
            tab.rows.append([name, b, C.method_cell(k, t[k], tab, f"{name} B={b}"), C.ms(t[k]), C.ratio(t[k], t["plain backward"])])
        sec.targets.append(C.Target.of_ratio("14", f"per-example norms {name} B={b}: gradsift / plain backward",
                                             t["gradsift norms"], t["plain backward"], "<=", 1.5, threads))
    sec.tables.append(tab)
    return sec


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    s = C.Settings.make(a.quick)
    for sec in (run_grads(a.threads, s), run_norms(a.threads, s)):
        sec.print()
        print()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--peak":
        peak_main(*sys.argv[2:])
    else:
        main()
