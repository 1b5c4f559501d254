"""TracIn-style influence: gradient dot products summed over checkpoints.

For checkpoints ``t`` with learning rates ``lr_t``::

    self_influence(i)      = sum_t lr_t * ||g_t(z_i)||^2
    influence(i, test j)   = sum_t lr_t * g_t(z_i) . g_t(z'_j)

(Pruthi et al., "Estimating Training Data Influence by Tracing Gradient Descent").
High self-influence marks examples the model had to bend for: rare, atypical, mislabeled.
Positive train-test influence: training on ``z_i`` lowered the test loss of ``z'_j``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from ..engine import per_example
from ..train import Recorder, Trainer
from .registry import register_score

LossFn = Callable[[Tensor, Tensor], Tensor]


def _flat_grads(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor) -> Tensor:
    g = per_example(model, loss_fn, x, y).grads
    return torch.cat([v.flatten(1) for v in g.values()], 1)


def tracin_checkpoint(model: nn.Module, x: Tensor, y: Tensor, *, lr: float = 1.0,
                      x_test: Tensor | None = None, y_test: Tensor | None = None,
                      loss_fn: LossFn | None = None, chunk_size: int = 256) -> tuple[Tensor, Tensor | None]:
    """One checkpoint's TracIn terms.

    Args:
        model: the model at the checkpoint (evaluated in eval mode).
        x, y: ``[N, ...]``, ``[N]`` training examples.
        lr: the learning rate in effect at the checkpoint.
        x_test, y_test: ``[M, ...]``, ``[M]`` test examples, or ``None``.

    Returns:
        ``(lr * ||g_i||^2 [N], lr * g_i . g_test_j [N, M] or None)``.
    """
    loss_fn = loss_fn or nn.CrossEntropyLoss(reduction="none")
    was = model.training
    model.eval()
    try:
        g_test = None if x_test is None else _flat_grads(model, loss_fn, x_test, y_test)
        self_parts, cross_parts = [], []
        for s in range(0, len(x), chunk_size):
            g = _flat_grads(model, loss_fn, x[s : s + chunk_size], y[s : s + chunk_size])
            self_parts.append(lr * g.square().sum(1))
            if g_test is not None:
                cross_parts.append(lr * g @ g_test.T)
    finally:
        model.train(was)
    return torch.cat(self_parts), (torch.cat(cross_parts) if g_test is not None else None)


def tracin(checkpoints: Sequence[tuple[nn.Module, float]], x: Tensor, y: Tensor, *,
           x_test: Tensor | None = None, y_test: Tensor | None = None,
           loss_fn: LossFn | None = None) -> tuple[Tensor, Tensor | None]:
    """TracIn over ``checkpoints`` = ``[(model_t, lr_t), ...]``.

    Returns:
        ``(self_influence [N], influence [N, M] or None)``.
    """
    total_self, total_cross = None, None
    for model, lr in checkpoints:
        s, c = tracin_checkpoint(model, x, y, lr=lr, x_test=x_test, y_test=y_test, loss_fn=loss_fn)
        total_self = s if total_self is None else total_self + s
        if c is not None:
            total_cross = c if total_cross is None else total_cross + c
    if total_self is None:
        raise ValueError("no checkpoints given")
    return total_self, total_cross


class TracInRecorder(Recorder):
    """Adds each epoch's end as a TracIn checkpoint during :func:`gradsift.fit`.

    Run-directory output: ``scores.parquet`` column ``self_influence`` (and
    ``test_influence``, the sum over the chosen test examples, when ``test_x`` is given),
    and ``influence.parquet`` with ``example_id, test_id, influence`` rows (one per pair).

    Args:
        test_x, test_y: ``[M, ...]``, ``[M]`` test examples to trace, or ``None``.
        test_ids: ``[M]`` ids for them (default ``0..M-1``).
    """

    def __init__(self, test_x: Tensor | None = None, test_y: Tensor | None = None,
                 test_ids: Sequence[int] | None = None):
        self.test_x, self.test_y = test_x, test_y
        self.test_ids = None if test_x is None else np.asarray(
            test_ids if test_ids is not None else np.arange(len(test_x)), dtype=np.int64)
        self.self_influence: Tensor | None = None
        self.influence: Tensor | None = None
        self.example_ids: np.ndarray | None = None

    def on_fit_begin(self, trainer: Trainer) -> None:
        self.example_ids = trainer.ids.numpy()

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        lr = float(trainer.optimizer.param_groups[0]["lr"])
        # map_examples: under torch.distributed each rank scores its shard of the data
        s, c = trainer.map_examples(lambda pos: tracin_checkpoint(
            trainer.model, trainer.x[pos], trainer.y[pos], lr=lr, x_test=self.test_x,
            y_test=self.test_y, loss_fn=trainer.loss_fn))
        self.self_influence = s if self.self_influence is None else self.self_influence + s
        if c is not None:
            self.influence = c if self.influence is None else self.influence + c
        if trainer.run is not None:
            trainer.run.write_scores(self.scores(trainer.ids.numpy()))
            if self.influence is not None:
                trainer.run.write_table("influence", self.influence_table(trainer.ids.numpy()))

    def scores(self, example_ids: np.ndarray | None = None) -> pd.DataFrame:
        """``self_influence`` (and ``test_influence``) indexed by ``example_id``
        (default: the ids of the training set seen by :func:`gradsift.fit`)."""
        example_ids = self.example_ids if example_ids is None else example_ids
        cols = {"self_influence": self.self_influence.numpy()}
        if self.influence is not None:
            cols["test_influence"] = self.influence.sum(1).numpy()
        return pd.DataFrame(cols, index=pd.Index(example_ids, name="example_id"))

    def influence_table(self, example_ids: np.ndarray) -> pd.DataFrame:
        """Long table ``example_id, test_id, influence`` (``N * M`` rows)."""
        n, m = self.influence.shape
        return pd.DataFrame({"example_id": np.repeat(example_ids, m), "test_id": np.tile(self.test_ids, n),
                             "influence": self.influence.flatten().numpy()})

    def state_dict(self) -> dict:
        return {"self_influence": self.self_influence, "influence": self.influence}

    def load_state_dict(self, state: dict) -> None:
        self.self_influence, self.influence = state["self_influence"], state["influence"]


def tracin_recorder(settings=None) -> TracInRecorder:
    """The registry's factory for ``self_influence`` (no test examples)."""
    return TracInRecorder()


register_score("self_influence", kind="recorder", make=tracin_recorder,
               description="TracIn sum_t lr_t ||g_t(z_i)||^2 over epoch-end checkpoints")
