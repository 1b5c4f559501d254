"""Train K models of one architecture at once, each on its own subset of the data.

For many-model jobs (memorization scores from random subsets, seeds), small models are
trained together: their parameters are stacked (``torch.func.stack_module_state``) and one
``vmap`` over ``functional_call`` runs all K forward and backward passes as one batched
computation; a plain ``torch.optim`` optimizer then steps the stacked parameters, which is
exactly K independent optimizers for element-wise optimizers (SGD, momentum, Adam, ...)::

    masks = subset_masks(n=len(x), members=32, fraction=0.5, seed=0)      # [32, N] bool
    ens = train_ensemble(lambda: MLP(), loss_fn, x, y, masks, epochs=20, lr=0.1)
    correct = ens.correct(x, y)                                         # [32, N] bool

Schedule (identical on both paths): member ``k`` is initialized under
``torch.manual_seed(seeds[k])`` and shuffles its own subset with a generator seeded by
``seeds[k]``; an epoch is ``ceil(max_k n_k / batch_size)`` steps of ``batch_size``
examples drawn from consecutive shuffles of the member's subset (a member with fewer
examples wraps around into its next shuffle). The sequential path trains the members one
after another with the same schedule and gives the same result up to float rounding; it
is used for models that ``vmap`` cannot run (BatchNorm in training mode updates buffers
in place).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

LossFn = Callable[[Tensor, Tensor], Tensor]
OptimizerFactory = Callable[[Iterable[Tensor]], torch.optim.Optimizer]


@dataclass
class Ensemble:
    """K trained members of one architecture.

    Attributes:
        template: a module of the architecture (its own weights are not used).
        params: name -> ``[K, *param.shape]`` stacked parameters (detached).
        buffers: name -> ``[K, *buffer.shape]`` stacked buffers.
        seeds: the K seeds.
    """

    template: nn.Module
    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    seeds: list[int]

    @property
    def size(self) -> int:
        return len(self.seeds)

    def member(self, k: int) -> nn.Module:
        """Member ``k`` as an ordinary module (a copy)."""
        m = copy.deepcopy(self.template)
        state = {n: v[k] for n, v in {**self.params, **self.buffers}.items()}
        m.load_state_dict(state, strict=False)
        return m

    def predict(self, inputs: Tensor, batch_size: int = 4096) -> Tensor:
        """Outputs of every member: ``[N, ...] -> [K, N, ...]`` (eval mode, no grad)."""
        model = self.template.eval()

        def one(p, b, x):
            return functional_call(model, (p, b), (x,))

        outs = []
        with torch.no_grad():
            for s in range(0, inputs.shape[0], batch_size):
                outs.append(vmap(one, in_dims=(0, 0, None))(self.params, self.buffers, inputs[s : s + batch_size]))
        return torch.cat(outs, dim=1)

    def correct(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """``[K, N]`` bool: member k classifies example n correctly (argmax of outputs)."""
        return self.predict(inputs).argmax(-1) == targets.unsqueeze(0)


def subset_masks(n: int, members: int, fraction: float, seed: int = 0) -> Tensor:
    """``[members, n]`` bool masks, each selecting ``round(fraction * n)`` random examples."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    g = torch.Generator().manual_seed(seed)
    keep = max(1, round(fraction * n))
    masks = torch.zeros(members, n, dtype=torch.bool)
    for k in range(members):
        masks[k, torch.randperm(n, generator=g)[:keep]] = True
    return masks


def _as_index_lists(subsets: Tensor | Sequence[Sequence[int] | Tensor], n: int) -> list[Tensor]:
    if isinstance(subsets, Tensor) and subsets.dtype == torch.bool:
        if subsets.ndim != 2 or subsets.shape[1] != n:
            raise ValueError(f"masks must be [K, N={n}] bool, got {tuple(subsets.shape)}")
        out = [torch.nonzero(m).flatten() for m in subsets]
    else:
        out = [torch.as_tensor(s, dtype=torch.long).flatten() for s in subsets]
    for k, idx in enumerate(out):
        if idx.numel() == 0:
            raise ValueError(f"member {k} has an empty training subset")
        if idx.min() < 0 or idx.max() >= n:
            raise ValueError(f"member {k} has indices outside [0, {n})")
    return out


def schedule(subsets: list[Tensor], seeds: Sequence[int], epochs: int, batch_size: int) -> Tensor:
    """Example indices of every step: ``[epochs * steps, K, batch_size]`` (see module docs)."""
    steps = math.ceil(max(len(s) for s in subsets) / batch_size)
    need = epochs * steps * batch_size
    plan = []
    for idx, seed in zip(subsets, seeds):
        g = torch.Generator().manual_seed(int(seed))
        shuffles = [idx[torch.randperm(len(idx), generator=g)] for _ in range(math.ceil(need / len(idx)))]
        plan.append(torch.cat(shuffles)[:need].view(epochs * steps, batch_size))
    return torch.stack(plan, dim=1)


def _uses_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def train_ensemble(
    model_factory: Callable[[], nn.Module],
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    subsets: Tensor | Sequence[Sequence[int] | Tensor],
    *,
    epochs: int = 10,
    lr: float = 0.1,
    batch_size: int = 64,
    seeds: Sequence[int] | None = None,
    optimizer: OptimizerFactory | None = None,
    method: Literal["auto", "vmap", "sequential"] = "auto",
) -> Ensemble:
    """Train one member per subset, all at once with ``vmap`` when possible.

    Args:
        model_factory: ``() -> nn.Module``, called once per member under its seed.
        loss_fn: ``(outputs [B, ...], targets [B]) -> [B]`` per-example losses (their
            mean is minimized).
        inputs: ``[N, ...]`` all training inputs.
        targets: ``[N, ...]``.
        subsets: ``[K, N]`` bool masks or K index lists: member k's training examples.
        epochs: epochs (see the schedule in the module docs).
        lr: learning rate of the default optimizer (plain SGD).
        batch_size: examples per step and member.
        seeds: K seeds (default ``0..K-1``).
        optimizer: ``params -> torch.optim.Optimizer``; must act element-wise (SGD,
            momentum, Adam, AdamW, ...: not LBFGS) for the vmap path to equal K
            separate runs. Default ``SGD(lr=lr)``.
        method: ``"vmap"``, ``"sequential"``, or ``"auto"`` (sequential when the model
            has BatchNorm layers, else vmap).

    Returns:
        :class:`Ensemble` with the K trained members.
    """
    n = int(inputs.shape[0])
    if targets.shape[0] != n:
        raise ValueError(f"inputs and targets disagree on N: {n} vs {targets.shape[0]}")
    idx = _as_index_lists(subsets, n)
    k = len(idx)
    seeds = list(range(k)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != k:
        raise ValueError(f"need one seed per member: {k} subsets, {len(seeds)} seeds")
    if epochs < 0 or batch_size < 1:
        raise ValueError("epochs must be >= 0 and batch_size >= 1")
    make_opt = optimizer or (lambda ps: torch.optim.SGD(ps, lr=lr))
    models = []
    for s in seeds:
        torch.manual_seed(s)
        models.append(model_factory())
    plan = schedule(idx, seeds, epochs, batch_size)  # [S, K, bs]
    if method == "auto":
        method = "sequential" if _uses_batchnorm(models[0]) else "vmap"
    if method == "sequential":
        return _train_sequential(models, loss_fn, inputs, targets, plan, make_opt, seeds)
    if method != "vmap":
        raise ValueError(f"method must be 'auto', 'vmap' or 'sequential', got {method!r}")
    return _train_vmap(models, loss_fn, inputs, targets, plan, make_opt, seeds)


def _train_vmap(models, loss_fn, inputs, targets, plan, make_opt, seeds) -> Ensemble:
    params, buffers = stack_module_state(models)
    template = copy.deepcopy(models[0]).train()

    def member_loss(p, b, x, y):
        return loss_fn(functional_call(template, (p, b), (x,)), y).mean()

    losses = vmap(member_loss, in_dims=(0, 0, 0, 0))
    opt = make_opt(list(params.values()))
    for step_idx in plan:  # [K, bs]
        loss = losses(params, buffers, inputs[step_idx], targets[step_idx]).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return Ensemble(
        template=template,
        params={n: p.detach() for n, p in params.items()},
        buffers={n: b.detach() for n, b in buffers.items()},
        seeds=list(seeds),
    )


def _train_sequential(models, loss_fn, inputs, targets, plan, make_opt, seeds) -> Ensemble:
    for k, model in enumerate(models):
        model.train()
        opt = make_opt(list(model.parameters()))
        for step_idx in plan[:, k]:
            loss = loss_fn(model(inputs[step_idx]), targets[step_idx]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    params = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models]) for n, _ in models[0].named_parameters()}
    buffers = {n: torch.stack([dict(m.named_buffers())[n] for m in models]) for n, _ in models[0].named_buffers()}
    return Ensemble(template=copy.deepcopy(models[0]), params=params, buffers=buffers, seeds=list(seeds))
