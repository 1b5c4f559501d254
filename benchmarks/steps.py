"""Section 3: one training step with each aggregator, as a multiple of a plain step.

    python -m benchmarks.steps [--quick] [--threads 1]
    python -m benchmarks.steps --peak ...  # (internal) one memory measurement

MLP 64-512-512-10, SGD, B = 128 and 256. The plain step is ``zero_grad; loss.mean().
backward(); opt.step()``. Every aggregator step goes through the library's step entry
point (see :func:`benchmarks.common.step_update`), then ``write_grads`` and ``opt.step()``.

Targets (issue 14): DP-SGD / clip + mean step at most 1.3x a plain step and peak memory at
most 1.2x a plain step's; m3 at most 2x; winsorize c = 1..3 at most 10x; trimmed mean and
coordinate median at most 25x. The DP step is measured twice: ``clip 1 > mean`` (the
clipped mean the issue names) and the library's full ``dp_sgd`` aggregator (check, clip,
normalized sum, Gaussian noise). Opacus's ghost-clipping DP step is a comparison row.

Peak memory of a step = the model's parameters and gradients (2 x P float32) + the step's
peak-RSS growth (fresh subprocess, after a warm-up step, gradients freed before).
"""

from __future__ import annotations

import argparse
import copy
import sys
from typing import Callable

import torch

from . import common as C
from .models import build, n_params

BATCHES = (128, 256)


def aggregators(b: int) -> dict[str, Callable[[], object]]:
    import gradsift.aggregate as A

    return {
        "fused mean": lambda: A.mean(),
        "clip 1 > mean": lambda: A.chain(A.clip(1.0), A.mean()),
        "dp_sgd (C=1, sigma=1)": lambda: C.dp_aggregator(1.0, 1.0, float(b)),
        "m3": lambda: A.m3(),
        "winsorize c=1": lambda: A.winsorize(1),
        "winsorize c=2": lambda: A.winsorize(2),
        "winsorize c=3": lambda: A.winsorize(3),
        "trimmed_mean 0.1": lambda: A.trimmed_mean(0.1),
        "coordinate_median": lambda: A.coordinate_median(),
    }


#: Row timing only the noise of a DP step (the part of ``dp_sgd`` no book-keeping removes).
NOISE_ROW = "noise only: P Gaussian draws"

QUICK_SKIP = ()  # every aggregator runs in quick mode too (slow ones are timed once)


def methods(b: int, names: list[str] | None = None, paths: dict[str, str] | None = None
            ) -> tuple[dict[str, Callable[[], None]], object]:
    """Step closures by name (``paths`` receives the library path each aggregator took)."""
    model, x, y, loss_fn = build("mlp", b)
    out: dict[str, Callable[[], None]] = {}
    paths = {} if paths is None else paths

    def plain_step(m=copy.deepcopy(model)):
        opt = torch.optim.SGD(m.parameters(), lr=0.01)

        def go():
            opt.zero_grad(set_to_none=True)
            loss_fn(m(x), y).mean().backward()
            opt.step()

        return go

    out["plain step"] = plain_step()
    for name, make in aggregators(b).items():
        if names is not None and name not in names:
            continue

        def agg_step(make=make, m=copy.deepcopy(model), name=name):
            opt = torch.optim.SGD(m.parameters(), lr=0.01)
            agg = make()
            state = [C.init_state(m, agg)]

            def go():
                opt.zero_grad(set_to_none=True)
                update, state[0], paths[name] = C.step_update(m, loss_fn, x, y, agg, state[0])
                C.write_grads(m, update)
                opt.step()

            return go

        out[name] = agg_step()
    if names is None:
        # what DP-SGD's noise alone costs: P Gaussian draws from torch's CPU generator
        # (mt19937 + Box-Muller, single-threaded), as gaussian_noise draws them
        shapes = [p.shape for p in model.parameters()]
        gen = torch.Generator().manual_seed(0)
        out[NOISE_ROW] = lambda: [torch.randn(s, generator=gen) for s in shapes]
    if names is None or "opacus ghost DP" in names:
        from .real_models import lazy, opacus_ghost_step

        ghost = lazy(lambda m=copy.deepcopy(model): opacus_ghost_step(m, b))
        out["opacus ghost DP"] = lambda: ghost(x, y)
    return out, model


def peak_main(b: str, method: str) -> None:
    C.set_threads()
    fns, _ = methods(int(b), [method])
    fn = fns[method]
    C.measure_peak(fn, fn)


def run(threads: int, s: C.Settings) -> C.Section:
    C.set_threads(threads)
    sec = C.Section()
    tab = C.Table(
        f"3. Training step, MLP 64-512-512-10 (P=301k), SGD ({threads} thread(s); median of up to {s.repeats}, "
        f"interleaved; step entry point: {C.step_entry_name()})",
        ["B", "step", "path", "ms", "x plain step", "peak MB", "x plain peak"],
        notes=[C.TIMED_FEW, "peak MB = 2 x P float32 (params + grads) + the step's peak-RSS growth; 1-thread pass"],
    )
    for b in map(s.b, BATCHES):
        paths: dict[str, str] = {}
        fns, model = methods(b, paths=paths)
        t = C.compare(fns, s)
        peaks = {}
        if s.peaks and threads == 1:
            own = 2 * n_params(model) * 4 / 2**20
            for k in ("plain step", "clip 1 > mean", "dp_sgd (C=1, sigma=1)"):
                peaks[k] = own + C.peak_rss_mb("benchmarks.steps", str(b), k)
        plain = t["plain step"]
        for k in fns:
            pk = peaks.get(k, float("nan"))
            tab.rows.append([b, C.method_cell(k, t[k], tab, f"B={b}"), paths.get(k, "-"), C.ms(t[k]), C.ratio(t[k], plain), pk,
                             pk / peaks["plain step"] if peaks else float("nan")])

        def tgt(k: str, thr: float) -> None:
            sec.targets.append(C.Target.of_ratio("14", f"step B={b}: {k} / plain step", t[k], plain, "<=", thr, threads))

        tgt("clip 1 > mean", 1.3)
        tgt("dp_sgd (C=1, sigma=1)", 1.3)
        if peaks:
            for k in ("clip 1 > mean", "dp_sgd (C=1, sigma=1)"):
                sec.targets.append(C.Target("14", f"step B={b}: {k} peak memory / plain step's", peaks[k] / peaks["plain step"],
                                            "<=", 1.2, threads, f"{peaks[k]:.1f} vs {peaks['plain step']:.1f} MB"))
        tgt("m3", 2)
        for c in (1, 2, 3):
            tgt(f"winsorize c={c}", 10)
        tgt("trimmed_mean 0.1", 25)
        tgt("coordinate_median", 25)
    sec.tables.append(tab)
    return sec


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    sec = run(a.threads, C.Settings.make(a.quick))
    sec.print()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--peak":
        peak_main(*sys.argv[2:])
    else:
        main()
