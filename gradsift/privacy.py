"""Differentially private SGD: clipping, Gaussian noise, Poisson sampling, accounting.

The mechanism (Abadi et al. 2016; the same as Opacus). At step t a batch ``B_t`` is drawn
by Poisson sampling with rate ``q`` (:mod:`gradsift.sampling`), expected size
``L = q N``. Each per-example gradient is clipped to norm at most ``C``::

    g~_i = g_i * min(1, C / (||g_i|| + 1e-6))                      (flat clipping)
    g~_i[layer] = g_i[layer] * min(1, (C/sqrt(K)) / ||g_i[layer]||)  (per-layer, K layers)

so adding or removing one example changes ``sum_i g~_i`` by at most ``C`` (sensitivity C,
both ways). The released update is::

    u_t = ( sum_{i in B_t} g~_i  +  N(0, sigma^2 C^2 I) ) / L
        =   sum_{i in B_t} g~_i / L  +  N(0, (sigma C / L)^2 I)

Opacus adds ``N(0, sigma^2 C^2)`` to the *sum* and divides by the *expected* batch size
``L``; gradsift does the same in two aggregators, defined with the others in
:mod:`gradsift.aggregate.dp` and re-exported here: :func:`normalized_sum` (``sum / L``)
and :func:`gaussian_noise` (adds standard deviation ``sigma C / L`` per coordinate).
Dividing by the expected rather than the actual batch size matters: the actual size
depends on the data and is not part of the analysed mechanism. Empty batches still take
a step (pure noise), also as analysed. :func:`dp_sgd` chains everything.

Accounting is never done here by hand: :func:`epsilon` and :func:`noise_multiplier_for`
call Opacus's accountants (``"rdp"``: Rényi DP of the subsampled Gaussian, Mironov et al.;
``"prv"``: privacy random variables, Gopi et al.) and
``opacus.accountants.utils.get_noise_multiplier``.

Training: ``gs.fit(..., privacy=gs.privacy.DPSGD(delta=1e-5, target_epsilon=3.0))``
plans sigma for the planned steps, uses Poisson sampling, refuses models and samplers
that would break the guarantee (:func:`check_private_model`, :func:`check_sampler`),
and records epsilon, delta, sigma, C, q and steps in the run manifest and history.

Random numbers: noise comes from PyTorch's generator (not a cryptographically secure
one; neither is Opacus's default). With ``seed=None`` every step draws a fresh seed from
:mod:`secrets`; a fixed ``seed`` makes runs reproducible, for tests and research only.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from .aggregate import Aggregator
from .aggregate.dp import dp_sgd, gaussian_noise, normalized_sum, require_all_parameters
from .engine import check_per_example_safe
from .errors import GradsiftError, UnsupportedModelError
from .sampling import declared_sampling, poisson_batches, steps_per_epoch
from .recorders import Recorder

__all__ = [
    "normalized_sum", "gaussian_noise", "require_all_parameters", "dp_sgd", "epsilon",
    "noise_multiplier_for", "DPSGD", "PrivacyPlan", "PrivacyRecorder", "check_private_model",
    "check_sampler", "PrivacyConfigError", "ACCOUNTANTS",
]

#: Accountants available by name (Opacus implementations).
ACCOUNTANTS = ("rdp", "prv")


class PrivacyConfigError(GradsiftError, ValueError):
    """A configuration that would silently break the differential-privacy guarantee."""


# ---------------------------------------------------------------- accounting

def _accountant(name: str):
    from opacus.accountants import create_accountant

    if name not in ACCOUNTANTS:
        raise PrivacyConfigError(f"unknown accountant '{name}': use one of {', '.join(ACCOUNTANTS)}")
    return create_accountant(mechanism=name)


@functools.lru_cache(maxsize=1024)
def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
            *, accountant: str = "rdp") -> float:
    """Epsilon spent by ``steps`` steps of the Poisson-subsampled Gaussian mechanism.

    Computed by Opacus's accountant (``"rdp"`` or ``"prv"``) from its history
    ``[(sigma, q, steps)]``; 0 for no steps, ``inf`` for sigma = 0. Results are cached.
    """
    _check_delta(delta)
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    acc = _accountant(accountant)
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    return float(acc.get_epsilon(delta=delta))


def noise_multiplier_for(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                         *, accountant: str = "rdp", epsilon_tolerance: float = 0.01) -> float:
    """Smallest sigma (to ``epsilon_tolerance``) whose epsilon after ``steps`` is at most
    ``target_epsilon``: ``opacus.accountants.utils.get_noise_multiplier``."""
    from opacus.accountants.utils import get_noise_multiplier

    _check_delta(delta)
    if not target_epsilon > 0:
        raise PrivacyConfigError(f"target_epsilon must be > 0, got {target_epsilon}")
    if steps < 1:
        raise PrivacyConfigError(f"steps must be >= 1, got {steps}")
    _accountant(accountant)
    return float(get_noise_multiplier(
        target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
        steps=int(steps), accountant=accountant, epsilon_tolerance=epsilon_tolerance,
    ))


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise PrivacyConfigError(f"delta must be in (0, 1), got {delta}")


# ---------------------------------------------------------------- checks

def check_private_model(model: nn.Module) -> None:
    """Refuse models that break per-example privacy.

    * BatchNorm in training mode mixes the examples of a batch (no per-example gradient).
    * Any norm layer that tracks running statistics in training mode (e.g.
      ``InstanceNorm(track_running_stats=True)``) writes statistics of private data
      into buffers that are released without noise.

    Raises:
        PrivacyConfigError: naming the layer and the fix.
    """
    try:
        check_per_example_safe(model)
    except UnsupportedModelError as e:
        raise PrivacyConfigError(f"DP-SGD refuses this model: {e}") from None
    for name, m in model.named_modules():
        if (isinstance(m, nn.modules.batchnorm._NormBase) and m.training
                and getattr(m, "track_running_stats", False)):
            raise PrivacyConfigError(
                f"DP-SGD refuses layer '{name}' ({type(m).__name__}): it updates running "
                "statistics from private examples without noise. Use track_running_stats=False, "
                "nn.GroupNorm or nn.LayerNorm."
            )


def check_sampler(sampler: object, sample_rate: float) -> None:
    """Refuse a sampler / loader that does not Poisson-sample at ``sample_rate``.

    The accountant's epsilon holds only for Poisson sampling at the declared rate; a
    shuffled loader with fixed-size batches is a different mechanism.
    """
    kind, rate = declared_sampling(sampler)
    if kind != "poisson":
        raise PrivacyConfigError(
            f"DP-SGD is declared with Poisson sampling (q={sample_rate:g}) but the sampler "
            f"{sampler!r} does not sample that way (e.g. shuffled fixed-size batches), so the "
            "accountant's epsilon would not hold. Use gs.sampling.poisson_batches(n, q) or "
            "leave sampler unset."
        )
    if not math.isclose(rate, sample_rate, rel_tol=1e-9):
        raise PrivacyConfigError(
            f"the sampler Poisson-samples at q={rate:g} but DP-SGD is declared with q="
            f"{sample_rate:g}; make them equal"
        )


# ---------------------------------------------------------------- planning for fit

@dataclass(frozen=True)
class DPSGD:
    """What a private training run declares; :meth:`plan` resolves it for a data set.

    Give either ``noise_multiplier`` (sigma) or ``target_epsilon`` (sigma is then the
    smallest that meets it after all planned steps).

    Attributes:
        delta: the delta of (epsilon, delta)-DP; must be below ``1 / N``.
        max_norm: C, the per-example clipping bound.
        noise_multiplier: sigma.
        target_epsilon: the epsilon to plan sigma for.
        sample_rate: q (default ``batch_size / N``); the expected batch size is ``q N``.
        per_layer: clip each layer to ``C / sqrt(K)`` instead of the whole gradient to C.
        accountant: ``"rdp"`` or ``"prv"`` (Opacus).
        seed: noise seed (``None``: fresh randomness every step).
    """

    delta: float = 1e-5
    max_norm: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    sample_rate: float | None = None
    per_layer: bool = False
    accountant: str = "rdp"
    seed: int | None = None

    def plan(self, n: int, *, batch_size: int, epochs: int) -> "PrivacyPlan":
        """Resolve q, steps and sigma for ``n`` training examples and ``epochs`` epochs."""
        _check_delta(self.delta)
        if self.delta >= 1.0 / n:
            raise PrivacyConfigError(
                f"delta={self.delta:g} is not below 1/N = {1.0 / n:g}: a mechanism that "
                "publishes one random example outright would meet it. Use a smaller delta."
            )
        if not self.max_norm > 0:
            raise PrivacyConfigError(f"max_norm must be > 0, got {self.max_norm}")
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise PrivacyConfigError("give exactly one of noise_multiplier and target_epsilon")
        q = self.sample_rate if self.sample_rate is not None else min(1.0, batch_size / n)
        if not 0 < q <= 1:
            raise PrivacyConfigError(f"sample_rate must be in (0, 1], got {q}")
        per_epoch = steps_per_epoch(q)
        total = per_epoch * epochs
        if self.noise_multiplier is not None:
            if self.noise_multiplier < 0:
                raise PrivacyConfigError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
            sigma = float(self.noise_multiplier)
        else:
            sigma = noise_multiplier_for(self.target_epsilon, self.delta, q, total,
                                         accountant=self.accountant)
        return PrivacyPlan(
            n=n, sample_rate=q, expected_batch_size=q * n, steps_per_epoch=per_epoch,
            planned_steps=total, noise_multiplier=sigma, max_norm=float(self.max_norm),
            delta=self.delta, per_layer=self.per_layer, accountant=self.accountant,
            target_epsilon=self.target_epsilon, seed=self.seed,
        )


@dataclass(frozen=True)
class PrivacyPlan:
    """A resolved DP-SGD configuration (see :class:`DPSGD`)."""

    n: int
    sample_rate: float
    expected_batch_size: float
    steps_per_epoch: int
    planned_steps: int
    noise_multiplier: float
    max_norm: float
    delta: float
    per_layer: bool
    accountant: str
    target_epsilon: float | None
    seed: int | None

    #: an empty Poisson batch is still a step of the analysed mechanism (pure noise)
    step_on_empty = True

    def check(self, model: nn.Module, *, aggregator: Any = "mean", sampler: object = None) -> None:
        """Refuse what would break the guarantee: an aggregator other than ``mean`` (the
        plan sets clip + noise), a model that mixes examples or leaks running statistics
        (:func:`check_private_model`), a sampler that does not Poisson-sample at this
        plan's rate (:func:`check_sampler`; ``None``: the plan's own sampler is used)."""
        if not (aggregator in ("mean", None) or getattr(aggregator, "name", None) == "mean"):
            raise PrivacyConfigError(
                f"privacy= sets the aggregator (clip + noise); aggregator={aggregator!r} would "
                "change the sensitivity analysis. Leave aggregator at 'mean'."
            )
        check_private_model(model)
        if sampler is not None:
            check_sampler(sampler, self.sample_rate)

    def recorder(self) -> "PrivacyRecorder":
        """The :class:`PrivacyRecorder` that keeps epsilon in the history and manifest."""
        return PrivacyRecorder(self)

    def aggregator(self) -> Aggregator:
        """The :func:`dp_sgd` aggregator of this plan."""
        return dp_sgd(self.max_norm, self.noise_multiplier, self.expected_batch_size,
                      per_layer=self.per_layer, seed=self.seed)

    def sampler(self, seed: int = 0):
        """Poisson batches for :func:`gradsift.fit` at this plan's rate and steps per epoch."""
        return poisson_batches(self.n, self.sample_rate, seed=seed, steps=self.steps_per_epoch)

    def epsilon(self, steps: int) -> float:
        """Epsilon spent after ``steps`` steps (Opacus accountant)."""
        return epsilon(self.noise_multiplier, self.sample_rate, steps, self.delta,
                       accountant=self.accountant)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class PrivacyRecorder(Recorder):
    """Adds ``epsilon`` to every epoch row and keeps the manifest's ``privacy`` block
    (epsilon, delta, sigma, C, q, steps, accountant) current, also as
    ``trainer.privacy_report``. Added by ``fit(privacy=...)``."""

    def __init__(self, plan: PrivacyPlan):
        self.plan = plan
        self.report: dict[str, Any] = {}

    def _update(self, trainer) -> dict[str, Any]:
        steps = int(trainer.step)
        p = self.plan
        self.report = {
            "epsilon": p.epsilon(steps), "delta": p.delta, "noise_multiplier": p.noise_multiplier,
            "max_norm": p.max_norm, "sample_rate": p.sample_rate,
            "expected_batch_size": p.expected_batch_size, "steps": steps,
            "planned_steps": p.planned_steps, "accountant": p.accountant,
            "per_layer_clipping": p.per_layer, "target_epsilon": p.target_epsilon,
            "sampling": "poisson",
        }
        trainer.privacy_report = self.report
        if trainer.run is not None:
            trainer.run.update_manifest(privacy=self.report)
        return self.report

    def on_fit_begin(self, trainer) -> None:
        self._update(trainer)

    def on_epoch_end(self, trainer, epoch: int) -> dict:
        return {"epsilon": self._update(trainer)["epsilon"]}

    def on_fit_end(self, trainer) -> None:
        self._update(trainer)
