"""Data-parallel training with a per-example view: :class:`DistributedTrainer`.

Every rank holds the model and the whole data set and draws the same global batches
(the sampler is seeded alike). Rank ``r`` computes the per-example gradients of its
contiguous slice of each global batch (:func:`~gradsift.distributed.comm.shard_bounds`);
:class:`~gradsift.distributed.reduce.GlobalAggregation` combines the slices into the
update one process would compute on the whole global batch; every rank applies it, so
the replicas stay equal (checked at every epoch end).

Recorders see the whole global batch on every rank (losses and outputs are gathered,
``B`` and ``B x C`` values a step; per-example gradients only when a recorder asks for
them, ``B x P``), so per-example tables are the single-process tables, each example once.
Only rank 0 writes the run directory (manifest, tables, checkpoints); on resume it reads
the checkpoint and sends it to the others, so no shared file system is needed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..data import Dataset
from ..recorders import StepInfo
from ..rundir import RunDirError
from ..sifter import Sifter
from ..train import FitResult, Trainer, evaluate_batches
from .comm import Comm, DistributedError, TorchComm, gather_rows, init_from_env, shard_bounds
from .reduce import MODES, Mode


class DistributedSifter(Sifter):
    """A :class:`~gradsift.sifter.Sifter` whose update is reduced across the ranks of
    ``comm`` (:func:`gradsift.aggregate.step_update` with ``comm`` and ``mode``) and whose
    recorders see the whole global batch on every rank."""

    exact_locally = False

    def __init__(self, model: nn.Module, *, comm: Comm, mode: Mode = "exact", **kwargs: Any):
        if mode not in MODES:
            raise DistributedError(f"distributed mode must be one of {', '.join(MODES)}, got '{mode}'")
        self.comm, self.mode = comm, mode
        super().__init__(model, **kwargs)
        if self.plugin is not None or self.aggregator.needs:
            what = "DP-SGD (privacy=)" if self.plugin is not None else (
                f"aggregator {self.aggregator.name}, which needs per-example {', '.join(self.aggregator.needs)}")
            raise DistributedError(f"{what} is not supported under torch.distributed yet; train in one process")
        self._out_shape: tuple[int, ...] | None = None

    def backward(self, inputs: Any, targets: Tensor, **kwargs: Any) -> Tensor:
        if hasattr(self.comm, "where"):
            self.comm.where = f"epoch {max(self.epoch, 1)}, step {self.step}"
        return super().backward(inputs, targets, **kwargs)

    def step_info(self, positions: Tensor, ids: Tensor, inputs: Any, targets: Tensor, losses: Tensor,
                  outputs: Tensor, grads: dict[str, Tensor] | None) -> StepInfo:
        sizes = self.comm.all_gather_object(int(len(positions)))
        if outputs.shape[0] == 0:
            outputs = outputs.new_zeros((0, *self.output_shape()))
        g = lambda t: gather_rows(self.comm, t, sizes)  # noqa: E731
        positions, ids = g(positions.to(self.device)).cpu(), g(ids.to(self.device)).cpu()
        losses, outputs = g(losses.reshape(-1)), g(outputs)
        grads = {n: g(v) for n, v in grads.items()} if (grads is not None and self.keep_grads) else None
        inputs = self.x[positions] if self.data is not None else inputs
        targets = self.y[positions].to(self.device) if self.data is not None else targets
        info = super().step_info(positions, ids, inputs, targets, losses, outputs, grads)
        info.grads = grads
        return info

    def output_shape(self) -> tuple[int, ...]:
        if self._out_shape is None:
            with torch.no_grad():
                self._out_shape = tuple(self.model(self.x[torch.arange(1)]).shape[1:]) if self.num_examples else ()
        return self._out_shape

    def map_examples(self, fn: Callable[[Tensor], Any]) -> Any:
        n, w = self.num_examples, self.comm.world_size
        bounds = shard_bounds(n, w)
        sizes = [hi - lo for lo, hi in bounds]
        lo, hi = bounds[self.comm.rank]
        dev = self.device
        out = self.data.map_positions(fn, torch.arange(lo, hi, device=dev)) if hi > lo else None
        parts = None if out is None else (out if isinstance(out, tuple) else (out,))
        desc = None if parts is None else (
            isinstance(out, tuple), [None if p is None else (tuple(p.shape[1:]), p.dtype) for p in parts])
        described = [d for d in self.comm.all_gather_object(desc) if d is not None]
        if not described:  # no examples at all
            return fn(torch.arange(0, device=dev))
        is_tuple, metas = described[0]
        parts = parts or [None] * len(metas)
        gathered = [
            None if meta is None else gather_rows(
                self.comm, p if p is not None else torch.zeros((0, *meta[0]), dtype=meta[1], device=dev), sizes)
            for p, meta in zip(parts, metas)
        ]
        return tuple(gathered) if is_tuple else gathered[0]


class DistributedTrainer(Trainer):
    """A :class:`~gradsift.train.Trainer` over the ranks of ``comm``.

    Args:
        comm: the process group; see :func:`~gradsift.distributed.comm.init_from_env`.
        mode: ``"exact"`` (the single-process result on the global batch) or ``"local"``
            (each rank aggregates its slice, then the results are averaged).
        Everything else as :class:`~gradsift.train.Trainer`; ``batch_size`` is the
        *global* batch size. The training set is a :class:`~gradsift.data.Dataset` or a
        torch ``Dataset`` (every rank holds it whole; not a ``DataLoader``).
    """

    def __init__(self, model: nn.Module, train: Any, test: Any = None, *,
                 comm: Comm, mode: Mode = "exact", run_dir: str | Path | None = None,
                 progress: bool | None = None, config: dict | None = None, **kwargs: Any):
        self.comm, self.mode = comm, mode
        self.rank0 = comm.rank == 0
        model.to(getattr(comm, "device", torch.device("cpu")))
        # the exact mode gives the one-process update: such a run resumes in one process too
        config = {**(config or {}), "world_size": comm.world_size, **({"dist_mode": mode} if mode != "exact" else {})}
        super().__init__(model, train, test, run_dir=run_dir if self.rank0 else None,
                         progress=progress if self.rank0 else False, config=config, **kwargs)
        if self.data.kind == "loader":
            raise DistributedError("fit_distributed takes a data set, not a DataLoader: every rank draws "
                                   "the same global batches and computes its shard")
        self.run_path = None if run_dir is None else Path(run_dir)
        self._check_same_data(train)

    def make_sifter(self, model: nn.Module, **kwargs: Any) -> Sifter:
        return DistributedSifter(model, comm=self.comm, mode=self.mode, **kwargs)

    # ------------------------------------------------------------------ setup checks
    def _check_same_data(self, train: Any) -> None:
        h = hashlib.sha1()
        if isinstance(train, Dataset):
            h.update(train.y.tobytes())
            h.update(train.example_ids.tobytes())
        else:
            h.update(self.data.ids.numpy().tobytes())
        mine = (len(self.data), h.hexdigest()[:16])
        every = self.comm.all_gather_object(mine)
        if any(v != every[0] for v in every):
            raise DistributedError(
                "the ranks were given different training sets (size, label/id digest per rank: "
                f"{every}); every rank must load the same data with the same seed"
            )

    def _sync_replicas(self) -> None:
        """Make every rank start from rank 0's parameters and buffers."""
        if isinstance(self.comm, TorchComm):
            self.comm.broadcast_(list(self.model.parameters()) + list(self.model.buffers()))
        else:
            state = self.comm.broadcast_object(self.model.state_dict())
            self.model.load_state_dict(state)

    def _check_replicas(self) -> None:
        with torch.no_grad():
            total = sum(float(p.double().sum()) for p in self.model.parameters())
        every = self.comm.all_gather_object(total)
        if any(v != every[0] for v in every):
            raise DistributedError(
                f"the model replicas diverged (parameter sums per rank: {every}); a rank "
                "applied a different update"
            )

    # ------------------------------------------------------------------ hooks
    def local_positions(self, positions: Tensor) -> Tensor:
        lo, hi = shard_bounds(len(positions), self.comm.world_size)[self.comm.rank]
        return positions[lo:hi]

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self._check_replicas()
        row: dict[str, float] = {}
        for prefix, data in (("train", self.data), ("test", self.test_data)):
            if data is None:
                continue
            lo, hi = shard_bounds(len(data), self.comm.world_size)[self.comm.rank]
            batches = (data.fetch(torch.arange(s, min(hi, s + 1024)))[2:] for s in range(lo, hi, 1024))
            r = evaluate_batches(self.model, self.loss_fn, batches, device=self.device)
            n = hi - lo
            s = self.comm.all_reduce_sum(torch.tensor([r["acc"] * n, r["loss"] * n, n], dtype=torch.float64))
            total = max(float(s[2]), 1.0)
            row[f"{prefix}_acc"] = round(float(s[0])) / total
            row[f"{prefix}_loss"] = float(s[1]) / total
        return row

    def start_run(self, *, resume: bool = False, overwrite: bool = False) -> bool:
        """Rank 0 starts the run directory (lock, checks, checkpoint); every rank gets the
        checkpoint, or the same error."""
        outcome: tuple = (None, None)
        if self.rank0 and self.run is not None:
            try:
                outcome = (self.sifter.start(resume=resume, overwrite=overwrite, seed=self.seed,
                                             n_train=len(self.data)), None)
            except RunDirError as e:
                outcome = (None, str(e))
        ckpt, error = self.comm.broadcast_object(outcome)
        if error is not None:
            raise RunDirError(error)
        if ckpt is None:
            return False
        self.load_state(ckpt)
        return True

    def fit(self, *, resume: bool = False, overwrite: bool = False) -> FitResult:
        try:
            self._sync_replicas()
            result = super().fit(resume=resume, overwrite=overwrite)
        except DistributedError as e:
            where = ""
            if self.run_path is not None:
                where = (f" Finished epochs are saved in {self.run_path}; run the same command "
                         "with --resume (fit(..., resume=True)) to continue from the last one.")
                if self.run is not None:
                    try:
                        self.run.update_manifest(status="failed", error=str(e))
                    except OSError:
                        pass
            raise DistributedError(f"{e}{where}") from e
        result.run_dir = self.run_path
        return result


def fit_distributed(
    model: nn.Module,
    train: Dataset,
    test: Dataset | None = None,
    *,
    comm: Comm | None = None,
    mode: Mode = "exact",
    backend: str = "auto",
    timeout_s: float = 300.0,
    resume: bool = False,
    overwrite: bool = False,
    **kwargs: Any,
) -> FitResult:
    """:func:`gradsift.fit` across the ranks of a ``torch.distributed`` job.

    Start it under ``torchrun``; every rank calls it with the same arguments::

        # torchrun --nproc-per-node 2 train.py
        comm = gs.distributed.init_from_env()          # gloo on CPU, nccl on GPUs
        result = gs.distributed.fit_distributed(model, train, test, comm=comm,
                                                aggregator="winsorize:c=5", batch_size=256)

    Args:
        comm: the process group; ``None`` joins the one torchrun describes
            (:func:`~gradsift.distributed.comm.init_from_env` with ``backend``, ``timeout_s``).
        mode: ``"exact"`` or ``"local"``; see :mod:`gradsift.distributed.reduce`.
        resume, overwrite, **kwargs: as :func:`gradsift.fit` (``batch_size`` is the global batch).

    Returns:
        The :class:`~gradsift.train.FitResult`, equal on every rank.

    Raises:
        DistributedError: a rank died or timed out (the message says where; finished
            epochs are in the run directory, resume from them).
    """
    comm = comm or init_from_env(backend, timeout_s)
    return DistributedTrainer(model, train, test, comm=comm, mode=mode, **kwargs).fit(resume=resume, overwrite=overwrite)
