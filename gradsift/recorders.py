"""Recorders that observe :func:`gradsift.fit`: coherence of per-example gradients."""

from __future__ import annotations

import pandas as pd
import torch
from torch import Tensor

from .coherence import coherence
from .engine import per_example
from .train import Recorder, Trainer


class CoherenceRecorder(Recorder):
    """m-coherence of per-example gradients on a fixed probe batch, at the start of every
    epoch (so epoch 1's value is at initialization) and once more after training.

    The probe is ``m`` training examples (first ``m`` of a seeded permutation) with their
    *training* labels (random labels in a random-label run). Metrics added to each epoch
    row: ``m_coherence``, ``alpha``; the run directory gets ``coherence.parquet`` with one
    row per (epoch, layer), layer ``"all"`` for the whole model.

    Args:
        m: probe size.
        seed: choice of the probe.
        per_layer: also record every layer.
    """

    def __init__(self, m: int = 100, *, seed: int = 0, per_layer: bool = True):
        if m < 1:
            raise ValueError(f"m must be >= 1, got {m}")
        self.m, self.seed, self.per_layer = m, seed, per_layer
        self.rows: list[dict] = []
        self.probe: tuple[Tensor, Tensor] | None = None

    def on_fit_begin(self, trainer: Trainer) -> None:
        n = len(trainer.y)
        g = torch.Generator().manual_seed(self.seed)
        idx = torch.randperm(n, generator=g)[: min(self.m, n)]
        self.probe = trainer.x[idx], trainer.y[idx]

    def measure(self, trainer: Trainer, epoch: int) -> dict:
        assert self.probe is not None
        x, y = self.probe
        grads = per_example(trainer.model, trainer.loss_fn, x, y, chunk_size=trainer.chunk_size).grads
        c = coherence(grads, per_layer=self.per_layer)
        self.rows.append({"epoch": epoch, "layer": "all", "m_coherence": c["m_coherence"], "alpha": c["alpha"], "m": c["m"]})
        for name, lc in c.get("layers", {}).items():
            self.rows.append({"epoch": epoch, "layer": name, "m_coherence": lc["m_coherence"], "alpha": lc["alpha"], "m": lc["m"]})
        if trainer.run is not None:
            trainer.run.write_table("coherence", self.table())
        return {"m_coherence": c["m_coherence"], "alpha": c["alpha"]}

    def on_epoch_begin(self, trainer: Trainer, epoch: int) -> dict:
        return self.measure(trainer, epoch)

    def on_fit_end(self, trainer: Trainer) -> None:
        self.measure(trainer, trainer.epochs + 1)

    def table(self) -> pd.DataFrame:
        """One row per (epoch, layer): ``epoch, layer, m_coherence, alpha, m``."""
        return pd.DataFrame(self.rows, columns=["epoch", "layer", "m_coherence", "alpha", "m"])

    def state_dict(self) -> dict:
        return {"rows": list(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        self.rows = list(state["rows"])
