"""Train K models of one architecture at once, each on its own subset of the data.

This is gradsift's one K-model trainer. Many-model jobs (Feldman-Zhang memorization from
random subsets, Data Diet averages over initializations, cross-validation folds, the
seeds of a pruning curve) all train here.

The vectorized path stacks the K models' parameters (``torch.func.stack_module_state``)
and maps one ``functional_call`` over the member axis with ``vmap``: each step feeds member
``k`` a batch from its own subset, the summed loss is differentiated once, and a plain
``torch.optim`` optimizer steps the stacked ``[K, ...]`` parameters. For element-wise
optimizers (SGD, momentum, weight decay, Adam, ...) this is exactly K independent runs.
The sequential path trains the members one after another with the same batches and gives
the same models up to float rounding; it is used when ``vmap`` cannot run the model
(BatchNorm updates buffers in place, Dropout), when the members' batches differ in shape,
or on request::

    masks = subset_masks(n=len(x), members=32, fraction=0.5, seed=0)      # [32, N] bool
    models = train_members(mlp_factory(data), x, y, masks, epochs=20)    # 32 nn.Modules
    ens = train_ensemble(lambda: MLP(), loss_fn, x, y, masks, epochs=20)  # stacked Ensemble

Two batch schedules, one trainer:

* :func:`train_members` (``k -> model`` factories, the scores' entry point): in epoch
  ``e`` member ``k`` sees its subset in a fresh random order seeded by ``(seed, k, e)``,
  cut into batches (the last may be smaller): :func:`member_batches`.
* :func:`train_ensemble` (``() -> model`` factories, per-member seeds): member ``k`` is
  initialized under ``torch.manual_seed(seeds[k])`` and an epoch is
  ``ceil(max_k n_k / batch_size)`` full batches drawn from consecutive shuffles of its
  subset (a member with fewer examples wraps around): :func:`schedule`. Members with
  unequal subsets can train with ``vmap``.

Seeding lives here too: :func:`member_seed` / :func:`seeded_factory` (member ``k`` of a job
with seed ``s`` is initialized under ``torch.manual_seed(s * 7919 + k)``).

``backend`` (:mod:`gradsift.backends`: this process, Ray tasks, torchrun ranks) cuts a job
into tasks of a few members; each task trains its members exactly as one process would
(same member ids, hence the same initializations and batch orders, and the same path).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, Sequence

import numpy as np

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from .backends import InProcess
from .progress import task
from .rundir import checkpointing

if TYPE_CHECKING:
    from .backends import Backend
    from .data import Dataset

LossFn = Callable[[Tensor, Tensor], Tensor]
ModelFn = Callable[[int], nn.Module]
OptimizerFactory = Callable[[Iterable[Tensor]], torch.optim.Optimizer]
#: ``batches(i, epoch) -> [index tensors]``: member ``i``'s (position in the job) batches in
#: ``epoch`` (1-based)
Batches = Callable[[int, int], Sequence[Tensor]]

__all__ = [
    "Ensemble", "can_vmap", "member_batches", "member_seed", "mlp_factory", "predict_members",
    "run_members", "schedule", "seeded_factory", "subset_masks", "train_ensemble", "train_members", "train_model",
    "train_members_tracked", "training_arrays", "as_model_fn", "take", "map_chunks",
]


# ---------------------------------------------------------------- seeding and subsets

def member_seed(seed: int, k: int) -> int:
    """The initialization seed of member ``k`` in a job seeded by ``seed``: ``seed * 7919 + k``."""
    return int(seed) * 7919 + int(k)


def seeded_factory(make: Callable[[], nn.Module], seed: int = 0) -> ModelFn:
    """``k -> make()`` called under ``torch.manual_seed(member_seed(seed, k))``."""

    def model_fn(k: int) -> nn.Module:
        torch.manual_seed(member_seed(seed, k))
        return make()

    return model_fn


def mlp_factory(data: "Dataset", *, width: int = 128, depth: int = 2, seed: int = 0) -> ModelFn:
    """``k -> mlp`` for ``data`` (input size and classes from the data), member ``k``
    initialized under :func:`member_seed` ``(seed, k)``."""
    from .models import mlp

    in_features = int(data.x[0].size)
    return seeded_factory(lambda: mlp(in_features, data.num_classes, width=width, depth=depth), seed)


def subset_masks(n: int, members: int, fraction: float, seed: int = 0) -> Tensor:
    """``[members, n]`` bool masks, each selecting exactly ``round(fraction * n)`` (at least
    one) random examples; row ``k`` is the ``k``-th draw of one generator seeded by ``seed``."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    g = torch.Generator().manual_seed(seed)
    keep = max(1, int(round(fraction * n)))
    masks = torch.zeros(members, n, dtype=torch.bool)
    for k in range(members):
        masks[k, torch.randperm(n, generator=g)[:keep]] = True
    return masks


# ---------------------------------------------------------------- data and model factories

def training_arrays(data: Any) -> tuple[Any, Tensor, np.ndarray]:
    """``(x, y [N], example_ids [N])`` of ``data`` for the K-model trainer: a
    :class:`gradsift.data.Dataset` gives its tensors; a torch ``Dataset`` of ``(inputs,
    target)`` (or ``(example_id, inputs, target)``) items, or a ``DataLoader`` over one,
    gives inputs that are fetched and collated per batch (``x[positions]``; nothing holds
    the data set in memory), its targets, and ids (the positions unless items carry ids)."""
    from .data import Dataset
    from .data.sources import examples

    if isinstance(data, Dataset):
        x, y = data.tensors()
        return x, y, np.asarray(data.example_ids)
    ex = examples(data)
    y = torch.as_tensor(ex.y)
    if y.ndim != 1 or y.dtype.is_floating_point:
        from .errors import DataError

        raise DataError(f"the targets of {type(data).__name__} must be one integer class per example, got "
                        f"{y.dtype} of shape {tuple(y.shape)}")
    return ex.x, y.long(), ex.ids.numpy()


def as_model_fn(model: "nn.Module | Callable[..., nn.Module]", seed: int = 0) -> ModelFn:
    """``k -> nn.Module`` from what a user gives: a factory of fresh models (``() ->
    nn.Module``, called under :func:`member_seed` ``(seed, k)``), a ``k -> nn.Module``
    factory (used as is), or a module (copied, and re-initialized under the member seed)."""
    import inspect

    if isinstance(model, nn.Module):
        def reinit(k: int) -> nn.Module:
            m = copy.deepcopy(model)
            torch.manual_seed(member_seed(seed, k))
            for layer in m.modules():
                if layer is not m and hasattr(layer, "reset_parameters"):
                    layer.reset_parameters()
            return m
        return reinit
    if not callable(model):
        from .errors import GradsiftError

        raise GradsiftError(f"model must be an nn.Module or a factory returning one, got {type(model).__name__}")
    try:
        params = inspect.signature(model).parameters.values()
        takes_k = any(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                      for p in params)
    except (TypeError, ValueError):
        takes_k = True
    return model if takes_k else seeded_factory(model, seed)


def take(x: Any, idx: Tensor) -> Any:
    """``x[idx]`` for inputs held as a tensor or fetched per batch (:func:`training_arrays`);
    ``idx`` may be ``[B]`` or ``[K, B]``."""
    if isinstance(x, Tensor) or idx.ndim == 1:
        return x[idx]
    flat = x[idx.flatten()]
    return flat.view(*idx.shape, *flat.shape[1:])


def map_chunks(fn: Callable[[Any], Tensor], x: Any, chunk: int = 1024, dim: int = 0) -> Tensor:
    """``fn(x)`` for inputs held as a tensor; for inputs fetched per batch, ``fn`` over
    chunks of ``chunk`` positions, concatenated along ``dim``."""
    if isinstance(x, Tensor):
        return fn(x)
    n = len(x)
    return torch.cat([fn(x[torch.arange(s, min(n, s + chunk))]) for s in range(0, n, chunk)], dim=dim)


# ---------------------------------------------------------------- batch schedules

def member_batches(mask: Tensor, k: int, epoch: int, batch_size: int, seed: int) -> list[Tensor]:
    """Positions for member ``k`` in ``epoch``: its subset (``mask [N]`` bool) in a
    seeded random order, cut into batches of ``batch_size`` (the last may be smaller)."""
    members = torch.nonzero(mask, as_tuple=False).flatten()
    g = torch.Generator().manual_seed(((seed * 1_000_003 + k) * 10_007 + epoch) % (2**63 - 1))
    return list(members[torch.randperm(len(members), generator=g)].split(batch_size))


def schedule(subsets: list[Tensor], seeds: Sequence[int], epochs: int, batch_size: int) -> Tensor:
    """Example indices of every step of :func:`train_ensemble`:
    ``[epochs * steps, K, batch_size]`` (see the module docs)."""
    steps = math.ceil(max(len(s) for s in subsets) / batch_size)
    need = epochs * steps * batch_size
    plan = []
    for idx, seed in zip(subsets, seeds):
        g = torch.Generator().manual_seed(int(seed))
        shuffles = [idx[torch.randperm(len(idx), generator=g)] for _ in range(max(1, math.ceil(need / len(idx))))]
        plan.append(torch.cat(shuffles)[:need].view(epochs * steps, batch_size))
    return torch.stack(plan, dim=1)


def can_vmap(model: nn.Module) -> bool:
    """Whether the vectorized path can train ``model``: no BatchNorm (updates buffers in
    place in training) and no Dropout (random masks per call)."""
    return not any(isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout)) for m in model.modules())


# ---------------------------------------------------------------- the trainer

def fit_members(models: Sequence[nn.Module], x: Tensor, y: Tensor, batches: Batches, *, epochs: int,
                make_opt: OptimizerFactory, loss_fn: LossFn, vectorize: bool,
                on_epoch: Callable[[int, int, Tensor], None] | None = None, track: Tensor | None = None,
                ids: Sequence[int] | None = None, advance: Callable[..., None] = lambda n=1: None,
                piece: "Piece | None" = None) -> None:
    """Train ``models`` in place: member ``i`` on ``batches(i, epoch)`` for every epoch.

    Args:
        models: the K members (modified in place; left in train mode).
        x: ``[N, ...]`` inputs; y: ``[N]`` targets.
        batches: the schedule (see :data:`Batches`); with ``vectorize`` every member's
            ``j``-th batch of an epoch must have the same length.
        make_opt: ``params -> optimizer`` (one per member on the sequential path, one over
            the stacked ``[K, ...]`` parameters with ``vectorize``).
        loss_fn: ``(outputs [B, ...], targets [B]) -> [B]``; its batch mean is minimized.
        vectorize: the ``vmap`` path (True) or one member after another (False).
        on_epoch: ``on_epoch(ids[i], epoch, logits [M, C])`` after every epoch of every
            member, with its eval-mode outputs on ``track`` (default ``x``).
        ids: the members' ids passed to ``on_epoch`` (default ``0..K-1``).
        advance: progress callback, called with the number of member-epochs done.
        piece: where to checkpoint (:class:`Piece`): after every epoch (the ``vmap`` path:
            all members; the loop: the member in training, and each member when done).
            Training continues from what the piece holds, and ``on_epoch`` is replayed for
            the epochs done before, so a resumed job equals an uninterrupted one.
    """
    ids = list(range(len(models))) if ids is None else list(ids)
    track = x if track is None else track
    if not vectorize:
        for i, model in enumerate(models):
            finished = piece.load_member(i) if piece is not None else None
            if finished is not None:
                model.load_state_dict(finished["model"])
                _replay(on_epoch, [ids[i]], [o.unsqueeze(0) for o in finished["track"]])
                advance(epochs)
                continue
            model.train()
            opt = make_opt([p for p in model.parameters() if p.requires_grad])
            start, outs = 1, []
            state = piece.load() if piece is not None else None
            if state is not None and state.get("member") == i:
                model.load_state_dict(state["model"])
                opt.load_state_dict(state["optimizer"])
                torch.set_rng_state(state["rng"])
                start, outs = state["epoch"] + 1, list(state["track"])
                _replay(on_epoch, [ids[i]], [o.unsqueeze(0) for o in outs])
                advance(state["epoch"])
            for epoch in range(start, epochs + 1):
                for idx in batches(i, epoch):
                    opt.zero_grad(set_to_none=True)
                    loss_fn(model(take(x, idx)), y[idx]).mean().backward()
                    opt.step()
                advance()
                if on_epoch is not None:
                    model.eval()
                    with torch.no_grad():
                        out = map_chunks(model, track)
                    on_epoch(ids[i], epoch, out)
                    outs.append(out)
                    model.train()
                if piece is not None:
                    if epoch == epochs:
                        piece.save_member(i, {"model": model.state_dict(), "track": outs})
                    else:
                        piece.save({"member": i, "epoch": epoch, "model": model.state_dict(),
                                    "optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "track": outs})
        return
    params, buffers = stack_module_state(list(models))
    params = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    base = copy.deepcopy(models[0]).to("meta")

    def forward(p: dict, b: dict, xb: Tensor) -> Tensor:
        return functional_call(base, (p, b), (xb,))

    batched = vmap(forward, in_dims=(0, 0, 0))
    opt = make_opt(list(params.values()))
    k = len(models)
    start, outs = 1, []
    state = piece.load() if piece is not None else None
    if state is not None:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state["params"][n])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start, outs = state["epoch"] + 1, list(state["track"])
        _replay(on_epoch, ids, outs)
        advance(k * state["epoch"])
    for epoch in range(start, epochs + 1):
        orders = [batches(i, epoch) for i in range(k)]
        if len({len(o) for o in orders}) != 1:
            raise ValueError("vmap needs the same number of batches for every member")
        for step in range(len(orders[0])):
            idx = torch.stack([orders[i][step] for i in range(k)])  # [K, B]
            out = batched(params, buffers, take(x, idx))  # [K, B, C]
            losses = loss_fn(out.flatten(0, 1), y[idx].flatten()).view(idx.shape)
            opt.zero_grad(set_to_none=True)
            losses.mean(1).sum().backward()
            opt.step()
        advance(k)
        if on_epoch is not None:
            with torch.no_grad():
                out = map_chunks(lambda t: vmap(forward, in_dims=(0, 0, None))(params, buffers, t), track,
                                 dim=1)  # [K, M, C]
            for i in range(k):
                on_epoch(ids[i], epoch, out[i])
            outs.append(out)
        if piece is not None:
            piece.save({"epoch": epoch, "params": {n: p.detach() for n, p in params.items()},
                        "optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "track": outs})
    with torch.no_grad():
        for i, m in enumerate(models):
            for n, p in m.named_parameters():
                p.copy_(params[n][i])


def _replay(on_epoch: Callable[[int, int, Tensor], None] | None, ids: Sequence[int], outs: Sequence[Tensor]) -> None:
    """Call ``on_epoch`` again for epochs trained before a resume (``outs[e - 1]``: ``[K, M, C]``)."""
    if on_epoch is not None:
        for epoch, out in enumerate(outs, start=1):
            for i, k in enumerate(ids):
                on_epoch(k, epoch, out[i])


class Piece:
    """The checkpoints of one K-model training inside a :func:`gradsift.rundir.checkpointing`
    block (see :class:`gradsift.rundir.JobCheckpoints`): ``KEY.pt`` holds the training in
    progress (after its last finished epoch), ``KEY-mNNN.pt`` each member trained to the
    end. ``signature`` (what determines the training) is stored and checked on load, so a
    checkpoint of another training is refused, never continued."""

    def __init__(self, jobs, key: str, signature: dict):
        from .rundir import fingerprint

        self.jobs, self.key = jobs, key
        self.signature = fingerprint(repr(sorted(signature.items())))

    def _checked(self, state: dict | None, name: str) -> dict | None:
        if state is not None and state.get("signature") != self.signature:
            from .rundir import RunDirError

            raise RunDirError(f"{self.jobs.file(name)} was written by a different training than this one "
                              "(another config?); start again with --overwrite")
        return state

    def load(self) -> dict | None:
        return self._checked(self.jobs.load(self.key), self.key)

    def save(self, state: dict) -> None:
        self.jobs.save(self.key, {**state, "signature": self.signature})

    def load_member(self, i: int) -> dict | None:
        return self._checked(self.jobs.load(f"{self.key}-m{i:03d}"), f"{self.key}-m{i:03d}")

    def save_member(self, i: int, state: dict) -> None:
        self.jobs.save(f"{self.key}-m{i:03d}", {**state, "signature": self.signature})


def _piece(ids: Sequence[int], x: Tensor, y: Tensor, masks: Tensor, kwargs: dict) -> Piece | None:
    """The :class:`Piece` of a :func:`train_members` call inside a checkpointing block."""
    from .rundir import active_checkpoints, fingerprint

    jobs = active_checkpoints()
    if jobs is None:
        return None
    settings = {k: v for k, v in kwargs.items() if isinstance(v, (int, float, str, bool, type(None)))}
    return Piece(jobs, jobs.next_key("members"),
                 {"ids": list(ids), "x": tuple(x.shape) if isinstance(x, Tensor) else len(x), "y": fingerprint(y), "masks": fingerprint(masks), **settings})


def _sgd(lr: float, momentum: float, weight_decay: float) -> OptimizerFactory:
    return lambda ps: torch.optim.SGD(ps, lr=lr, momentum=momentum, weight_decay=weight_decay)


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
    loss_fn: LossFn | None = None,
    on_epoch: Callable[[int, int, Tensor], None] | None = None,
    track: Tensor | None = None,
    member_ids: Sequence[int] | None = None,
    backend: "Backend | None" = None,
    members_per_task: int | None = None,
) -> list[nn.Module]:
    """Train ``K`` models, member ``k`` on the examples where ``masks[k]`` is true.

    Args:
        model_fn: ``k -> nn.Module``, a fresh model for member ``k`` (seed its init by ``k``,
            e.g. :func:`seeded_factory`).
        x: ``[N, ...]`` inputs; y: ``[N]`` integer labels.
        masks: ``[K, N]`` bool, member ``k``'s training subset.
        epochs, batch_size, lr, momentum, weight_decay: plain SGD settings, shared by all.
        seed: batch order (member ``k``, epoch ``e`` get their own permutation,
            :func:`member_batches`).
        vectorize: ``True`` forces the vmap path (error if impossible), ``False`` the
            loop; ``None`` picks vmap when possible (equal subset sizes, :func:`can_vmap`).
        loss_fn: per-example loss ``(logits, y) -> [B]`` (default cross-entropy).
        on_epoch: called as ``on_epoch(k, epoch, logits)`` after every epoch of every
            member with its eval-mode ``logits [M, C]`` on ``track`` (default ``x``).
        member_ids: the members' ids ``k`` (default ``0..K-1``): they pick the model
            (``model_fn(k)``) and the batch order, so a slice of a larger job trains its
            members exactly as the whole job would.
        backend: where to train (:mod:`gradsift.backends`: in this process, Ray tasks,
            torchrun ranks); see :func:`run_members`. The models do not depend on it.
        members_per_task: members per backend task (default: one per member on the loop
            path, else the job spread evenly over the workers).

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
    piece = _piece(ids, x, y, masks, kwargs)  # inside gradsift.rundir.checkpointing(...): resumable
    if piece is not None and isinstance(backend, InProcess):
        backend = None  # the same models; checkpointed per epoch rather than per task
    if backend is not None:
        if on_epoch is not None:
            raise ValueError("on_epoch callbacks cannot run on a backend; train in this process")
        with task(f"training {len(ids)} models on {type(backend).__name__}", len(ids)) as advance:
            models = _run_members_resumable(backend, model_fn, x, y, masks, ids, members_per_task, kwargs, piece)
            advance(len(ids))
        return models
    models = [model_fn(k) for k in ids]
    vmapped = _vmap_path(models, masks, vectorize)
    with task(f"training {len(models)} models{' (vmap)' if vmapped else ''}", len(models) * epochs) as advance:
        fit_members(models, x, y, lambda i, e: member_batches(masks[i], ids[i], e, batch_size, seed),
                    epochs=epochs, make_opt=_sgd(lr, momentum, weight_decay),
                    loss_fn=loss_fn or nn.CrossEntropyLoss(reduction="none"), vectorize=vmapped,
                    on_epoch=on_epoch, track=track, ids=ids, advance=advance, piece=piece)
    for m in models:
        m.eval()
    return models


def _vmap_path(models: Sequence[nn.Module], masks: Tensor, vectorize: bool | None) -> bool:
    """The path :func:`train_members` takes (vmap needs equal subset sizes)."""
    sizes = masks.sum(1)
    possible = bool((sizes == sizes[0]).all()) and can_vmap(models[0])
    if vectorize and not possible:
        raise ValueError("members cannot be trained with vmap (unequal subset sizes, BatchNorm or Dropout)")
    return bool(vectorize or (vectorize is None and possible and len(models) > 1))


def train_members_tracked(model_fn: ModelFn, x: Tensor, y: Tensor, masks: Tensor, *,
                          track: Tensor | None = None, **kwargs) -> tuple[list[nn.Module], Tensor]:
    """:func:`train_members` that also returns every member's eval-mode logits on
    ``track`` (default ``x``) after every epoch: ``[K, T, M, C]``."""
    history: dict[tuple[int, int], Tensor] = {}
    models = train_members(model_fn, x, y, masks, track=track,
                           on_epoch=lambda k, e, out: history.__setitem__((k, e), out), **kwargs)
    ids = kwargs.get("member_ids") or range(len(models))
    epochs = max(e for _, e in history)
    return models, torch.stack([torch.stack([history[k, e] for e in range(1, epochs + 1)]) for k in ids])


def train_model(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int = 10, batch_size: int = 64,
                lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0, seed: int = 0,
                loss_fn: LossFn | None = None, member_id: int = 0) -> nn.Module:
    """Train one given ``model`` in place on all of ``(x [N, ...], y [N])`` with the
    schedule of :func:`train_members` (member ``member_id``); returns it in eval mode."""
    mask = torch.ones(len(y), dtype=torch.bool)
    fit_members([model], x, y, lambda i, e: member_batches(mask, member_id, e, batch_size, seed), epochs=epochs,
                make_opt=_sgd(lr, momentum, weight_decay), loss_fn=loss_fn or nn.CrossEntropyLoss(reduction="none"),
                vectorize=False)
    return model.eval()


# ---------------------------------------------------------------- backends

def train_task(model_fn: ModelFn, x: Tensor, y: Tensor, masks: Tensor, ids: list[int],
               kwargs: dict) -> list[dict[str, Tensor]]:
    """One backend task: :func:`train_members` on ``ids``; the trained state dicts."""
    models = train_members(model_fn, x, y, masks, member_ids=ids, **kwargs)
    return [m.state_dict() for m in models]


def run_members(backend: "Backend", model_fn: ModelFn, x: Tensor, y: Tensor, masks: Tensor, ids: list[int],
                members_per_task: int | None, kwargs: dict) -> list[nn.Module]:
    """:func:`train_members` on ``backend``: the members cut into tasks (every task takes
    the path one process would take for the whole job), the trained models returned in
    order (in eval mode)."""
    models = [model_fn(k) for k in ids]
    vectorize = _vmap_path(models, masks, kwargs.get("vectorize"))
    if members_per_task is None:
        members_per_task = max(1, math.ceil(len(ids) / max(1, backend.workers))) if vectorize else 1
    calls = [(model_fn, x, y, masks[i : i + members_per_task], ids[i : i + members_per_task],
              {**kwargs, "vectorize": vectorize})
             for i in range(0, len(ids), members_per_task)]
    states = [s for chunk in backend.map(train_task, calls) for s in chunk]
    for m, s in zip(models, states):
        m.load_state_dict(s)
        m.eval()
    return models


def _run_members_resumable(backend: "Backend", model_fn: ModelFn, x: Tensor, y: Tensor, masks: Tensor,
                           ids: list[int], members_per_task: int | None, kwargs: dict,
                           piece: Piece | None) -> list[nn.Module]:
    """:func:`run_members`, skipping the members ``piece`` holds trained and saving the others."""
    if piece is None:
        return run_members(backend, model_fn, x, y, masks, ids, members_per_task, kwargs)
    done = {i: s for i in range(len(ids)) if (s := piece.load_member(i)) is not None}
    todo = [i for i in range(len(ids)) if i not in done]
    models = [model_fn(k) for k in ids]
    if todo:
        # the path is the whole job's, so a part trains its members as the whole would
        vectorize = _vmap_path(models, masks, kwargs.get("vectorize"))
        with checkpointing(None):  # a task in this process must not checkpoint as a piece of its own
            trained = run_members(backend, model_fn, x, y, masks[todo], [ids[i] for i in todo], members_per_task,
                                  {**kwargs, "vectorize": vectorize})
        for i, m in zip(todo, trained):
            piece.save_member(i, {"model": m.state_dict(), "track": []})
            done[i] = {"model": m.state_dict()}
    for i, m in enumerate(models):
        m.load_state_dict(done[i]["model"])
        m.eval()
    return models


@torch.no_grad()
def predict_members(models: Sequence[nn.Module], x: Tensor, batch_size: int = 4096) -> Tensor:
    """Logits of every member on ``x``: ``[K, N, C]`` (models in eval mode; ``x`` a tensor or
    inputs fetched per batch, :func:`training_arrays`)."""
    outs = []
    for m in models:
        m.eval()
        if isinstance(x, Tensor):
            outs.append(torch.cat([m(x[s : s + batch_size]) for s in range(0, len(x), batch_size)]))
        else:
            outs.append(map_chunks(m, x, batch_size))
    return torch.stack(outs)


# ---------------------------------------------------------------- stacked ensembles

@dataclass
class Ensemble:
    """K trained members of one architecture, stacked.

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
    """Train one member per subset with the :func:`schedule` (wrap-around) batches, all at
    once with ``vmap`` when possible; the members stacked as an :class:`Ensemble`.

    Args:
        model_factory: ``() -> nn.Module``, called once per member under its seed.
        loss_fn: ``(outputs [B, ...], targets [B]) -> [B]`` per-example losses (their
            mean is minimized).
        inputs: ``[N, ...]`` all training inputs.
        targets: ``[N, ...]``.
        subsets: ``[K, N]`` bool masks or K index lists: member k's training examples
            (sizes may differ).
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
    if method not in ("auto", "vmap", "sequential"):
        raise ValueError(f"method must be 'auto', 'vmap' or 'sequential', got {method!r}")
    models = []
    for s in seeds:
        torch.manual_seed(s)
        models.append(model_factory())
    plan = schedule(idx, seeds, epochs, batch_size)  # [S, K, bs]
    steps = plan.shape[0] // max(epochs, 1)
    vectorize = method == "vmap" or (method == "auto" and not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in models[0].modules()))
    fit_members(models, inputs, targets, lambda i, e: plan[(e - 1) * steps : e * steps, i], epochs=epochs,
                make_opt=optimizer or (lambda ps: torch.optim.SGD(ps, lr=lr)), loss_fn=loss_fn,
                vectorize=vectorize)
    params = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models])
              for n, _ in models[0].named_parameters()}
    buffers = {n: torch.stack([dict(m.named_buffers())[n] for m in models]) for n, _ in models[0].named_buffers()}
    return Ensemble(template=copy.deepcopy(models[0]), params=params, buffers=buffers, seeds=list(seeds))
