"""Run the benchmark suite and print every table and target line.

    python -m benchmarks.run_all                  # full mode: 1 and 2 threads, the main job too
    python -m benchmarks.run_all --quick          # a few minutes on 2 cores (no main job; real models at 1 thread)
    python -m benchmarks.run_all --quick --write-readme   # ... and regenerate benchmarks/README.md
    python -m benchmarks.run_all --from-json benchmarks/last_run.json --write-readme   # README only

Sections: 1 per-example gradients (``grads``), 2 per-example norms (``norms``), 3 training
steps (``steps``), 4 real models vs Opacus (``real``), 5 the memorization job vs the
original main (``memorization``, full mode only), 6 ghost coherence (``coherence``), and
the vmapped ensemble (``ensemble``, full mode only). ``--sections grads,steps`` runs a subset. Every run writes its tables and
targets to ``--json`` (default ``benchmarks/last_run.json``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time

import torch

from . import common as C

THREADED = ("grads", "norms", "steps", "real", "coherence")
ALL = (*THREADED, "memorization", "ensemble")
FULL_ONLY = ("memorization", "ensemble")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=C.ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def _section(name: str, threads: int, s: C.Settings, args) -> C.Section:
    if name == "grads":
        from .per_example import run_grads
        return run_grads(threads, s)
    if name == "norms":
        from .per_example import run_norms
        return run_norms(threads, s)
    if name == "steps":
        from .steps import run
        return run(threads, s)
    if name == "real":
        from .real_models import run
        return run(threads, s)
    if name == "coherence":
        from .coherence import run
        return run(threads, s)
    if name == "memorization":
        from .memorization import run
        return run(s, args.baseline)
    if name == "ensemble":
        from .ensemble import run
        os.environ["GRADSIFT_BENCH_THREADS"] = str(threads)
        return C.Section(tables=[C.Table(title="", header=[], raw=run())])
    raise KeyError(name)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats; no memorization job, no ensemble")
    ap.add_argument("--smoke", action="store_true", help="B cut to 4, one call each, no JSON/README: does it all run?")
    ap.add_argument("--threads", default="1,2", help="comma list of torch thread counts (default 1,2)")
    ap.add_argument("--sections", default=",".join(ALL), help=f"comma list of {', '.join(ALL)}")
    ap.add_argument("--baseline", default="/work/wt/baseline", help="checkout of the original main (0dd17d4)")
    ap.add_argument("--json", default=os.path.join(C.ROOT, "benchmarks", "last_run.json"), help="where to write results")
    ap.add_argument("--from-json", default=None, help="don't measure; use this earlier run")
    ap.add_argument("--write-readme", action="store_true", help="regenerate benchmarks/README.md from the run")
    ap.add_argument("--also-json", action="append", default=[],
                    help="add the tables and targets of an earlier run (e.g. a full-mode memorization section)")
    a = ap.parse_args(argv)

    if a.from_json:
        with open(a.from_json) as f:
            result = json.load(f)
    else:
        result = measure(a)
        if a.smoke:
            return
        _dump(result, a.json)
        print(f"wrote {a.json}")
    for extra in a.also_json:
        result = merge(result, extra)
    if a.write_readme:
        from .readme import write_readme

        print(f"wrote {write_readme(result)}")


def merge(result: dict, path: str) -> dict:
    """``result`` with the tables and targets of the run saved at ``path`` appended (its
    meta kept under ``meta["merged"]``)."""
    with open(path) as f:
        other = json.load(f)
    targets = result["targets"] + other["targets"]
    meta = dict(result["meta"], merged=[*result["meta"].get("merged", []), other["meta"]])
    return {**result, "meta": meta, "tables": result["tables"] + other["tables"], "targets": targets,
            "counts": {k: sum(t["status"] == k for t in targets) for k in ("MET", "MISSED", "FAILED")}}


def _dump(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


def measure(a) -> dict:
    s = C.Settings.make(a.quick, a.smoke)
    a.quick = a.quick or a.smoke
    sections = [x for x in a.sections.split(",") if x]
    unknown = [x for x in sections if x not in ALL]
    if unknown:
        raise SystemExit(f"unknown sections {unknown}; known: {', '.join(ALL)}")
    if a.quick and not s.smoke:
        sections = [x for x in sections if x not in FULL_ONLY]
    threads = [int(t) for t in a.threads.split(",")]
    start, load0 = time.time(), os.getloadavg()
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "mode": "smoke" if s.smoke else "quick" if a.quick else "full", "threads": threads, "sections": sections,
        "commit": _git("rev-parse", "--short", "HEAD"), "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
        "step_entry": C.step_entry_name(), "load_before": [round(x, 2) for x in load0],
    }
    try:
        import opacus
        meta["opacus"] = opacus.__version__
    except ImportError:
        meta["opacus"] = None
    print(f"gradsift benchmarks, {meta['mode']} mode, {meta['date']}, commit {meta['commit']}, torch {meta['torch']}, "
          f"{meta['cpus']} cpus, load average {load0[0]:.2f}; step entry point {meta['step_entry']}", flush=True)
    tables, targets = [], []
    partial = {"meta": meta, "tables": tables, "targets": targets, "partial": True}

    def take(sec: C.Section) -> None:
        sec.print()
        tables.extend(t.to_json() for t in sec.tables)
        targets.extend(t.to_json() for t in sec.targets)
        if sec.targets:
            print(flush=True)
        if not s.smoke:  # what is measured so far survives an interrupted run
            meta["load_after"] = [round(x, 2) for x in os.getloadavg()]
            meta["seconds"] = round(time.time() - start, 1)
            partial["counts"] = {k: sum(t["status"] == k for t in targets) for k in ("MET", "MISSED", "FAILED")}
            _dump(partial, a.json)

    for name in sections:
        if name in THREADED:
            # quick mode: the real models (the slowest section) at the first thread count only
            for n in (threads[:1] if a.quick and name == "real" else threads):
                take(_section(name, n, s, a))
        elif name == "ensemble":
            take(_section(name, threads[0], s, a))
        else:
            take(_section(name, threads[0], s, a))
    meta["seconds"] = round(time.time() - start, 1)
    meta["load_after"] = [round(x, 2) for x in os.getloadavg()]
    counts = {k: sum(t["status"] == k for t in targets) for k in ("MET", "MISSED", "FAILED")}
    print(f"targets: {counts['MET']} met, {counts['MISSED']} missed, {counts['FAILED']} failed "
          f"(not measured); {meta['seconds']:.0f} s; load average {meta['load_after'][0]:.2f}")
    for t in targets:
        print(C.Target(**{k: t[k] for k in ("issue", "name", "op", "threshold", "threads", "detail")},
                       value=float("nan") if t["value"] is None else t["value"]).render())
    return {"meta": meta, "tables": tables, "targets": targets, "counts": counts}


if __name__ == "__main__":
    main(sys.argv[1:])
