"""Scale out: training across processes and machines with ``torch.distributed``.

* :func:`fit_distributed` / :class:`DistributedTrainer`: data-parallel training in which
  each rank computes the per-example gradients of its slice of the global batch and the
  aggregators (mean, clip, winsorize, M3, trimmed mean, median, ...) combine the slices
  exactly as one process would (:mod:`.reduce` documents what each one sends);
* :func:`init_from_env`: join the process group ``torchrun`` describes (gloo on CPU, nccl
  on GPUs) with a timeout, so a dead rank makes the job fail instead of hang;
* :class:`Comm` / :class:`TorchComm`: the four collectives gradsift uses.

``gradsift train`` switches to this path by itself when started by ``torchrun``.
"""

from .comm import (
    Comm,
    DistributedError,
    TorchComm,
    gather_rows,
    init_from_env,
    launched_by_torchrun,
    shard_bounds,
)
from .reduce import GlobalAggregation
from .trainer import DistributedTrainer, fit_distributed

__all__ = [
    "Comm", "DistributedError", "TorchComm", "gather_rows", "init_from_env",
    "launched_by_torchrun", "shard_bounds", "GlobalAggregation", "DistributedTrainer",
    "fit_distributed",
]
