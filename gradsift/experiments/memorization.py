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
import sys
from pathlib import Path

import torch

from .. import data as data_mod
from ..models import mlp
from ..plotting import plot_memorization
from ..progress import progress_bar
from ..recorders import CoherenceRecorder
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


def run_memorization(config: MemorizationConfig, out_dir: str | Path, *, progress: bool | None = None,
                     resume: bool = False, overwrite: bool = False) -> dict:
    """Run every (labels, aggregator) pair; write ``summary.json`` and ``memorization.png``.

    Returns the summary: ``{"config", "runs": [{labels, aggregator, aggregator_spec,
    train_acc, test_acc, coherence, train_acc_curve, test_acc_curve, run_dir}], "findings"}``
    where ``coherence`` is the probe m-coherence at the start of each epoch (index 0 is at
    initialization).

    ``out_dir`` is a run directory (:meth:`gradsift.rundir.RunDir.start`): one holding
    another run is refused unless ``overwrite``. Each pair's run checkpoints every epoch
    (``OUT/runs/<labels>-<aggregator>/``); ``resume`` continues an interrupted experiment
    with the same config from there, losing at most the epoch in flight.
    """
    out = Path(out_dir)
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
        summary = _memorization(config, out, train, test, progress, resume)
        run.update_manifest(status="finished")
    finally:
        run.unlock()
    return summary


def _memorization(config: MemorizationConfig, out: Path, train, test, progress, resume: bool) -> dict:
    summary: dict = {"config": {**asdict(config), "n_train": len(train)}, "runs": []}
    enabled = sys.stderr.isatty() if progress is None else progress
    with progress_bar(enabled) as bar:
        overall = bar.add_task("memorization runs", total=len(config.labels) * len(config.aggregators))
        for labels in config.labels:
            tr = train if labels == "real" else data_mod.random_labels(train, seed=config.seed)
            for name in config.aggregators:
                spec = config.aggregator_spec(name)
                bar.update(overall, description=f"memorization: {labels} labels, {spec}")
                summary["runs"].append(_one_run(config, tr, test, labels, name, spec, out, bar if enabled else False,
                                                resume))
                write_json(out / "summary.json", summary)  # partial results survive interruption
                bar.update(overall, advance=1)
    summary["findings"] = findings(summary)
    write_json(out / "summary.json", summary)
    plot_memorization(summary, out / "memorization.png")
    return summary


def _one_run(config: MemorizationConfig, tr, test, labels: str, name: str, spec: str, out: Path, progress,
             resume: bool = False) -> dict:
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
        recorders=[CoherenceRecorder(config.probe_size, seed=config.seed)],
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
