"""Train K small models at once, each on its own subset of the data (for memorization
scores and Data Diet averages over initializations).

The vectorized path stacks the K models' parameters with
``torch.func.stack_module_state`` and maps one ``functional_call`` over the member axis
with ``vmap``: each step feeds member ``k`` a batch from its own subset, the summed loss is
differentiated once, and a torch optimizer steps the stacked ``[K, ...]`` parameters
(SGD/momentum/weight decay act elementwise, so this is exactly K independent SGD runs).
The loop path trains the members one after another with the same batch order and gives
the same models; it is used when the members' subsets differ in size, when the model has
buffers that change in training or mixes examples (BatchNorm), or on request.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from ..progress import task

if TYPE_CHECKING:
    from ..distributed.backends import Backend

ModelFn = Callable[[int], nn.Module]


def member_batches(mask: Tensor, k: int, epoch: int, batch_size: int, seed: int) -> list[Tensor]:
    """Positions for member ``k`` in ``epoch``: its subset (``mask [N]`` bool) in a
    seeded random order, cut into batches of ``batch_size``."""
    members = torch.nonzero(mask, as_tuple=False).flatten()
    g = torch.Generator().manual_seed(((seed * 1_000_003 + k) * 10_007 + epoch) % (2**63 - 1))
    return list(members[torch.randperm(len(members), generator=g)].split(batch_size))


def _can_vectorize(models: Sequence[nn.Module], masks: Tensor) -> bool:
    sizes = masks.sum(1)
    if not bool((sizes == sizes[0]).all()):
        return False
    for m in models[0].modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout)):
            return False
    return True


def _optimizer(params, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def train_members(
    model_fn: ModelFn,
    x: Tensor,
    y: Tensor,
    masks: Tensor,
    *,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    vectorize: bool | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    on_epoch: Callable[[int, int, Tensor], None] | None = None,
    track: Tensor | None = None,
    member_ids: Sequence[int] | None = None,
    backend: "Backend | None" = None,
    members_per_task: int | None = None,
) -> list[nn.Module]:
    """Train ``K`` models, member ``k`` on the examples where ``masks[k]`` is true.

    Args:
        model_fn: ``k -> nn.Module``, a fresh model for member ``k`` (seed its init by ``k``).
        x: ``[N, ...]`` inputs; y: ``[N]`` integer labels.
        masks: ``[K, N]`` bool, member ``k``'s training subset.
        epochs, batch_size, lr, momentum, weight_decay: plain SGD settings, shared by all.
        seed: batch order (member ``k``, epoch ``e`` get their own permutation).
        vectorize: ``True`` forces the vmap path (error if impossible), ``False`` the
            loop; ``None`` picks vmap when possible.
        loss_fn: per-example loss ``(logits, y) -> [B]`` (default cross-entropy).
        on_epoch: called as ``on_epoch(k, epoch, logits)`` after every epoch of every
            member with its eval-mode ``logits [M, C]`` on ``track`` (default ``x``).
        member_ids: the members' ids ``k`` (default ``0..K-1``): they pick the model
            (``model_fn(k)``) and the batch order, so a slice of a larger job trains its
            members exactly as the whole job would.
        backend: where to train (:mod:`gradsift.distributed.backends`: in this process,
            Ray tasks, torchrun ranks). Members go in tasks of ``members_per_task``
            (default: one task per member with vmap off, else spread over the workers)
            and each task trains exactly as this process would train those members
            (same ids, same path), so the models do not depend on the backend.

    Returns:
        The ``K`` trained models (in eval mode).
    """
    masks = torch.as_tensor(masks, dtype=torch.bool)
    if masks.ndim != 2 or masks.shape[1] != len(y):
        raise ValueError(f"masks must be [K, N={len(y)}], got {tuple(masks.shape)}")
    if bool((masks.sum(1) == 0).any()):
        raise ValueError("every member needs at least one training example")
    ids = list(range(masks.shape[0])) if member_ids is None else [int(k) for k in member_ids]
    if len(ids) != masks.shape[0]:
        raise ValueError(f"member_ids has {len(ids)} ids for {masks.shape[0]} members")
    kwargs = dict(epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
                  seed=seed, vectorize=vectorize, loss_fn=loss_fn)
    if backend is not None:
        if on_epoch is not None:
            raise ValueError("on_epoch callbacks cannot run on a backend; train in this process")
        from ..distributed.backends import run_members

        with task(f"training {len(ids)} models on {type(backend).__name__}", len(ids)) as advance:
            models = run_members(backend, model_fn, x, y, masks, ids, members_per_task, kwargs)
            advance(len(ids))
        return models
    loss_fn = loss_fn or nn.CrossEntropyLoss(reduction="none")
    models = [model_fn(k) for k in ids]
    possible = _can_vectorize(models, masks)
    if vectorize and not possible:
        raise ValueError("members cannot be trained with vmap (unequal subset sizes, BatchNorm or Dropout)")
    track = x if track is None else track
    vmapped = bool(vectorize or (vectorize is None and possible and len(models) > 1))
    with task(f"training {len(models)} models{' (vmap)' if vmapped else ''}", len(models) * epochs) as advance:
        if vmapped:
            _train_vmap(models, x, y, masks, epochs, batch_size, lr, momentum, weight_decay, seed, loss_fn,
                        on_epoch, track, ids, advance)
        else:
            for i, (k, model) in enumerate(zip(ids, models)):
                _train_one(model, k, x, y, masks[i], epochs, batch_size, lr, momentum, weight_decay, seed, loss_fn,
                           on_epoch, track, advance)
    for m in models:
        m.eval()
    return models


def train_members_tracked(model_fn: ModelFn, x: Tensor, y: Tensor, masks: Tensor, *,
                          track: Tensor | None = None, **kwargs) -> tuple[list[nn.Module], Tensor]:
    """:func:`train_members` that also returns every member's eval-mode logits on
    ``track`` (default ``x``) after every epoch: ``[K, T, M, C]``."""
    history: dict[tuple[int, int], Tensor] = {}
    models = train_members(model_fn, x, y, masks, track=track,
                           on_epoch=lambda k, e, out: history.__setitem__((k, e), out), **kwargs)
    n_members, epochs = len(models), max(e for _, e in history)
    return models, torch.stack([torch.stack([history[k, e] for e in range(1, epochs + 1)]) for k in range(n_members)])


def _train_one(model, k, x, y, mask, epochs, batch_size, lr, momentum, weight_decay, seed, loss_fn,
               on_epoch=None, track=None, advance=lambda n=1: None) -> None:
    model.train()
    opt = _optimizer([p for p in model.parameters() if p.requires_grad], lr, momentum, weight_decay)
    for epoch in range(1, epochs + 1):
        for idx in member_batches(mask, k, epoch, batch_size, seed):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), y[idx]).mean().backward()
            opt.step()
        advance()
        if on_epoch is not None:
            model.eval()
            with torch.no_grad():
                on_epoch(k, epoch, model(track))
            model.train()


def _train_vmap(models, x, y, masks, epochs, batch_size, lr, momentum, weight_decay, seed, loss_fn,
                on_epoch=None, track=None, ids=None, advance=lambda n=1: None) -> None:
    params, buffers = stack_module_state(models)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    base = copy.deepcopy(models[0]).to("meta")

    def forward(p: dict, b: dict, xb: Tensor) -> Tensor:
        return functional_call(base, (p, b), (xb,))

    batched = vmap(forward, in_dims=(0, 0, 0))
    opt = _optimizer(list(params.values()), lr, momentum, weight_decay)
    n_members = masks.shape[0]
    ids = list(range(n_members)) if ids is None else ids
    for epoch in range(1, epochs + 1):
        orders = [member_batches(masks[i], ids[i], epoch, batch_size, seed) for i in range(n_members)]
        for step in range(len(orders[0])):
            idx = torch.stack([orders[k][step] for k in range(n_members)])  # [K, B]
            out = batched(params, buffers, x[idx])  # [K, B, C]
            losses = loss_fn(out.flatten(0, 1), y[idx].flatten()).view(idx.shape)
            opt.zero_grad(set_to_none=True)
            losses.mean(1).sum().backward()
            opt.step()
        advance(n_members)
        if on_epoch is not None:
            with torch.no_grad():
                out = vmap(forward, in_dims=(0, 0, None))(params, buffers, track)  # [K, M, C]
            for i in range(n_members):
                on_epoch(ids[i], epoch, out[i])
    with torch.no_grad():
        for k, m in enumerate(models):
            for n, p in m.named_parameters():
                p.copy_(params[n][k])


@torch.no_grad()
def predict_members(models: Sequence[nn.Module], x: Tensor, batch_size: int = 4096) -> Tensor:
    """Logits of every member on ``x``: ``[K, N, C]`` (models in eval mode)."""
    outs = []
    for m in models:
        m.eval()
        outs.append(torch.cat([m(x[s : s + batch_size]) for s in range(0, len(x), batch_size)]))
    return torch.stack(outs)
