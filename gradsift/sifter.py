"""The per-example view inside any training loop: :class:`Sifter`.

Replace ``loss.backward()`` with ``sifter.backward(...)``::

    train = gs.data.indexed(torch_dataset)      # items (example_id, inputs, target)
    loader = DataLoader(train, batch_size=128, shuffle=True)
    with gs.Sifter(model, loss_fn, aggregator="winsorize:c=3",
                   recorders=[gs.DynamicsRecorder()], run_dir="runs/own") as sifter:
        for epoch in range(epochs):
            for ids, x, y in loader:
                losses = sifter.backward(x.to(dev), y.to(dev), ids=ids)  # [B]; update in .grad
                optimizer.step(); optimizer.zero_grad()
            sifter.end_epoch()

A step computes per-example gradients only when the aggregator or a recorder needs them
(``mean`` with no such recorder is one plain backward pass), aggregates them (layer by
layer with ``fuse=True`` where nothing needs them whole), writes the update to ``.grad``
and shows the step to the recorders. :func:`gradsift.fit` is a loop over a Sifter.

Plug-ins such as DP-SGD (:class:`gradsift.privacy.PrivacyPlan`) come in as ``privacy=``:
an object that supplies an aggregator (``aggregator()``), a recorder (``recorder()``) and
checks of the model and sampler (``check(model, aggregator=..., sampler=...)``); this
module does not import them.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import pandas as pd
import torch
from torch import Tensor, nn

from . import aggregate as agg_mod
from .aggregate import Aggregator, aggregator_from_spec
from .data.sources import Examples, batch_size_of, examples, to_device
from .engine import check_per_example_safe, trainable_parameters
from .errors import GradsiftError
from .inputs import select
from .losses import logits_of
from .recorders import Recorder, StepInfo
from .rundir import RunDir, fingerprint

__all__ = ["Sifter", "Plugin", "call_model", "PRECISIONS"]

LossFn = Callable[[Tensor, Tensor], Tensor]

#: ``precision=`` values: full precision, or bfloat16 autocast.
PRECISIONS = ("fp32", "bf16")


class Plugin(Protocol):
    """What ``privacy=`` (or any training plug-in) supplies; e.g.
    :class:`gradsift.privacy.PrivacyPlan`."""

    #: take a step on an empty batch (an empty Poisson batch is a step of DP-SGD)
    step_on_empty: bool

    def check(self, model: nn.Module, *, aggregator: Any, sampler: Any) -> None: ...

    def aggregator(self) -> Aggregator: ...

    def recorder(self) -> Recorder: ...


def call_model(model: nn.Module, inputs: Any) -> Tensor:
    """``model(inputs)``; a dict of inputs is passed as keyword arguments and a tuple as
    positional ones."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def autocast(precision: str | None, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context for ``precision`` (``"bf16"``) on ``device``; a no-op for
    ``None``/``"fp32"``."""
    if precision in (None, "fp32"):
        return contextlib.nullcontext()
    if precision != "bf16":
        raise GradsiftError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise GradsiftError("precision='bf16': this GPU does not support bfloat16; use precision='fp32'")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def data_identity(data: Examples) -> str:
    """A fingerprint of a data set for manifests: the hash of the arrays of a data set held
    in memory, else its type and size."""
    if data.kind == "memory":
        return fingerprint(data.source)
    try:
        size = str(len(data))
    except TypeError:
        size = "?"
    return f"{type(data.dataset).__name__}[{size}]"


class Sifter:
    """Per-example gradients, aggregation, recorders and a run directory for one training
    run, stepped by any loop.

    Args:
        model: any ``nn.Module``.
        loss_fn: per-example loss ``(outputs, targets) -> [B]`` (default cross-entropy).
        aggregator: an :class:`~gradsift.aggregate.Aggregator` or spec (``"winsorize:c=3"``);
            ``None`` or ``"mean"``: the plain mean gradient.
        recorders: :class:`~gradsift.recorders.Recorder` objects; they see every step.
        run_dir: where to write the manifest, ``metrics.parquet``, recorder tables and
            checkpoints (``None``: nowhere).
        privacy: a plug-in (see :class:`Plugin`), e.g. a
            :class:`~gradsift.privacy.PrivacyPlan`: it sets the aggregator and adds its
            recorder; it checks the model and ``sampler``.
        data: the training set (a :class:`~gradsift.data.Dataset`, torch ``Dataset`` or
            ``DataLoader``), for recorders that read the whole set (coherence probes,
            TracIn) and for the sampler check; optional.
        sampler: what draws the batches (a gradsift sampler or a ``DataLoader``), for the
            plug-in's check (default: ``data`` when it is a ``DataLoader``).
        optimizer: the optimizer stepping the model, for the ``lr`` the recorders and
            metrics see and for checkpoints; optional.
        on_nonfinite: ``"raise"`` or ``"drop"`` examples whose gradient is NaN/inf.
        chunk_size: per-example engine chunk size (``None``: from a memory bound).
        fuse: aggregate layer by layer where nothing needs the per-example gradients.
        precision: ``"fp32"`` (default) or ``"bf16"`` (autocast of the forward pass).
        epochs: planned epochs, if known (recorders may read it).
        config: extra manifest fields.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None = None,
        *,
        aggregator: Aggregator | str | None = "mean",
        recorders: Sequence[Recorder] = (),
        run_dir: str | Path | None = None,
        privacy: Plugin | None = None,
        data: Any = None,
        sampler: Any = None,
        optimizer: torch.optim.Optimizer | None = None,
        on_nonfinite: str = "raise",
        chunk_size: int | None = None,
        fuse: bool = False,
        precision: str | None = None,
        epochs: int | None = None,
        config: dict | None = None,
    ):
        if on_nonfinite not in ("raise", "drop"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'drop', got '{on_nonfinite}'")
        if precision not in (None, *PRECISIONS):
            raise GradsiftError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.model = model
        self.loss_fn = loss_fn or nn.CrossEntropyLoss(reduction="none")
        self.data: Examples | None = None if data is None else examples(data)
        self.optimizer, self.chunk_size, self.precision, self.epochs = optimizer, chunk_size, precision, epochs
        self.config = dict(config or {})
        self.privacy_report: dict | None = None  # kept current by a privacy recorder
        self.step_on_empty = False
        self.plugin = privacy
        aggregator = "mean" if aggregator is None else aggregator
        recorders = list(recorders)
        if privacy is not None:
            if sampler is None and self.data is not None and self.data.kind == "loader":
                sampler = self.data.source
            privacy.check(model, aggregator=aggregator, sampler=sampler)
            aggregator = privacy.aggregator()
            recorders.append(privacy.recorder())
            self.step_on_empty = bool(getattr(privacy, "step_on_empty", True))
        self.aggregator = aggregator_from_spec(aggregator) if isinstance(aggregator, str) else aggregator
        if self.aggregator.output != "batch":
            raise ValueError(
                f"aggregator {self.aggregator.name} gives per-example gradients; chain a reducer "
                "such as gs.aggregate.mean() after it"
            )
        if on_nonfinite == "drop" and self.aggregator.input == "per_example":
            self.aggregator = agg_mod.chain(agg_mod.drop_nonfinite(), self.aggregator)
        self.recorders = recorders
        self.run = RunDir(run_dir) if run_dir is not None else None
        self.agg_state = self.aggregator.init(
            {n: p.detach() for n, p in trainable_parameters(model).items()})
        self.keep_grads = any(r.needs_per_example_grads for r in self.recorders)
        # plain mean: the mean gradient by one ordinary backward pass
        self.plain_mean = self.aggregator.kind == "mean" and not self.aggregator.parts
        self.needs_per_example = self.keep_grads or (self.aggregator.needs_per_example and not self.plain_mean)
        # Layer-by-layer aggregation when nothing needs the per-example gradients whole:
        # no recorder asks for them, the aggregator takes no side inputs, no plug-in.
        self.fused = (
            fuse and self.aggregator.input == "per_example" and not self.keep_grads
            and not self.aggregator.needs and privacy is None and self.exact_locally
        )
        if self.needs_per_example:
            check_per_example_safe(model)
        self.step = 0
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self._opened = self._closed = False
        self._epoch_row: dict[str, Any] | None = None
        self._stream = 0  # position of the next example in this epoch, when ids are not given

    #: whether :meth:`aggregate` / :meth:`aggregate_batch` are the single-process ones
    #: (a distributed Sifter reduces across ranks and cannot fuse yet)
    exact_locally = True

    # ------------------------------------------------------------ the data set, if known
    def _need_data(self, what: str) -> Examples:
        if self.data is None:
            raise GradsiftError(
                f"{what} needs the training set: pass Sifter(..., data=train) (gs.fit does this)"
            )
        return self.data

    @property
    def num_examples(self) -> int:
        """``N``, the size of the training set."""
        return len(self._need_data("num_examples"))

    @property
    def ids(self) -> Tensor:
        """``[N]`` example ids of the training set, in position order."""
        return self._need_data("ids").ids

    @property
    def y(self) -> Tensor:
        """``[N]`` targets of the training set (on the CPU)."""
        return self._need_data("y").y

    @property
    def x(self) -> Any:
        """Training inputs, indexable by a ``[b]`` position tensor."""
        data = self._need_data("x")
        return data.x.to(self.device) if data.kind == "memory" else _OnDevice(data.x, self.device)

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def map_examples(self, fn: Callable[[Tensor], Any]) -> Any:
        """Per-example values over the whole training set: ``fn(positions [b])`` returns
        a ``[b, ...]`` tensor (or a tuple of them, ``None`` allowed); the result holds the
        values of all ``N`` examples in position order (computed in chunks for data not
        held in memory; split across ranks under torch.distributed)."""
        data = self._need_data("map_examples")
        return data.map_positions(fn, torch.arange(len(data), device=self.device))

    # ------------------------------------------------------------ life cycle
    def run_config(self) -> dict[str, Any]:
        """What determines the results, written to the manifest and checked on resume
        (:meth:`gradsift.rundir.RunDir.start`): the ``config`` given (a trainer's optimizer,
        epochs, batch size, seed, ...), the aggregator, the training data's fingerprint, the
        model's parameter shapes and the privacy plugin."""
        return {
            "privacy": None if self.plugin is None else repr(self.plugin),  # a trainer gives its declaration
            **self.config, "aggregator": self.aggregator.name,
            "data": None if self.data is None else data_identity(self.data),
            "model": fingerprint(*(f"{n}:{tuple(t.shape)}" for n, t in self.model.state_dict().items())),
        }

    def start(self, *, resume: bool = False, overwrite: bool = False, **manifest: Any) -> dict | None:
        """Begin writing the run directory: take its lock and check it holds no other run
        (:meth:`RunDir.start <gradsift.rundir.RunDir.start>` with :meth:`run_config`);
        returns the checkpoint to continue from when ``resume``. Done by :meth:`open` if
        not called before it; the lock is released by :meth:`close`."""
        if self.run is None or self.run.locked:
            return None
        return self.run.start(self.run_config(), resume=resume, overwrite=overwrite, **manifest)

    def open(self, **manifest: Any) -> "Sifter":
        """Start the run: :meth:`start` it (if not done) and call the recorders'
        ``on_fit_begin`` (done by ``with`` or the first :meth:`backward`)."""
        if self._opened:
            return self
        self._opened = True
        if self.run is not None and not self.run.locked:
            self.start(**manifest)
        for r in self.recorders:
            r.on_fit_begin(self)
        return self

    def begin_epoch(self) -> dict[str, Any]:
        """Start the next epoch (done by the first :meth:`backward` after
        :meth:`end_epoch`); returns the recorders' epoch-begin metrics."""
        self.open()
        if self._epoch_row is not None:
            return self._epoch_row
        self.epoch += 1
        self._stream = 0
        row: dict[str, Any] = {"epoch": self.epoch}
        for r in self.recorders:
            row.update(r.on_epoch_begin(self, self.epoch) or {})
        self._epoch_row = row
        return row

    def end_epoch(self, **metrics: Any) -> dict[str, Any]:
        """End the epoch for the recorders; ``metrics`` (e.g. test accuracy) join the
        epoch's row, which is appended to :attr:`history` and ``metrics.parquet``.

        Returns:
            The row: ``epoch``, recorder metrics, ``step``, ``lr`` (with an optimizer),
            ``metrics``.
        """
        row = dict(self.begin_epoch())
        row["step"] = self.step
        if self.optimizer is not None:
            row["lr"] = float(self.optimizer.param_groups[0]["lr"])
        row.update(metrics)
        for r in self.recorders:
            row.update(r.on_epoch_end(self, self.epoch) or {})
        self.history.append(row)
        self._epoch_row = None
        if self.run is not None:
            self.run.write_table("metrics", pd.DataFrame(self.history))
        for r in self.recorders:
            logged = getattr(r, "on_epoch_logged", None)
            if logged is not None:
                logged(self, row)
        return row

    def close(self, **manifest: Any) -> None:
        """End the run: the recorders' ``on_fit_end``; the manifest says ``finished``."""
        if self._closed:
            return
        self.open()
        self._closed = True
        for r in self.recorders:
            r.on_fit_end(self)
        if self.run is not None:
            self.run.update_manifest(status="finished", **manifest)
            self.run.unlock()

    def __enter__(self) -> "Sifter":
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self.run is not None:
            with contextlib.suppress(OSError):
                self.run.update_manifest(status="failed", error=f"{exc_type.__name__}: {exc}")
            self.run.unlock()

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """What resuming needs besides model and optimizer: step, epoch, aggregator state,
        history and the recorders' state."""
        return {"epoch": self.epoch, "step": self.step, "agg_state": self.agg_state,
                "history": list(self.history), "recorders": [r.state_dict() for r in self.recorders]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.agg_state = state["agg_state"]
        self.history = list(state["history"])
        for r, s in zip(self.recorders, state["recorders"]):
            r.load_state_dict(s)

    # ------------------------------------------------------------ one step
    def backward(self, inputs: Any, targets: Tensor, *, ids: Tensor | None = None,
                 positions: Tensor | None = None) -> Tensor:
        """Compute the aggregated gradient of the batch and leave it in ``.grad``.

        Args:
            inputs: ``[B, ...]`` tensor, or a tuple / dict of them (on the model's device).
            targets: ``[B]`` (or ``[B, ...]`` for the loss) targets.
            ids: ``[B]`` example ids, the keys of every per-example table (default: the
                examples' order in the epoch).
            positions: ``[B]`` positions in ``data`` (default: looked up from ``ids`` when
                the Sifter has ``data``, else ``ids``).

        Returns:
            ``[B]`` per-example losses (detached).
        """
        self.begin_epoch()
        b = 0 if inputs is None else batch_size_of(inputs, targets)
        if ids is None:
            ids = torch.arange(self._stream, self._stream + b)
        ids = torch.as_tensor(ids, dtype=torch.int64).cpu()
        if positions is None:
            positions = ids if self.data is None else self.data.positions_of(ids)
        positions = torch.as_tensor(positions, dtype=torch.int64).cpu()
        self._stream += b
        with autocast(self.precision, self.device):
            update, losses, outputs, grads = self._compute(inputs, targets, b, positions, ids)
        agg_mod.write_grads(self.model, update)
        if self.recorders:
            info = self.step_info(positions, ids, inputs, targets, losses, outputs, grads)
            for r in self.recorders:
                r.on_step(self, info)
        self.step += 1
        return losses

    def _compute(self, x: Any, y: Tensor, b: int, positions: Tensor, ids: Tensor):
        """-> (update, losses [b], outputs [b, ...], per-example grads or None), by the one
        step path every loop takes, :func:`gradsift.aggregate.step_update`: a plain
        backward for ``mean``, layer by layer with ``fuse=True`` where nothing needs the
        per-example gradients whole, else materialized; exact across ranks with
        :attr:`comm`."""
        if x is None:  # an empty batch fetched without inputs (an empty Poisson batch or shard)
            x, y = self._empty_batch()
        r = agg_mod.step_update(
            self.model, self.loss_fn, x, y, self.aggregator, self.agg_state, keep_grads=self.keep_grads,
            comm=self.comm, mode=self.mode, chunk_size=self.chunk_size,
            layerwise=self.fused or (self.plain_mean and not self.keep_grads),
            positions=positions, example_ids=ids)
        self.agg_state = r.state
        outputs = r.outputs if isinstance(r.outputs, Tensor) else logits_of(r.outputs)
        return r.update, r.losses, outputs, (r.grads if self.keep_grads else None)

    def _empty_batch(self) -> tuple[Any, Tensor]:
        """Zero rows of the training set's inputs and targets (one example fetched for
        their form), for a step on an empty batch given without inputs."""
        data = self._need_data("a step on an empty batch given as inputs=None")
        if len(data) == 0:
            raise GradsiftError("a step on an empty batch needs inputs with 0 rows (the training set is empty)")
        one = self.x[torch.arange(1)]
        return select(one, slice(0, 0)), self.y[:0].to(self.device)

    #: the process group of a distributed Sifter (``None``: this process alone) and its
    #: mode (see :func:`gradsift.aggregate.step_update`)
    comm: Any = None
    mode: str = "exact"

    def step_info(self, positions: Tensor, ids: Tensor, inputs: Any, targets: Tensor, losses: Tensor,
                  outputs: Tensor, grads: dict[str, Tensor] | None) -> StepInfo:
        """What recorders see: the batch with the losses, outputs and per-example
        gradients computed for it."""
        lr = float(self.optimizer.param_groups[0]["lr"]) if self.optimizer is not None else float("nan")
        return StepInfo(epoch=self.epoch, step=self.step, positions=positions, example_ids=ids,
                        inputs=inputs, targets=targets, losses=losses, outputs=outputs,
                        grads=grads if self.keep_grads else None, lr=lr)


class _OnDevice:
    """``view[positions]`` moved to ``device`` (for inputs fetched on demand)."""

    def __init__(self, view: Any, device: torch.device):
        self.view, self.device = view, device

    def __len__(self) -> int:
        return len(self.view)

    def __getitem__(self, positions: Tensor) -> Any:
        return to_device(self.view[positions.cpu()], self.device)

