"""Gradient alignment: how much each example pulls with the rest of its batch.

At every step, from the exact ``[B, B]`` Gram matrix of the batch's per-example gradients
(:func:`gradsift.coherence.gradient_gram`, computed from activation and output-gradient
Grams, without per-example gradients for ``nn.Linear`` layers), each example gets

    a_i = g_i . mean_{j != i} g_j / (||g_i|| ||mean_{j != i} g_j||)      (a cosine)

and its score is the mean of ``a_i`` over its presentations. Examples whose gradient
agrees with the batch (coherent, "strong directions") score high; low or negative means
the example pulls against the batch: memorization, an atypical example or a wrong label
(``higher_is_harder=False``). The Gram is taken right after the optimizer step, at the
parameters the next step starts from (one more forward and backward pass of the batch).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..coherence import gradient_gram, gram_coherence
from ..recorders import ExampleSlots
from ..train import Recorder, StepInfo, Trainer
from .registry import register_score


class AlignmentRecorder(Recorder):
    """Records every example's gradient alignment with its batch at each step of
    :func:`gradsift.fit`, and the batch m-coherence.

    Run-directory output: ``scores.parquet`` column ``alignment`` (mean over presentations),
    updated after every epoch; the epoch's mean m-coherence of the batches goes to the
    metrics as ``batch_m_coherence``. In a Sifter without ``data=`` the example ids are
    learnt as they come (:class:`~gradsift.recorders.ExampleSlots`).
    """

    def __init__(self) -> None:
        self.total: np.ndarray | None = None
        self.count: np.ndarray | None = None
        self._coh: list[float] = []
        self._ids: np.ndarray | None = None  # learnt ids restored from a checkpoint

    def on_fit_begin(self, trainer: Trainer) -> None:
        self.slots = ExampleSlots(trainer, self._ids)
        self.ids = self.slots.ids
        if self.total is None:
            self.total = np.zeros(len(self.slots))
            self.count = np.zeros(len(self.slots), dtype=np.int64)

    def on_epoch_begin(self, trainer: Trainer, epoch: int) -> None:
        self._coh = []

    def on_step(self, trainer: Trainer, step: StepInfo) -> None:
        slots, new = self.slots.of(step)
        self.total = ExampleSlots.grow(self.total, new, 0.0)
        self.count = ExampleSlots.grow(self.count, new, 0)
        self.ids = self.slots.ids
        if len(slots) < 2:
            return
        was = trainer.model.training
        trainer.model.eval()
        try:
            gram = gradient_gram(trainer.model, trainer.loss_fn, step.inputs, step.targets)
        finally:
            trainer.model.train(was)
        stats = gram_coherence(gram)
        a = stats["alignment"].numpy()
        ok = ~np.isnan(a)
        pos = slots[ok]
        np.add.at(self.total, pos, a[ok])
        np.add.at(self.count, pos, 1)
        self._coh.append(stats["m_coherence"])

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> dict:
        if trainer.run is not None:
            trainer.run.write_scores(self.scores())
        return {"batch_m_coherence": float(np.mean(self._coh)) if self._coh else float("nan")}

    def scores(self) -> pd.DataFrame:
        """``alignment`` (NaN for an example never scored), indexed by ``example_id``."""
        with np.errstate(invalid="ignore", divide="ignore"):
            value = self.total / self.count
        return pd.DataFrame({"alignment": value}, index=pd.Index(self.ids, name="example_id"))

    def state_dict(self) -> dict:
        learnt = self.slots.ids if getattr(self, "slots", None) is not None and self.slots.growing else None
        return {"total": self.total, "count": self.count, "ids": learnt}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.count, self._ids = state["total"], state["count"], state.get("ids")


def alignment_recorder(settings=None) -> AlignmentRecorder:
    """The registry's factory for ``alignment``."""
    return AlignmentRecorder()


register_score("alignment", kind="recorder", make=alignment_recorder, higher_is_harder=False,
               description="cosine of the example's gradient with the rest of its batch, mean over steps "
                           "(ghost Gram; low = pulls against the batch)")
