"""gradsift: the per-example view of training.

Five-line example::

    import torch, gradsift as gs
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    grads = gs.per_example_gradients(model, loss_fn, x, y)   # name -> [32, *param.shape]
    print(gs.coherence(grads)["m_coherence"])
"""

from . import aggregate, layers, losses
from .coherence import coherence
from .engine import (
    per_example,
    per_example_gradients,
    per_example_losses,
    per_example_norms,
)
from .errors import DataError, GradsiftError, NonFiniteGradientError, SpecError, UnsupportedModelError

from .version import __version__

__all__ = [
    "aggregate", "coherence", "layers", "losses", "per_example", "per_example_gradients", "per_example_losses",
    "per_example_norms", "DataError", "GradsiftError", "NonFiniteGradientError", "SpecError",
    "UnsupportedModelError", "__version__",
]

from . import data, distributed, models  # noqa: E402
from .recorders import CoherenceRecorder, TensorBoardRecorder  # noqa: E402
from .sifter import Sifter  # noqa: E402
from .train import FitResult, Recorder, Trainer, fit  # noqa: E402

__all__ += ["data", "distributed", "models", "CoherenceRecorder", "FitResult", "Recorder", "Sifter", "TensorBoardRecorder", "Trainer", "fit"]

from . import backends, ensemble, scores  # noqa: E402
from .rundir import Run, open_run  # noqa: E402
from .scores import AUMRecorder, DynamicsRecorder, TracInRecorder  # noqa: E402

__all__ += ["backends", "ensemble", "scores", "Run", "open_run", "AUMRecorder", "DynamicsRecorder", "TracInRecorder"]

from . import actions  # noqa: E402
from .actions import reweight, select  # noqa: E402
from .audit import audit  # noqa: E402
from .label_issues import find_label_issues, label_issue_scores  # noqa: E402

__all__ += ["actions", "audit", "reweight", "select", "find_label_issues", "label_issue_scores"]

from . import optim, privacy, sampling  # noqa: E402
from .aggregate import masking, sven  # noqa: E402

__all__ += ["masking", "optim", "privacy", "sampling", "sven"]
