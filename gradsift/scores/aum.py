"""AUM, the area under the margin (Pleiss et al. 2020, "Identifying Mislabeled Data using
the Area Under the Margin Ranking").

At every presentation ``t`` of example ``(x, y)`` in a training mini-batch (before the
step), the *logit* margin is

    M_t(x, y) = z_y - max_{k != y} z_k        (z = the model's logits)

and ``AUM(x, y) = mean_t M_t(x, y)``. A correctly labelled example is pushed up by its
own gradient and by its class's other examples: its margin grows positive. A mislabelled
example is fought by the examples of its true class: its margin stays low or negative
until it is memorized. Low AUM = likely mislabeled (``higher_is_harder=False``).

Pleiss et al. set the cut-off with *threshold samples*: examples moved to a fake extra
class, whose AUM is what a surely-mislabelled example scores; :func:`gradsift.audit`
uses them (see its docstring).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ..errors import GradsiftError
from ..recorders import ExampleSlots
from ..train import Recorder, StepInfo, Trainer
from .registry import register_score


def logit_margin(outputs: Tensor, targets: Tensor) -> Tensor:
    """``z_y - max_{k != y} z_k``: ``[N, C] logits, [N] labels -> [N]``."""
    zy = outputs.gather(1, targets[:, None]).squeeze(1)
    other = outputs.scatter(1, targets[:, None], float("-inf")).amax(1)
    return zy - other


def area_under_margin(margins: np.ndarray) -> np.ndarray:
    """AUM from a margin history: ``[T, N]`` (NaN where not presented) -> ``[N]`` mean over
    the presentations (NaN if never presented)."""
    m = np.asarray(margins, dtype=np.float64)
    seen = ~np.isnan(m)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(seen, m, 0.0).sum(0) / seen.sum(0)


class AUMRecorder(Recorder):
    """Records the logit margin of every example each time it is presented during
    :func:`gradsift.fit` and keeps its running mean, the AUM.

    Run-directory output: ``scores.parquet`` column ``aum``, updated after every epoch.
    After training, :meth:`scores` returns ``aum`` indexed by ``example_id``. In a Sifter
    without ``data=`` the example ids are learnt as they come (:class:`ExampleSlots`).
    """

    def __init__(self) -> None:
        self.total: np.ndarray | None = None
        self.count: np.ndarray | None = None
        self._ids: np.ndarray | None = None  # learnt ids restored from a checkpoint

    def on_fit_begin(self, trainer: Trainer) -> None:
        self.slots = ExampleSlots(trainer, self._ids)
        self.ids = self.slots.ids
        if self.total is None:
            self.total = np.zeros(len(self.slots))
            self.count = np.zeros(len(self.slots), dtype=np.int64)

    def on_step(self, trainer: Trainer, step: StepInfo) -> None:
        if step.outputs.ndim != 2 or step.targets.ndim != 1:
            raise GradsiftError(
                f"AUMRecorder scores classification (logits [B, C], labels [B]); this model gives outputs "
                f"{tuple(step.outputs.shape)} for targets {tuple(step.targets.shape)}. Drop the recorder "
                "(a DynamicsRecorder records the losses of any task)")
        pos, new = self.slots.of(step)
        self.total = ExampleSlots.grow(self.total, new, 0.0)
        self.count = ExampleSlots.grow(self.count, new, 0)
        self.ids = self.slots.ids
        with torch.no_grad():
            m = logit_margin(step.outputs.detach(), step.targets).double().numpy()
        np.add.at(self.total, pos, m)
        np.add.at(self.count, pos, 1)

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        if trainer.run is not None:
            trainer.run.write_scores(self.scores())

    def scores(self) -> pd.DataFrame:
        """``aum`` (NaN for an example never presented), indexed by ``example_id``."""
        with np.errstate(invalid="ignore", divide="ignore"):
            aum = self.total / self.count
        return pd.DataFrame({"aum": aum}, index=pd.Index(self.ids, name="example_id"))

    def state_dict(self) -> dict:
        learnt = self.slots.ids if getattr(self, "slots", None) is not None and self.slots.growing else None
        return {"total": self.total, "count": self.count, "ids": learnt}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.count, self._ids = state["total"], state["count"], state.get("ids")


def aum_recorder(settings=None) -> AUMRecorder:
    """The registry's factory for ``aum``."""
    return AUMRecorder()


register_score("aum", kind="recorder", make=aum_recorder, higher_is_harder=False,
               description="area under the logit margin over training (Pleiss et al.; low = mislabeled)")
