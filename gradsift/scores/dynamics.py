"""Training-dynamics scores: forgetting events, learning time, cumulative loss.

Pure functions take a history ``[T, N]`` (T presentations/epochs, N examples);
:class:`DynamicsRecorder` builds that history during :func:`gradsift.fit` from the
predictions made when each example is presented in its mini-batch (before the step, as in
Toneva et al.), writes it to ``RUN/dynamics/part-<epoch>.parquet`` and keeps the scores in
``RUN/scores.parquet``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..train import Recorder, StepInfo, Trainer
from .basic import margin as _margin
from .registry import register_score


def forgetting_events(correct: np.ndarray) -> np.ndarray:
    """Number of forgetting events per example: transitions correct -> incorrect between
    consecutive presentations (Toneva et al.).

    Args:
        correct: ``[T, N]`` bool, correctness at each of ``T`` presentations.

    Returns:
        ``[N]`` int counts.
    """
    c = np.asarray(correct, dtype=bool)
    if c.shape[0] < 2:
        return np.zeros(c.shape[1:], dtype=np.int64)
    return (c[:-1] & ~c[1:]).sum(0).astype(np.int64)


def forgetting_score(correct: np.ndarray) -> np.ndarray:
    """Forgetting events as a hardness score: the count, and ``T`` for examples never
    classified correctly (ranked above every learned one; at most ``T//2`` events are
    possible). ``[T, N] bool -> [N]`` int."""
    c = np.asarray(correct, dtype=bool)
    score = forgetting_events(c)
    score[~c.any(0)] = c.shape[0]
    return score


def learning_time(correct: np.ndarray) -> np.ndarray:
    """First presentation (1-based) from which the example stays correct to the end;
    ``T + 1`` if it is wrong at the last one. ``[T, N] bool -> [N]`` int."""
    c = np.asarray(correct, dtype=bool)
    t = c.shape[0]
    # stays[t] = correct at every presentation from t on
    stays = np.flip(np.logical_and.accumulate(np.flip(c, 0), axis=0), 0)
    first = np.where(stays.any(0), stays.argmax(0) + 1, t + 1)
    return first.astype(np.int64)


def data_map(probs: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Data Map coordinates (Swayamdipta et al. 2020) from ``[T, N]`` histories of the
    true-label probability and correctness (NaN / False where not presented):
    ``(confidence = mean p, variability = std p, correctness = fraction correct)``, each ``[N]``
    (over the presentations; see :mod:`gradsift.datamap` for the map)."""
    p = np.asarray(probs, dtype=np.float64)
    seen = ~np.isnan(p)
    n = np.maximum(seen.sum(0), 1)
    conf = np.where(seen, p, 0.0).sum(0) / n
    var = np.sqrt(np.where(seen, (p - conf) ** 2, 0.0).sum(0) / n)
    corr = (np.asarray(correct, dtype=bool) & seen).sum(0) / n
    return conf, var, corr


def cumulative_loss(losses: np.ndarray) -> np.ndarray:
    """Cumulative sample loss: sum of the example's loss over presentations. ``[T, N] -> [N]``."""
    return np.asarray(losses, dtype=np.float64).sum(0)


class DynamicsRecorder(Recorder):
    """Records every example's loss, correctness and margin when it is presented in a
    mini-batch, and keeps forgetting events, learning time and cumulative loss.

    Run-directory output (see :mod:`gradsift.scores`):

    * ``dynamics/part-<epoch>.parquet``: ``example_id, epoch, loss, correct, margin, prob``
      (one row per presentation; ``prob`` = p(y|x)), one part per epoch;
    * ``scores.parquet`` columns ``label, loss, margin, cum_loss, forgetting_events,
      forgetting, learning_time`` (``loss``/``margin`` at the last presentation) and the
      Data Map's ``confidence, variability, correctness`` (:func:`data_map`), updated
      after every epoch.

    After training, :meth:`scores` returns the same columns as a DataFrame indexed by
    ``example_id``; :attr:`correct` / :attr:`losses` hold the ``[T, N]`` history.

    Outputs that are not classification logits ``[B, C]`` against labels ``[B]`` (a
    language model's ``[B, T, V]`` against tokens ``[B, T]``) have no correctness or
    margin: only the losses are recorded, and the scores are ``loss`` and ``cum_loss``.
    """

    def __init__(self) -> None:
        self.correct: list[np.ndarray] = []
        self.losses: list[np.ndarray] = []
        self.margins: list[np.ndarray] = []
        self.probs: list[np.ndarray] = []
        self._rows: list[pd.DataFrame] = []
        self.losses_only = False  # set at the first step whose outputs are not [B, C] logits

    def on_fit_begin(self, trainer: Trainer) -> None:
        self._slots: dict[int, int] | None = None
        if getattr(trainer, "data", True) is None:  # a Sifter without data=: learn the ids as they come
            self._slots = {}
            self.ids, self.labels = np.zeros(0, np.int64), np.zeros(0, np.int64)
        else:
            self.ids = trainer.ids.numpy()
            y = trainer.y
            self.labels = y.numpy() if y.ndim == 1 else np.full(len(self.ids), -1, np.int64)
        done = len(self.correct)  # epochs restored from a checkpoint
        if trainer.run is not None:
            trainer.run.drop_parts("dynamics", lambda label: int(label) <= done)

    def on_epoch_begin(self, trainer: Trainer, epoch: int) -> None:
        n = len(self.ids)
        self._epoch = (np.zeros(n, bool), np.full(n, np.nan), np.full(n, np.nan), np.zeros(n, bool),
                       np.full(n, np.nan))

    def _slots_of(self, step: StepInfo) -> np.ndarray:
        """Slots of the step's examples when the ids are learnt as they come (new ids get
        new slots; earlier epochs read as not seen for them)."""
        ids, targets = step.example_ids.tolist(), step.targets.detach().cpu().numpy()
        if targets.ndim != 1:  # token targets: no label per example
            targets = np.full(len(ids), -1, np.int64)
        new = [i for i in dict.fromkeys(ids) if i not in self._slots]
        if new:
            k = len(new)
            self._slots.update({i: len(self.ids) + j for j, i in enumerate(new)})
            first = {i: targets[j] for j, i in reversed(list(enumerate(ids)))}
            self.ids = np.concatenate([self.ids, np.asarray(new, np.int64)])
            self.labels = np.concatenate([self.labels, np.asarray([first[i] for i in new], np.int64)])
            pad = lambda a, v: np.concatenate([a, np.full(k, v, a.dtype)])  # noqa: E731
            self.correct = [pad(a, False) for a in self.correct]
            self.losses = [pad(a, np.nan) for a in self.losses]
            self.margins = [pad(a, np.nan) for a in self.margins]
            self.probs = [pad(a, np.nan) for a in self.probs]
            self._epoch = tuple(pad(a, v) for a, v in zip(self._epoch, (False, np.nan, np.nan, False, np.nan)))
        return np.asarray([self._slots[i] for i in ids], np.int64)

    def on_step(self, trainer: Trainer, step: StepInfo) -> None:
        pos = step.positions.numpy() if self._slots is None else self._slots_of(step)
        correct, loss, marg, seen, prob = self._epoch
        if step.outputs.ndim != 2 or step.targets.ndim != 1:
            self.losses_only = True
            loss[pos] = step.losses.detach().double().cpu().numpy()
            seen[pos] = True
            return
        with torch.no_grad():
            correct[pos] = (step.outputs.argmax(1) == step.targets).numpy()
            loss[pos] = step.losses.double().numpy()
            marg[pos] = _margin(step.outputs, step.targets).double().numpy()
            prob[pos] = step.outputs.double().softmax(-1).gather(1, step.targets[:, None]).squeeze(1).numpy()
        seen[pos] = True

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> dict:
        correct, loss, marg, seen, prob = self._epoch
        self.correct.append(correct)
        self.losses.append(loss)
        self.margins.append(marg)
        self.probs.append(prob)
        if trainer.run is not None:
            part = pd.DataFrame({"example_id": self.ids[seen], "epoch": epoch, "loss": loss[seen],
                                 "correct": correct[seen], "margin": marg[seen], "prob": prob[seen]})
            trainer.run.append_table("dynamics", part, epoch)
            trainer.run.write_scores(self.scores())
        return {"forgotten": int((self.correct[-2] & ~correct).sum()) if len(self.correct) > 1 else 0}

    def scores(self) -> pd.DataFrame:
        """Per-example scores so far, indexed by ``example_id``."""
        c = np.stack(self.correct)
        lo = np.stack(self.losses)
        if self.losses_only:
            return pd.DataFrame({"loss": lo[-1], "cum_loss": np.nansum(lo, 0)},
                                index=pd.Index(self.ids, name="example_id"))
        conf, var, corr = data_map(np.stack(self.probs), c)
        return pd.DataFrame({
            "label": self.labels, "loss": lo[-1], "margin": self.margins[-1],
            "cum_loss": np.nansum(lo, 0), "forgetting_events": forgetting_events(c),
            "forgetting": forgetting_score(c), "learning_time": learning_time(c),
            "confidence": conf, "variability": var, "correctness": corr,
        }, index=pd.Index(self.ids, name="example_id"))

    def state_dict(self) -> dict:
        return {"correct": list(self.correct), "losses": list(self.losses), "margins": list(self.margins),
                "probs": list(self.probs), "losses_only": self.losses_only}

    def load_state_dict(self, state: dict) -> None:
        self.correct, self.losses, self.margins = (list(state[k]) for k in ("correct", "losses", "margins"))
        # checkpoints from before the Data Map columns: no probabilities for those epochs
        self.probs = list(state.get("probs", [np.full(len(c), np.nan) for c in self.correct]))
        self.losses_only = bool(state.get("losses_only", False))


def dynamics_recorder(settings=None) -> DynamicsRecorder:
    """The registry's factory for the training-dynamics scores (one recorder serves all)."""
    return DynamicsRecorder()


for _name, _harder, _what in (
    ("forgetting", True, "forgetting events; T (epochs) if never learned (Toneva et al.)"),
    ("loss", True, "loss at the last presentation"),
    ("cum_loss", True, "sum of the loss over all presentations (memorization proxy)"),
    ("learning_time", True, "first epoch from which it stays correct (T+1: not learned)"),
    ("margin", False, "p_y - max_{k!=y} p_k at the last presentation (low = suspect)"),
    ("forgetting_events", True, "correct -> wrong transitions"),
    ("confidence", False, "Data Map: mean p(y|x) over epochs (Swayamdipta et al.)"),
    ("variability", True, "Data Map: std of p(y|x) over epochs (high = ambiguous)"),
    ("correctness", False, "Data Map: fraction of epochs classified correctly"),
):
    register_score(_name, kind="recorder", make=dynamics_recorder, higher_is_harder=_harder, description=_what)
