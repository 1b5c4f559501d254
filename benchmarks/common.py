"""Timing, memory, table and target helpers shared by the benchmarks (not part of the test run).

Times are medians over repeats, measured in one process with the compared methods
*interleaved* (one call of each method per round), so every ratio compares runs taken side
by side under the same machine load. Peak memory is the growth of the peak resident set
size during one call in a fresh subprocess, after a 2-example warm-up of the same code
path: the high-water mark (``VmHWM``) is reset through ``/proc/self/clear_refs`` just
before the call. torch's CPU allocations are invisible to ``tracemalloc``; large tensors
are ``mmap``-ed, so the peak RSS tracks the peak of live tensors.

The library's entry points that the benchmarks call go through the small adapters at the
end of this file (:func:`step_update`, :func:`per_example_grads`, :func:`per_example_norms`),
so a renamed or moved entry point is switched in one place.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

CE = nn.CrossEntropyLoss(reduction="none")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- settings

@dataclass
class Settings:
    """How hard to measure. ``quick`` keeps the whole suite to a few minutes on 2 cores."""

    quick: bool = False
    repeats: int = 7          # timed calls per method (after one warm-up call)
    budget_s: float = 20.0    # a method whose warm-up call takes longer is timed only repeats // 3 times
    skip_s: float = float("inf")  # ... and one whose warm-up takes longer than this is not timed again
    peaks: bool = True        # measure peak memory (subprocesses; 1-thread pass only)
    smoke: bool = False       # batch sizes cut to 4, one call each: checks that everything runs

    @classmethod
    def make(cls, quick: bool, smoke: bool = False) -> "Settings":
        if smoke:
            return cls(quick=True, repeats=1, budget_s=0.0, peaks=False, smoke=True)
        return cls(quick=True, repeats=3, budget_s=2.0) if quick else cls()

    def b(self, b: int) -> int:
        """The batch size to run for a configured ``b`` (4 in smoke mode)."""
        return min(b, 4) if self.smoke else b


def set_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads to ``n`` (default: ``GRADSIFT_BENCH_THREADS``, else 1)."""
    n = int(os.environ.get("GRADSIFT_BENCH_THREADS", "1")) if n is None else n
    torch.set_num_threads(n)
    return n


# ---------------------------------------------------------------- timing

def median_time(fn: Callable[[], object], repeats: int = 7, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass
class Timing:
    """Median seconds of one method (``nan`` and ``error`` set if it raised)."""

    seconds: float
    n: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and math.isfinite(self.seconds)


def _short_error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg[:90]}"


def compare(fns: dict[str, Callable[[], object]], settings: Settings, repeats: int | None = None) -> dict[str, Timing]:
    """Time every method, interleaved: a warm-up round, then ``repeats`` rounds of one call
    each. A method that raises is recorded with its error and dropped; a method whose
    warm-up took longer than ``settings.budget_s`` gets ``max(1, repeats // 3)`` timed calls,
    and one whose warm-up took longer than ``settings.skip_s`` is reported by its warm-up
    call alone (``n = 0``)."""
    repeats = settings.repeats if repeats is None else repeats
    times: dict[str, list[float]] = {k: [] for k in fns}
    errors: dict[str, str] = {}
    want: dict[str, int] = {}
    warmups: dict[str, float] = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a failing method is a result row
            errors[name] = _short_error(e)
            continue
        warm = warmups[name] = time.perf_counter() - start
        want[name] = repeats if warm <= settings.budget_s else max(1, repeats // 3) if warm <= settings.skip_s else 0
    for r in range(max(want.values(), default=0)):
        for name, fn in fns.items():
            if name in errors or r >= want[name]:
                continue
            start = time.perf_counter()
            try:
                fn()
            except Exception as e:  # noqa: BLE001
                errors[name] = _short_error(e)
                continue
            times[name].append(time.perf_counter() - start)
    out = {}
    for name in fns:
        if name in errors:
            out[name] = Timing(float("nan"), 0, errors[name])
        elif not times[name]:
            out[name] = Timing(warmups[name], 0)
        else:
            out[name] = Timing(statistics.median(times[name]), len(times[name]))
    return out


# ---------------------------------------------------------------- peak memory

def _status_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def measure_peak(fn_small: Callable[[], object], fn: Callable[[], object]) -> None:
    """In a subprocess: warm up, reset the RSS high-water mark, run ``fn()``, and print
    the growth of the peak RSS over the RSS before the call, as JSON (Linux only)."""
    fn_small()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _status_kb("VmRSS")
    fn()
    print(json.dumps({"peak_mb": (_status_kb("VmHWM") - before) / 1024}))


def peak_rss_mb(module: str, *args: str, threads: int = 1) -> float:
    """Run ``python -m <module> --peak <args>`` and read the MB it prints last (``nan`` if
    the subprocess failed)."""
    env = dict(os.environ, GRADSIFT_BENCH_THREADS=str(threads))
    # glibc serves blocks of 64 KiB and more by mmap and returns them at free: the RSS
    # high-water mark then measures live tensor memory, not what the heap kept from warm-up
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    out = subprocess.run([sys.executable, "-m", module, "--peak", *args], capture_output=True,
                         text=True, cwd=ROOT, env=env)
    try:
        return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"])
    except (IndexError, ValueError, KeyError):
        return float("nan")


# ---------------------------------------------------------------- tables and targets

def _cell(c: object) -> str:
    if isinstance(c, float):
        if math.isnan(c):
            return "-"
        return f"{c:.3g}" if abs(c) < 100 else f"{c:.0f}"
    return str(c)


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[object]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: str | None = None  # preformatted text (older scripts), shown as it is

    def render(self) -> str:
        if self.raw is not None:
            return self.raw
        cells = [self.header] + [[_cell(c) for c in r] for r in self.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.header))]
        lines = [self.title, "  ".join(h.ljust(w) for h, w in zip(self.header, widths)).rstrip()]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells[1:]]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_json(self) -> dict:
        if self.raw is not None:
            return {"raw": self.raw}
        return {"title": self.title, "header": self.header, "notes": self.notes,
                "rows": [[(None if isinstance(c, float) and math.isnan(c) else c) for c in r] for r in self.rows]}


def table(title: str, header: list[str], rows: list[list[object]]) -> str:
    """A plain-text table (kept for the older benchmark scripts)."""
    return Table(title, header, rows).render()


@dataclass
class Target:
    """One target line: ``value op threshold`` -> MET / MISSED (or FAILED when not measured)."""

    issue: str
    name: str
    value: float
    op: str        # "<=" or ">="
    threshold: float
    threads: int | None = None
    detail: str = ""

    @property
    def status(self) -> str:
        if self.value is None or not math.isfinite(self.value):
            return "FAILED"
        ok = self.value <= self.threshold if self.op == "<=" else self.value >= self.threshold
        return "MET" if ok else "MISSED"

    @classmethod
    def of_ratio(cls, issue: str, name: str, top: "Timing", bottom: "Timing", op: str, threshold: float,
                 threads: int | None, *, digits: int = 1, note: str = "") -> "Target":
        """The target ``top / bottom  op  threshold``, with both times in its detail."""
        return cls(issue, name, ratio(top, bottom), op, threshold, threads,
                   f"{ms(top):.{digits}f} vs {ms(bottom):.{digits}f} ms{note}")

    def render(self) -> str:
        thr = f"{self.threads} thr" if self.threads else "-"
        val = "n/a" if self.value is None or not math.isfinite(self.value) else f"{self.value:.3g}"
        d = f"  ({self.detail})" if self.detail else ""
        return f"[{self.status:6}] #{self.issue} {self.name} [{thr}]: {val} {self.op} {self.threshold:g}{d}"

    def to_json(self) -> dict:
        v = self.value if self.value is not None and math.isfinite(self.value) else None
        return {"issue": self.issue, "name": self.name, "value": v, "op": self.op, "threshold": self.threshold,
                "threads": self.threads, "detail": self.detail, "status": self.status}


@dataclass
class Section:
    """What one benchmark section returns."""

    tables: list[Table] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)

    def print(self) -> None:
        """Print every table, then every target line."""
        for t in self.tables:
            print(t.render(), end="\n\n", flush=True)
        for t in self.targets:
            print(t.render(), flush=True)


def ms(t: Timing) -> float:
    return t.seconds * 1e3


def ratio(a: Timing, b: Timing) -> float:
    """``a / b`` (``nan`` if either failed)."""
    return a.seconds / b.seconds if a.ok and b.ok else float("nan")


def method_cell(name: str, t: Timing, tab: "Table | None" = None, where: str = "") -> str:
    """The method's name, marked ``FAILED (n)`` if it raised (its error goes to ``tab``'s
    notes as ``(n)``) or ``*`` if it was timed once or twice."""
    if t.error:
        if tab is None:
            return f"{name}  FAILED: {t.error}"
        tab.notes.append(f"({len(tab.notes) + 1}) {where + ' ' if where else ''}{name}: {t.error}")
        return f"{name} FAILED ({len(tab.notes)})"
    return name + (" **" if t.n == 0 else " *" if t.n < 3 else "")


TIMED_FEW = ("* = timed 1-2 times only (its warm-up call exceeded the time budget); "
             "** = its warm-up call alone (first call, allocations included)")


# ---------------------------------------------------------------- library adapters

def step_entry_name() -> str:
    """Which library step entry point :func:`step_update` calls."""
    import gradsift.aggregate as agg

    if hasattr(agg, "step_update"):
        return "gradsift.aggregate.step_update"
    return "gradsift.engine.aggregated_gradient"


def step_update(model: nn.Module, loss_fn, inputs: Any, targets: torch.Tensor, aggregator, state) -> tuple[dict, Any, str]:
    """One aggregated update through the library's step entry point -> ``(update, state, path)``.

    ``gs.aggregate.step_update`` where it exists (issue 11's single step entry point), else
    ``gs.engine.aggregated_gradient`` (the fused layer-by-layer path of round 1). ``path``
    says which path ran: ``plain``, ``layerwise`` (``fused``) or ``materialized``."""
    import gradsift.aggregate as agg

    if hasattr(agg, "step_update"):
        r = agg.step_update(model, loss_fn, inputs, targets, aggregator, state)
        return r.update, r.state, getattr(r, "path", "?")
    from gradsift.engine import aggregated_gradient

    r = aggregated_gradient(model, loss_fn, inputs, targets, aggregator, state)
    return r.update, r.state, "layerwise" if r.fused else "materialized"


def init_state(model: nn.Module, aggregator) -> Any:
    return aggregator.init({n: p.detach() for n, p in model.named_parameters() if p.requires_grad})


def write_grads(model: nn.Module, update: dict) -> None:
    import gradsift.aggregate as agg

    agg.write_grads(model, update)


def per_example_grads(model: nn.Module, loss_fn, inputs: Any, targets: torch.Tensor) -> dict:
    """``gs.per_example_gradients`` with ``method="auto"`` (a dict of inputs is passed as it is)."""
    import gradsift as gs

    return gs.per_example_gradients(model, loss_fn, inputs, targets)


def per_example_norms(model: nn.Module, loss_fn, inputs: Any, targets: torch.Tensor) -> torch.Tensor:
    import gradsift as gs

    return gs.per_example_norms(model, loss_fn, inputs, targets)


def dp_aggregator(max_norm: float, noise_multiplier: float, expected_batch_size: float):
    """The library's DP-SGD aggregator (check, clip, normalized sum, Gaussian noise)."""
    import gradsift as gs

    dp = getattr(gs.aggregate, "dp_sgd", None) or gs.privacy.dp_sgd
    return dp(max_norm, noise_multiplier, expected_batch_size, seed=0)


# ---------------------------------------------------------------- kept for older scripts

def mlp() -> nn.Module:
    from .models import mlp as _mlp

    return _mlp()


def cnn() -> nn.Module:
    from .models import cnn as _cnn

    return _cnn()


MODELS = {"mlp": (mlp, (64,)), "cnn": (cnn, (1, 28, 28))}


def batch(model_name: str, b: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = MODELS[model_name][1]
    return torch.randn(b, *shape, generator=g), torch.randint(0, 10, (b,), generator=g)
