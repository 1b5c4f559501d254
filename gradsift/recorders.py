"""Recorders: what observes training (:class:`Recorder`, :class:`StepInfo`), and the
coherence recorder.

A recorder is handed the :class:`~gradsift.sifter.Sifter` that drives the step (inside
:func:`gradsift.fit` or the user's own loop). It may read:

* ``sifter.model``, ``sifter.loss_fn``, ``sifter.step`` (global 0-based step),
  ``sifter.epoch``, ``sifter.epochs`` (``None`` in an open-ended loop),
  ``sifter.optimizer`` (``None`` unless given), ``sifter.run`` (the run directory or ``None``),
  ``sifter.chunk_size``;
* when the training set is known (always inside ``fit``; ``Sifter(data=...)`` otherwise):
  ``sifter.ids`` ``[N]`` example ids, ``sifter.y`` ``[N]`` targets, ``sifter.x`` (indexable
  by a ``[b]`` position tensor, giving a batch of inputs on the model's device) and
  :meth:`~gradsift.sifter.Sifter.map_examples`.

This module imports neither the trainer nor privacy, so both can import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .coherence import model_coherence

if TYPE_CHECKING:  # annotations only
    from .sifter import Sifter

__all__ = ["StepInfo", "Recorder", "ExampleSlots", "CoherenceRecorder", "TensorBoardRecorder"]


@dataclass
class StepInfo:
    """What a recorder sees after each step's gradient.

    Attributes:
        epoch: 1-based epoch.
        step: global 0-based step.
        positions: ``[B]`` positions of the batch in the training set (the example ids
            when the positions are unknown, e.g. in the user's own loop).
        example_ids: ``[B]`` stable example ids.
        inputs: ``[B, ...]`` (or a tuple / dict of such); targets: ``[B]``.
        losses: ``[B]`` per-example losses before the step.
        outputs: ``[B, C]`` model outputs before the step.
        grads: name -> ``[B, *shape]`` per-example gradients, or ``None`` when none were
            computed this step.
        lr: learning rate of the first parameter group (``nan`` without an optimizer).
    """

    epoch: int
    step: int
    positions: Tensor
    example_ids: Tensor
    inputs: Any
    targets: Tensor
    losses: Tensor
    outputs: Tensor
    grads: dict[str, Tensor] | None
    lr: float


class Recorder:
    """Observes training. Subclass and override what you need.

    Set ``needs_per_example_grads = True`` to receive per-example gradients in
    :meth:`on_step` (this makes every step compute them).
    """

    needs_per_example_grads: bool = False

    def on_fit_begin(self, trainer: "Sifter") -> None: ...

    def on_epoch_begin(self, trainer: "Sifter", epoch: int) -> dict | None: ...

    def on_step(self, trainer: "Sifter", step: StepInfo) -> None: ...

    def on_epoch_end(self, trainer: "Sifter", epoch: int) -> dict | None: ...

    def on_fit_end(self, trainer: "Sifter") -> None: ...

    def on_epoch_logged(self, trainer: "Sifter", row: dict) -> None:
        """The epoch's finished history row (every recorder's metrics and the evaluation)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


class ExampleSlots:
    """Where each example's values live in a recorder's ``[N]`` arrays.

    With the training set known (``fit``, ``Sifter(data=...)``) the slots are the
    positions and ``ids`` is ``sifter.ids``. In the user's own loop without ``data=`` the
    ids are learnt as they come: each new id gets the next slot, and the recorder grows
    its arrays by the count :meth:`of` returns (:meth:`grow`).

    Args:
        sifter: the Sifter starting the run (read in ``on_fit_begin``).
        ids: ids learnt earlier (a resumed recorder's state), for the growing form.
    """

    def __init__(self, sifter: "Sifter", ids: np.ndarray | None = None):
        self.growing = getattr(sifter, "data", True) is None
        if self.growing:
            self.ids = np.zeros(0, np.int64) if ids is None else np.asarray(ids, np.int64)
            self._slot = {int(i): j for j, i in enumerate(self.ids)}
        else:
            self.ids = sifter.ids.numpy()
            self._slot = None

    def __len__(self) -> int:
        return len(self.ids)

    def of(self, step: StepInfo) -> tuple[np.ndarray, int]:
        """``([B] slots of the step's examples, number of new ids appended)``."""
        if self._slot is None:
            return step.positions.numpy(), 0
        ids = [int(i) for i in step.example_ids.tolist()]
        new = [i for i in dict.fromkeys(ids) if i not in self._slot]
        if new:
            self._slot.update({i: len(self.ids) + j for j, i in enumerate(new)})
            self.ids = np.concatenate([self.ids, np.asarray(new, np.int64)])
        return np.asarray([self._slot[i] for i in ids], np.int64), len(new)

    @staticmethod
    def grow(a: np.ndarray, k: int, fill: Any) -> np.ndarray:
        """``a [n, ...]`` followed by ``k`` rows of ``fill``."""
        if k == 0:
            return a
        return np.concatenate([a, np.full((k, *a.shape[1:]), fill, a.dtype)])


class CoherenceRecorder(Recorder):
    """m-coherence of per-example gradients on a fixed probe batch, at the start of every
    epoch (so epoch 1's value is at initialization) and once more after training. Measured
    by :func:`gradsift.coherence.model_coherence`, which never forms the gradients.

    The probe is ``m`` training examples (first ``m`` of a seeded permutation) with their
    *training* labels (random labels in a random-label run). Metrics added to each epoch
    row: ``m_coherence``, ``alpha``; the run directory gets ``coherence.parquet`` with one
    row per (epoch, layer), layer ``"all"`` for the whole model.

    Needs the training set (``fit`` gives it; in your own loop pass ``Sifter(data=...)``).

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
        self.probe: tuple[Any, Tensor] | None = None

    def on_fit_begin(self, trainer: "Sifter") -> None:
        n = trainer.num_examples
        g = torch.Generator().manual_seed(self.seed)
        idx = torch.randperm(n, generator=g)[: min(self.m, n)]
        self.probe = trainer.x[idx], trainer.y[idx].to(trainer.device)

    def measure(self, trainer: "Sifter", epoch: int) -> dict:
        assert self.probe is not None
        x, y = self.probe
        c = model_coherence(trainer.model, trainer.loss_fn, x, y, per_layer=self.per_layer)
        self.rows.append({"epoch": epoch, "layer": "all", "m_coherence": c["m_coherence"], "alpha": c["alpha"], "m": c["m"]})
        for name, lc in c.get("layers", {}).items():
            self.rows.append({"epoch": epoch, "layer": name, "m_coherence": lc["m_coherence"], "alpha": lc["alpha"], "m": lc["m"]})
        if trainer.run is not None:
            trainer.run.write_table("coherence", self.table())
        return {"m_coherence": c["m_coherence"], "alpha": c["alpha"]}

    def on_epoch_begin(self, trainer: "Sifter", epoch: int) -> dict:
        return self.measure(trainer, epoch)

    def on_fit_end(self, trainer: "Sifter") -> None:
        self.measure(trainer, trainer.epoch + 1)

    def table(self) -> pd.DataFrame:
        """One row per (epoch, layer): ``epoch, layer, m_coherence, alpha, m``."""
        return pd.DataFrame(self.rows, columns=["epoch", "layer", "m_coherence", "alpha", "m"])

    def state_dict(self) -> dict:
        return {"rows": list(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        self.rows = list(state["rows"])


class TensorBoardRecorder(Recorder):
    """Writes each epoch to TensorBoard (``torch.utils.tensorboard``; needs the
    ``tensorboard`` package): every number in the epoch's history row as a scalar
    (``train/acc``, ``test/loss``, ``m_coherence``, ``epsilon`` (privacy spent), ...) and a
    histogram of every per-example score column of the recorders that keep scores
    (``scores/forgetting``, ``scores/cum_loss``, ...).

    Args:
        log_dir: where to write the event files (default: ``RUN/tensorboard`` with a run
            directory, else ``runs/tensorboard``).
    """

    def __init__(self, log_dir: str | None = None):
        self.log_dir = log_dir
        self.writer = None

    def on_fit_begin(self, trainer: "Sifter") -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # tensorboard is an optional dependency
            from .errors import GradsiftError

            raise GradsiftError("TensorBoardRecorder needs tensorboard: pip install tensorboard") from e
        log_dir = self.log_dir or (str(trainer.run.path / "tensorboard") if trainer.run is not None
                                   else "runs/tensorboard")
        self.writer = SummaryWriter(log_dir=log_dir)

    def on_epoch_logged(self, trainer: "Sifter", row: dict) -> None:
        epoch = int(row["epoch"])
        for key, value in row.items():
            if key == "epoch" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            split, _, metric = key.partition("_")
            tag = f"{split}/{metric}" if split in ("train", "test") and metric else key
            self.writer.add_scalar(tag, float(value), epoch)
        for r in trainer.recorders:
            frame = _scores_of(r, trainer)
            if frame is None:
                continue
            for col in frame.columns:
                values = pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype=float)
                values = values[~pd.isna(values)]
                if len(values):
                    self.writer.add_histogram(f"scores/{col}", values, epoch)
        self.writer.flush()

    def on_fit_end(self, trainer: "Sifter") -> None:
        if self.writer is not None:
            self.writer.close()


def _scores_of(recorder: Recorder, trainer: "Sifter") -> pd.DataFrame | None:
    """A recorder's per-example scores so far, if it keeps any."""
    scores = getattr(recorder, "scores", None)
    if not callable(scores) or isinstance(recorder, TensorBoardRecorder):
        return None
    try:
        frame = scores()
    except TypeError:  # scores(example_ids)
        try:
            frame = scores(trainer.ids.numpy())
        except Exception:  # noqa: BLE001 - a recorder without scores yet
            return None
    except Exception:  # noqa: BLE001
        return None
    return frame.drop(columns=[c for c in ("label",) if c in frame.columns]) if isinstance(frame, pd.DataFrame) else None
