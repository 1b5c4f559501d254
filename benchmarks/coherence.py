"""Ghost coherence against a plain backward and against materialized per-example gradients.

    python -m benchmarks.coherence [--quick] [--threads 1]

Coherence statistics (m-coherence, per-class coherence, each example's alignment) from
the exact ``[B, B]`` Gram matrix of per-example gradients, computed from the activation
and output-gradient Grams (:func:`gradsift.coherence.gradient_gram` then
:func:`gradsift.coherence.gram_coherence`), timed interleaved with a plain mean-loss
forward + backward and with the materialized route (:func:`gradsift.per_example_gradients`
then :func:`gradsift.coherence.coherence`). Target (issue 15): the Gram route at most 2x
a plain backward.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from . import common as C
from . import models as M

CONFIGS = (("mlp", 128), ("mlp", 256), ("cnn", 128))
SHAPES = {"mlp": (64,), "cnn": (1, 28, 28)}


def _ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def methods(name: str, b: int) -> dict:
    import gradsift as gs
    from gradsift.coherence import coherence, gradient_gram, gram_coherence

    torch.manual_seed(0)
    model = getattr(M, name)()
    x = torch.randn(b, *SHAPES[name])
    y = torch.randint(0, 10, (b,))

    def plain():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    def ghost():
        return gram_coherence(gradient_gram(model, _ce, x, y), labels=y)

    def materialized():
        return coherence(gs.per_example_gradients(model, _ce, x, y))

    return {"plain backward": plain, "ghost coherence": ghost, "materialized": materialized}


def run(threads: int, s: C.Settings) -> C.Section:
    C.set_threads(threads)
    sec = C.Section()
    tab = C.Table(f"6. Gradient coherence ({threads} thread(s); median of up to {s.repeats}, interleaved)",
                  ["model", "B", "method", "ms", "x plain backward"], notes=[C.TIMED_FEW])
    for name, b in CONFIGS:
        b = s.b(b)
        fns = methods(name, b)
        t = C.compare(fns, s)
        for k in fns:
            tab.rows.append([name, b, C.method_cell(k, t[k], tab, f"{name} B={b}"), C.ms(t[k]),
                             C.ratio(t[k], t["plain backward"])])
        sec.targets.append(C.Target.of_ratio("15", f"ghost coherence {name} B={b}: Gram route / plain backward",
                                             t["ghost coherence"], t["plain backward"], "<=", 2, threads))
    sec.tables.append(tab)
    return sec


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    run(a.threads, C.Settings.make(a.quick)).print()


if __name__ == "__main__":
    main()
