"""gradsift: the per-example view of training.

Five-line example::

    import torch, gradsift as gs
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    grads = gs.per_example_gradients(model, loss_fn, x, y)   # name -> [32, *param.shape]
    print(gs.coherence(grads)["m_coherence"])
"""

from . import (
    actions, aggregate, backends, data, distributed, ensemble, layers, losses, models, optim,
    privacy, sampling, scores, workspace,
)
from .actions import reweight, select
from .aggregate import masking, sven
from .audit import audit
from .coherence import coherence
from .engine import per_example, per_example_gradients, per_example_losses, per_example_norms
from .errors import DataError, GradsiftError, NonFiniteGradientError, SpecError, UnsupportedModelError
from .label_issues import find_label_issues, label_issue_scores
from .recorders import CoherenceRecorder, Recorder, TensorBoardRecorder
from .rundir import Run, open_run
from .scores import AUMRecorder, DynamicsRecorder, TracInRecorder
from .sifter import Sifter
from .train import FitResult, Trainer, fit
from .version import __version__
from .workspace import Workspace

__all__ = [
    # modules
    "actions", "aggregate", "backends", "data", "distributed", "ensemble", "layers", "losses",
    "masking", "models", "optim", "privacy", "sampling", "scores", "sven", "workspace",
    # per-example engine and coherence
    "Workspace", "coherence", "per_example", "per_example_gradients", "per_example_losses",
    "per_example_norms",
    # training
    "FitResult", "Sifter", "Trainer", "fit",
    # recorders and scores
    "AUMRecorder", "CoherenceRecorder", "DynamicsRecorder", "Recorder", "TensorBoardRecorder",
    "TracInRecorder",
    # data actions and audits
    "audit", "find_label_issues", "label_issue_scores", "reweight", "select",
    # run directories
    "Run", "open_run",
    # errors
    "DataError", "GradsiftError", "NonFiniteGradientError", "SpecError", "UnsupportedModelError",
    "__version__",
]
