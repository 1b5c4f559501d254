"""Section 5: the main job, ``gradsift memorization`` with its defaults, against the
original main (commit 0dd17d4) run side by side.

    python -m benchmarks.memorization [--baseline /work/wt/baseline] [--repeats 1]

The baseline is a checkout of the original main made with ``git worktree add
/work/wt/baseline 0dd17d4``. Both runs are the same command, ``python -m gradsift
memorization --out DIR -q``, in a fresh subprocess whose ``PYTHONPATH`` points at its own
checkout (torch's default threads); they alternate when repeated. Wall time ratio target
(issue 14, target 6): at most 0.4x the baseline. The results table (per run: train and test
accuracy and the m-coherence at init, epoch 2 and the end) must be unchanged up to float
noise: accuracies within 0.01 (4 of 400 training examples) and m-coherence within 2%, or
within twice what float noise alone does, whichever is larger: the original is run once
more with torch's non-AVX2 kernels (``ATEN_CPU_CAPABILITY=default``: only the order of
float additions changes), and its distance from itself is the floor. Random-label training
is chaotic: a last-bit difference grows into different memorized examples by epoch 60.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import common as C

BASELINE_COMMIT = "0dd17d4"
DEFAULT_BASELINE = "/work/wt/baseline"
ACC_TOL = 0.01
COH_REL_TOL = 0.02


SMOKE_ARGS = ("--epochs", "1", "--n-train", "40")


#: The float-noise run: torch's kernels without AVX2 (``ATEN_CPU_CAPABILITY=default``) add
#: and reduce in another order; nothing else changes. (The thread count changes nothing
#: here: the original gives the same table at 1 thread as at 2.)
NOISE_ENV = {"ATEN_CPU_CAPABILITY": "default"}
#: The current table may differ from the original by up to this many times what float noise
#: alone does (one sample of a chaotic divergence, so not a tight bound).
NOISE_FACTOR = 2.0


def run_job(root: str, out: Path, extra: tuple[str, ...] = (), env_extra: dict | None = None) -> float:
    """Wall seconds of ``gradsift memorization`` (defaults, unless ``extra`` options) run
    from checkout ``root`` (``env_extra``: more environment variables)."""
    env = dict(os.environ, PYTHONPATH=root, **(env_extra or {}))
    env.pop("GRADSIFT_BENCH_THREADS", None)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "gradsift", "memorization", "--out", str(out), "-q", *extra], cwd=root, env=env,
                   check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def results(out: Path) -> dict[tuple[str, str], dict]:
    runs = json.loads((out / "summary.json").read_text())["runs"]
    rows = {}
    for r in runs:
        c = r["coherence"]
        rows[r["labels"], r["aggregator_spec"]] = {
            "train acc": r["train_acc"], "test acc": r["test_acc"],
            "m-coh init": c[0], "m-coh ep 2": c[min(1, len(c) - 1)], "m-coh end": c[-1],
        }
    return rows


def worst_differences(a: dict, b: dict) -> tuple[float, float, list]:
    """``(max |d acc|, max relative |d m-coh|, keys missing from either)`` of two results tables."""
    worst_acc, worst_coh = 0.0, 0.0
    keys = sorted(set(a) | set(b))
    missing = [k for k in keys if k not in a or k not in b]
    for k in keys:
        if k in missing:
            continue
        worst_acc = max(worst_acc, abs(a[k]["train acc"] - b[k]["train acc"]), abs(a[k]["test acc"] - b[k]["test acc"]))
        for c in ("m-coh init", "m-coh ep 2", "m-coh end"):
            worst_coh = max(worst_coh, abs(a[k][c] - b[k][c]) / max(abs(b[k][c]), 1e-12))
    return worst_acc, worst_coh, missing


def run(s: C.Settings, baseline: str = DEFAULT_BASELINE, repeats: int = 1, noise_floor: bool = True) -> C.Section:
    """Smoke mode (``s.smoke``) runs both checkouts with :data:`SMOKE_ARGS` (1 epoch, 40
    examples) to check the plumbing only.

    ``noise_floor``: also run the original once with :data:`NOISE_ENV` (torch's kernels
    without AVX2). Only the order of float additions changes, so its distance from the
    original's table is what float noise alone does to these 60-epoch runs (random-label
    training is chaotic: a last-bit difference grows into different memorized examples).
    The current table is unchanged up to float noise when its distance is within the larger
    of the stated tolerance and :data:`NOISE_FACTOR` times that floor."""
    sec = C.Section()
    extra = SMOKE_ARGS if s.smoke else ()
    if not (Path(baseline) / "gradsift").is_dir():
        sec.targets.append(C.Target("14", "memorization wall time / original main", float("nan"), "<=", 0.4, None,
                                    f"no baseline checkout at {baseline}: git worktree add {baseline} {BASELINE_COMMIT}"))
        return sec
    times: dict[str, list[float]] = {"current": [], "original 0dd17d4": []}
    outs: dict[str, Path] = {}
    roots = {"current": C.ROOT, "original 0dd17d4": str(Path(baseline).resolve())}
    with tempfile.TemporaryDirectory(prefix="gradsift-bench-mem-") as tmp:
        errors: dict[str, str] = {}
        for r in range(repeats):
            for name, root in roots.items():
                out = Path(tmp) / f"{name.split()[0]}-{r}"
                try:
                    times[name].append(run_job(root, out, extra))
                    outs[name] = out
                except subprocess.CalledProcessError as e:
                    errors[name] = (e.stderr or "").strip().splitlines()[-1:][0] if e.stderr else str(e)
        floor_out = Path(tmp) / "original-noise"
        if noise_floor and not errors:
            try:
                run_job(roots["original 0dd17d4"], floor_out, extra, env_extra=NOISE_ENV)
            except subprocess.CalledProcessError as e:
                errors["original, float-noise run"] = str(e)
        if errors:
            for name, err in errors.items():
                sec.targets.append(C.Target("14", f"memorization: {name} run", float("nan"), "<=", 0.4, None, err[:200]))
            return sec
        res = {name: results(out) for name, out in outs.items()}
        floor = worst_differences(results(floor_out), res["original 0dd17d4"]) if noise_floor else None
    t_cur, t_base = min(times["current"]), min(times["original 0dd17d4"])
    what = "smoke: " + " ".join(extra) if extra else "defaults"
    tab = C.Table(f"5. gradsift memorization ({what}), wall seconds (best of {repeats}, torch default threads)",
                  ["checkout", "wall s", "x original"])
    tab.rows += [["original 0dd17d4", t_base, 1.0], ["current", t_cur, t_cur / t_base]]
    cols = ["train acc", "test acc", "m-coh init", "m-coh ep 2", "m-coh end"]
    res_tab = C.Table("5. memorization results table, current vs original (current / original)",
                      ["labels", "aggregator", *cols])
    keys = sorted(set(res["current"]) | set(res["original 0dd17d4"]))
    for k in keys:
        a, b = res["current"].get(k), res["original 0dd17d4"].get(k)
        if a is None or b is None:
            res_tab.rows.append([*k, *(["missing"] * len(cols))])
            continue
        res_tab.rows.append([*k, *(f"{a[c]:.3f} / {b[c]:.3f}" for c in cols)])
    worst_acc, worst_coh, missing = worst_differences(res["current"], res["original 0dd17d4"])
    sec.tables += [tab, res_tab]
    acc_tol, coh_tol, floor_note = ACC_TOL, COH_REL_TOL, ""
    if floor is not None:
        acc_tol, coh_tol = max(ACC_TOL, NOISE_FACTOR * floor[0]), max(COH_REL_TOL, NOISE_FACTOR * floor[1])
        floor_note = (f"; float-noise floor (original with ATEN_CPU_CAPABILITY=default vs as is): max |d acc| "
                      f"{floor[0]:.4f}, max rel d m-coh {floor[1]:.4f}, tolerance {NOISE_FACTOR:g}x that")
    sec.targets.append(C.Target("14", "memorization wall time / original main", t_cur / t_base, "<=", 0.4, None,
                                f"{t_cur:.0f} vs {t_base:.0f} s"))
    same = float("nan") if missing else max(worst_acc / acc_tol, worst_coh / coh_tol)
    sec.targets.append(C.Target("14", "memorization results table unchanged up to float noise (worst diff / "
                                "max(tolerance, noise floor))", same, "<=", 1.0,
                                None, f"max |d acc| {worst_acc:.4f} (tol {acc_tol:.4f}), max rel d m-coh {worst_coh:.4f} "
                                      f"(tol {coh_tol:.4f}){floor_note}" + (f"; missing rows {missing}" if missing else "")))
    return sec


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", default=DEFAULT_BASELINE)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--no-noise-floor", action="store_true", help="skip the original's float-noise run")
    a = ap.parse_args(argv)
    sec = run(C.Settings.make(False), a.baseline, a.repeats, noise_floor=not a.no_noise_floor)
    sec.print()


if __name__ == "__main__":
    main()
