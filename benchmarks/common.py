"""Timing and memory helpers shared by the benchmarks (not part of the test run).

Times are medians over repeats, measured in one process so that every ratio compares runs
taken side by side. Peak memory is the growth of the peak resident set size during one
call in a fresh subprocess, after a 2-example warm-up of the same code path: the
high-water mark (``VmHWM``) is reset through ``/proc/self/clear_refs`` just before the
call. torch's CPU allocations are invisible to ``tracemalloc``; large tensors are
``mmap``-ed, so the peak RSS tracks the peak of live tensors.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
from torch import nn

CE = nn.CrossEntropyLoss(reduction="none")


def set_threads() -> int:
    """Threads from ``GRADSIFT_BENCH_THREADS`` (default 1: the cores are shared)."""
    n = int(os.environ.get("GRADSIFT_BENCH_THREADS", "1"))
    torch.set_num_threads(n)
    return n


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


def mlp() -> nn.Module:
    """64 -> 512 -> 512 -> 10 (300k parameters)."""
    return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def cnn() -> nn.Module:
    """Small CNN for 1x28x28 inputs (20k parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
    )


MODELS = {"mlp": (mlp, (64,)), "cnn": (cnn, (1, 28, 28))}


def batch(model_name: str, b: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = MODELS[model_name][1]
    return torch.randn(b, *shape, generator=g), torch.randint(0, 10, (b,), generator=g)


def peak_rss_mb(module: str, *args: str) -> float:
    """Run ``python -m <module> --peak <args>`` and read the MB it prints last."""
    out = subprocess.run(
        [sys.executable, "-m", module, "--peak", *args], capture_output=True, text=True,
        check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"])


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_peak(fn_small: Callable[[], object], fn: Callable[[], object]) -> None:
    """In a subprocess: warm up, reset the RSS high-water mark, run ``fn()``, and print
    the growth of the peak RSS over the RSS before the call, as JSON (Linux only)."""
    fn_small()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _status_kb("VmRSS")
    fn()
    print(json.dumps({"peak_mb": (_status_kb("VmHWM") - before) / 1024}))


def table(title: str, header: list[str], rows: list[list[object]]) -> str:
    """A plain-text table."""
    cells = [header] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells[1:]]
    return "\n".join(lines)
