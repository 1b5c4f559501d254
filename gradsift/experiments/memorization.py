"""The memorization experiment (Coherent Gradients; Weak and Strong Gradient Directions).

The same MLP is trained on real and on random labels with plain SGD (``mean``),
winsorized aggregation and M3. With the same budget, SGD fits random labels while the
robust aggregators, which suppress directions supported by few examples, fit them far
less; on real labels, whose gradients are coherent, they lose little test accuracy.
m-coherence on a probe batch shows why: it is high on real labels and near the
orthogonal baseline (1) on random labels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
import multiprocessing
import os
import queue
import sys
import threading
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import torch

from .. import data as data_mod
from ..models import mlp
from ..plotting import plot_memorization
from ..progress import progress_bar
from ..recorders import CoherenceRecorder, Recorder
from ..errors import GradsiftError
from ..rundir import RunDir, fingerprint, write_json
from ..train import fit


@dataclass
class MemorizationConfig:
    """Settings of the memorization experiment.

    The defaults were chosen by measurement on a 2-core CPU (see the README): a 400-example
    subset of digits, an MLP 64-256-256-10, SGD with momentum, batch 40 and 60 epochs, so
    that plain SGD fits random labels within the budget while the six runs finish in
    minutes, with the learning rate divided by 10 for the last 10 epochs. ``winsorize_c=3`` clips 3 of 40 values (7.5%) at each end of every coordinate.
    """

    dataset: str = "digits"
    width: int = 256
    depth: int = 2
    epochs: int = 60
    batch_size: int = 40
    lr: float = 0.1
    momentum: float = 0.9
    winsorize_c: int = 3
    lr_decay_epoch: int | None = 51  # lr x0.1 from this epoch on (steadies the final numbers)
    aggregators: tuple[str, ...] = ("mean", "winsorize", "m3")
    labels: tuple[str, ...] = ("real", "random")
    probe_size: int = 100
    seed: int = 0
    n_train: int | None = 400  # training subset size (None: the whole training split; the default is capped at
    # the data's size, a larger explicit value is refused; summary.json records the size used)

    def aggregator_spec(self, name: str) -> str:
        return {"winsorize": f"winsorize:c={self.winsorize_c}"}.get(name, name)


DEFAULT_N_TRAIN = MemorizationConfig.n_train


def default_workers(runs: int) -> int:
    """Processes for ``runs`` independent runs: one per core, at most one per run."""
    return max(1, min(runs, os.cpu_count() or 1))


def run_memorization(config: MemorizationConfig, out_dir: str | Path, *, progress: bool | None = None,
                     resume: bool = False, overwrite: bool = False, workers: int | None = None) -> dict:
    """Run every (labels, aggregator) pair; write ``summary.json`` and ``memorization.png``.

    Returns the summary: ``{"config", "runs": [{labels, aggregator, aggregator_spec,
    train_acc, test_acc, coherence, train_acc_curve, test_acc_curve, run_dir}], "findings"}``
    where ``coherence`` is the probe m-coherence at the start of each epoch (index 0 is at
    initialization).

    ``out_dir`` is a run directory (:meth:`gradsift.rundir.RunDir.start`): one holding
    another run is refused unless ``overwrite``. Each pair's run checkpoints every epoch
    (``OUT/runs/<labels>-<aggregator>/``); ``resume`` continues an interrupted experiment
    with the same config from there, losing at most the epoch in flight.

    The runs are independent: ``workers`` processes (default :func:`default_workers`: one
    per core) train them side by side, each with ``cores / workers`` torch threads (the
    results do not depend on the thread count); ``workers=1`` trains them one after the
    other in this process.
    """
    out = Path(out_dir)
    pairs = len(config.labels) * len(config.aggregators)
    workers = default_workers(pairs) if workers is None else max(1, min(int(workers), pairs))
    _start_workers_early(workers)
    train, test = data_mod.load(config.dataset, seed=config.seed)
    if config.n_train is not None and config.n_train > len(train) and config.n_train != DEFAULT_N_TRAIN:
        raise GradsiftError(f"n_train (--n-train) is {config.n_train}, but {config.dataset} has {len(train)} training "
                            f"examples; pass at most {len(train)}, or leave it out to use them all")
    if config.n_train is not None and config.n_train < len(train):
        train = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed))[: config.n_train].numpy())
    for labels in config.labels:
        if labels not in ("real", "random"):
            raise GradsiftError(f"labels must be 'real' or 'random', got '{labels}'")
    run = RunDir(out)
    run.start({"command": "memorization", **asdict(config), "data": fingerprint(train)}, resume=resume, may_differ=(),
              overwrite=overwrite, job=True, seed=config.seed, n_train=len(train))
    try:
        summary = _memorization(config, out, train, test, progress, resume, workers)
        run.update_manifest(status="finished")
    finally:
        run.unlock()
    return summary


def _memorization(config: MemorizationConfig, out: Path, train, test, progress, resume: bool,
                  workers: int = 1) -> dict:
    summary: dict = {"config": {**asdict(config), "n_train": len(train)}, "runs": []}
    enabled = sys.stderr.isatty() if progress is None else progress
    sets = {labels: train if labels == "real" else data_mod.random_labels(train, seed=config.seed)
            for labels in config.labels}
    pairs = [(labels, name) for labels in config.labels for name in config.aggregators]
    with progress_bar(enabled) as bar:
        overall = bar.add_task("memorization runs", total=len(pairs))
        if workers <= 1:
            for labels, name in pairs:
                spec = config.aggregator_spec(name)
                bar.update(overall, description=f"memorization: {labels} labels, {spec}")
                summary["runs"].append(_one_run(config, sets[labels], test, labels, name, spec, out,
                                                bar if enabled else False, resume))
                write_json(out / "summary.json", summary)  # partial results survive interruption
                bar.update(overall, advance=1)
        else:
            summary["runs"] = _parallel_runs(config, sets, test, pairs, out, resume, workers, bar, overall, summary)
    summary["findings"] = findings(summary)
    write_json(out / "summary.json", summary)
    plot_memorization(summary, out / "memorization.png")
    return summary


class _EpochTicker(Recorder):
    """Posts ``(run index, epoch)`` to the parent's progress queue at each epoch's end."""

    def __init__(self, index: int, ticks) -> None:
        self.index, self.ticks = index, ticks

    def on_epoch_end(self, trainer, epoch: int) -> None:
        self.ticks.put((self.index, epoch))


def _worker_context():
    """The multiprocessing context of the run workers: a fork server that has imported
    this module and ``torch._dynamo`` (``torch.optim`` imports it on first use: 2 s) and
    started nothing, else spawn (Windows, macOS without a fork server)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():  # pragma: no cover
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__, "torch._dynamo"])
    return ctx


def _start_workers_early(workers: int) -> None:
    """Start the fork server now, so that its imports overlap with loading the data."""
    if workers > 1 and _worker_context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def _cost_rank(spec: str) -> int:
    """2 for a per-coordinate reducer, 1 for other per-example aggregators, 0 for plain SGD."""
    from ..aggregate import aggregator_from_spec

    agg = aggregator_from_spec(spec)
    if any(s.per_coordinate is not None for s in agg.stages):
        return 2
    return 0 if agg.input == "batch" or all(s.weighted_sums is not None and s.weighted_sums.uniform
                                             for s in agg.stages if s.input == "per_example") else 1


_TICKS = None  # the worker's end of the progress queue


def _worker_init(threads: int, ticks, job_alive) -> None:
    """Set the worker's threads and progress queue, and make it exit with the job: a killed
    job leaves no worker writing into its runs while it is resumed (``job_alive`` is the
    read end of a pipe whose only write end the job holds: EOF means the job is gone)."""
    global _TICKS
    torch.set_num_threads(threads)
    _TICKS = ticks

    def watch() -> None:
        try:
            job_alive.recv()
        except (EOFError, OSError):
            pass
        os._exit(1)  # checkpoints are written atomically: the last one stands

    threading.Thread(target=watch, name="gradsift-job-watch", daemon=True).start()


def _run_in_worker(index: int, *args) -> tuple[int, dict]:
    return index, _one_run(*args, extra_recorders=[_EpochTicker(index, _TICKS)])


def _parallel_runs(config: MemorizationConfig, sets: dict, test, pairs: list[tuple[str, str]], out: Path,
                   resume: bool, workers: int, bar, overall, summary: dict) -> list[dict]:
    """The runs in ``workers`` processes, in the order of ``pairs``; ``summary.json`` is
    rewritten as each run finishes. The workers are forked from a fork server that has
    imported torch and this module but run nothing (forking a process whose torch has
    started its thread pools can deadlock; spawning re-imports everything per worker)."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = _worker_context()
    done: dict[int, dict] = {}
    tasks = {i: bar.add_task(f"{labels} labels, {config.aggregator_spec(name)}", total=config.epochs)
             for i, (labels, name) in enumerate(pairs)}
    ticks = ctx.Queue()
    job_alive, job_alive_w = ctx.Pipe(duplex=False)  # this process holds the only write end
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                             initargs=(threads, ticks, job_alive)) as pool:
        # longest first (per-coordinate reducers sort every coordinate's values each step),
        # so that no worker is left with a long run at the end
        order = sorted(range(len(pairs)), key=lambda i: -_cost_rank(config.aggregator_spec(pairs[i][1])))
        pending = {pool.submit(_run_in_worker, i, config, sets[pairs[i][0]], test, pairs[i][0], pairs[i][1],
                               config.aggregator_spec(pairs[i][1]), out, False, resume)
                   for i in order}
        while pending:
            finished, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
            try:
                while True:
                    i, epoch = ticks.get_nowait()
                    bar.update(tasks[i], completed=epoch)
            except queue.Empty:
                pass
            for fut in finished:
                i, run = fut.result()  # a failed run raises here
                done[i] = run
                bar.update(tasks[i], completed=config.epochs)
                bar.update(overall, advance=1)
                summary["runs"] = [done[j] for j in sorted(done)]
                write_json(out / "summary.json", summary)  # partial results survive interruption
    job_alive_w.close()
    return summary["runs"]


def _one_run(config: MemorizationConfig, tr, test, labels: str, name: str, spec: str, out: Path, progress,
             resume: bool = False, extra_recorders: list | None = None) -> dict:
    """Train one (labels, aggregator) pair; its entry of ``summary["runs"]`` (continued
    from its checkpoint with ``resume``)."""
    torch.manual_seed(config.seed)
    model = mlp(int(tr.x[0].size), tr.num_classes, width=config.width, depth=config.depth)
    run_dir = out / "runs" / f"{labels}-{name}"
    resume = resume and (run_dir / "checkpoint.pt").exists()
    result = fit(
        model, tr, test, aggregator=spec,
        optimizer=f"sgd:lr={config.lr},momentum={config.momentum}",
        lr_schedule=(f"multisteplr:milestones=({config.lr_decay_epoch - 1},),gamma=0.1"
                     if config.lr_decay_epoch and config.lr_decay_epoch <= config.epochs else None),
        epochs=config.epochs, batch_size=config.batch_size, seed=config.seed,
        recorders=[CoherenceRecorder(config.probe_size, seed=config.seed), *(extra_recorders or [])],
        run_dir=run_dir, resume=resume, overwrite=not resume, progress=progress,  # the experiment owns its runs
        config={"experiment": "memorization", "labels": labels, **asdict(config)},
    )
    h = result.history
    return {
        "labels": labels, "aggregator": name, "aggregator_spec": spec,
        "train_acc": float(h["train_acc"].iloc[-1]), "test_acc": float(h["test_acc"].iloc[-1]),
        "coherence": [float(v) for v in h["m_coherence"]],
        "train_acc_curve": [float(v) for v in h["train_acc"]],
        "test_acc_curve": [float(v) for v in h["test_acc"]],
        "run_dir": str(run_dir.relative_to(out)),
    }


def findings(summary: dict) -> dict:
    """The expected effect, checked on this summary's numbers.

    * ``sgd_fits_random``: plain SGD reaches train accuracy >= 0.9 on random labels;
    * ``<agg>_suppresses_random``: its random-label train accuracy is at most half SGD's;
    * ``<agg>_real_test_gap``: SGD's real-label test accuracy minus the aggregator's;
    * ``coherence_real_over_random_first_epochs``: mean ratio over the first 3 epochs.
    """
    runs = {(r["labels"], r["aggregator"]): r for r in summary["runs"]}
    out: dict = {}
    sgd_rand = runs.get(("random", "mean"))
    sgd_real = runs.get(("real", "mean"))
    if sgd_rand:
        out["sgd_fits_random"] = sgd_rand["train_acc"] >= 0.9
    for (labels, name), r in runs.items():
        if name == "mean":
            continue
        if labels == "random" and sgd_rand:
            out[f"{name}_suppresses_random"] = r["train_acc"] <= 0.5 * sgd_rand["train_acc"]
            out[f"{name}_random_train_acc_ratio"] = r["train_acc"] / max(sgd_rand["train_acc"], 1e-12)
        if labels == "real" and sgd_real:
            out[f"{name}_real_test_gap"] = sgd_real["test_acc"] - r["test_acc"]
    for name in {n for _, n in runs}:
        real, rand = runs.get(("real", name)), runs.get(("random", name))
        if real and rand:
            k = min(3, len(real["coherence"]), len(rand["coherence"]))
            ratios = [a / b for a, b in zip(real["coherence"][:k], rand["coherence"][:k]) if b > 0]
            if ratios:
                out[f"{name}_coherence_real_over_random_first_epochs"] = sum(ratios) / len(ratios)
    return out
