"""Group gradient masking (gradient routing / SGTM): localize what a group of examples
teaches in parameters that can be removed afterwards.

Examples carry a *group tag*; parameters are assigned to groups by name pattern. An example
of group G updates only G's *dedicated* parameters and the *shared* ones; the other groups'
parameters never see its gradient. After training, :func:`remove_group` zeros G's dedicated
parameters, which removes what G's examples taught that could only live there ("Beyond Data
Filtering: Knowledge Localization for Capability Removal in LLMs").

It is exact: the per-example gradient of every example is masked to the parameters its
group may update (rows of other groups are set to exactly 0) before any reducer, so a
parameter's update is a function of its own group's examples (and of untagged ones when
``untagged="all"``) only.

Five-line example::

    asg = gs.masking.assign_parameters(model, {"forget": ["head_forget.*"],
                                               "retain": ["head_retain.*"]}, shared=["trunk.*"])
    tags = gs.masking.tags_from_names(["forget" if y >= 5 else "retain" for y in labels], asg)
    agg = gs.aggregate.chain(gs.masking.group_masking(asg, tags), gs.aggregate.mean())
    gs.fit(model, train, aggregator=agg)          # tags[i] is the group of training example i
    gs.masking.remove_group(model, asg, "forget")  # zero the forget group's parameters

Patterns are :mod:`fnmatch` globs over ``named_parameters`` names (``"head.*"``), or
regular expressions when prefixed with ``re:`` (``"re:^layers\\.[0-3]\\."``).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..errors import GradsiftError
from .base import Aggregator, Grads, RowScale, State

__all__ = ["GroupAssignment", "assign_parameters", "tags_from_names", "mask_gradients",
           "group_masking", "remove_group", "UNTAGGED"]

#: Tag of an example that belongs to no group.
UNTAGGED = -1


@dataclass(frozen=True)
class GroupAssignment:
    """Which parameters each group may update.

    Attributes:
        groups: group names; an example's tag is an index into this tuple (or -1).
        dedicated: group name -> names of the parameters only that group updates.
        shared: names of parameters every example updates.
        untagged: what untagged examples (tag -1) update: ``"shared"`` (only the shared
            parameters) or ``"all"`` (every parameter).
    """

    groups: tuple[str, ...]
    dedicated: Mapping[str, tuple[str, ...]]
    shared: tuple[str, ...]
    untagged: str = "shared"

    def owner(self, name: str) -> int | None:
        """Index of the group that owns parameter ``name``, ``None`` if shared."""
        for k, g in enumerate(self.groups):
            if name in self.dedicated[g]:
                return k
        if name in self.shared:
            return None
        raise KeyError(f"parameter '{name}' is not in this assignment")


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def assign_parameters(
    model: nn.Module | Iterable[str],
    groups: Mapping[str, Sequence[str]],
    *,
    shared: Sequence[str] = (),
    unassigned: str = "shared",
    untagged: str = "shared",
) -> GroupAssignment:
    """Assign a model's trainable parameters to groups by name pattern.

    Args:
        model: a module (its parameters with ``requires_grad``) or parameter names.
        groups: group name -> patterns of the parameters it owns (dedicated).
        shared: patterns of parameters every group updates.
        unassigned: parameters matched by no pattern are ``"shared"`` or an ``"error"``.
        untagged: untagged examples update only ``"shared"`` parameters or ``"all"``.

    Raises:
        GradsiftError: a parameter matched by two groups, or by a group and ``shared``; a
            pattern that matches nothing; an unassigned parameter with ``unassigned="error"``.
    """
    if unassigned not in ("shared", "error"):
        raise ValueError(f"unassigned must be 'shared' or 'error', got '{unassigned}'")
    if untagged not in ("shared", "all"):
        raise ValueError(f"untagged must be 'shared' or 'all', got '{untagged}'")
    if not groups:
        raise ValueError("give at least one group")
    if isinstance(model, nn.Module):
        names = [n for n, p in model.named_parameters() if p.requires_grad]
    else:
        names = list(model)
    owners: dict[str, str] = {}
    for pat_owner, patterns in [*groups.items(), ("<shared>", shared)]:
        for pat in patterns:
            hit = [n for n in names if _matches(n, pat)]
            if not hit:
                raise GradsiftError(
                    f"pattern '{pat}' of {pat_owner} matches no parameter; names look like "
                    f"{', '.join(names[:4])}"
                )
            for n in hit:
                if owners.get(n, pat_owner) != pat_owner:
                    raise GradsiftError(
                        f"parameter '{n}' is claimed by both {owners[n]} and {pat_owner}"
                    )
                owners[n] = pat_owner
    rest = [n for n in names if n not in owners]
    if rest and unassigned == "error":
        raise GradsiftError(f"parameters in no group: {', '.join(rest)}")
    dedicated = {g: tuple(n for n in names if owners.get(n) == g) for g in groups}
    shared_names = tuple(n for n in names if owners.get(n, "<shared>") == "<shared>")
    return GroupAssignment(tuple(groups), dedicated, shared_names, untagged)


def tags_from_names(names: Sequence[str | None], assignment: GroupAssignment) -> Tensor:
    """Group names (``None`` for untagged) -> ``[N]`` int64 tags (-1 for untagged)."""
    index = {g: k for k, g in enumerate(assignment.groups)}
    out = []
    for n in names:
        if n is None:
            out.append(UNTAGGED)
        elif n in index:
            out.append(index[n])
        else:
            raise GradsiftError(f"unknown group '{n}': groups are {', '.join(assignment.groups)}")
    return torch.tensor(out, dtype=torch.int64)


def mask_gradients(grads: Grads, tags: Tensor, assignment: GroupAssignment) -> Grads:
    """Zero every per-example gradient row a group may not use.

    Args:
        grads: name -> ``[B, *shape]`` per-example gradients.
        tags: ``[B]`` group index per example (-1: untagged).
        assignment: from :func:`assign_parameters`.

    Returns:
        name -> ``[B, *shape]``: row i of parameter p is kept when example i may update p
        (p shared; p dedicated to i's group; i untagged and ``untagged="all"``) and is
        exactly 0 otherwise.
    """
    tags = torch.as_tensor(tags).reshape(-1)
    out = {}
    for n, g in grads.items():
        if tags.shape[0] != g.shape[0]:
            raise ValueError(f"{tags.shape[0]} tags for a batch of {g.shape[0]} gradients")
        if assignment.owner(n) is None:
            out[n] = g
            continue
        keep = mask_factors(n, tags, assignment).to(g.device).bool().view(-1, *([1] * (g.ndim - 1)))
        out[n] = torch.where(keep, g, torch.zeros((), dtype=g.dtype, device=g.device))
    return out


def group_masking(assignment: GroupAssignment, tags: Tensor | Sequence[int]) -> Aggregator:
    """Per-example -> per-example aggregator applying :func:`mask_gradients`.

    Args:
        assignment: from :func:`assign_parameters`.
        tags: ``[N]`` group index of every *training* example, by position in the
            training set (as given to :func:`gradsift.fit`).

    Needs the side input ``positions`` (``[B]`` positions of the batch in the training
    set), which :func:`gradsift.fit` passes; by hand::
    ``gs.aggregate.apply(agg, grads, state, positions=idx)``. Chain a reducer after it
    (``mean``, or ``clip`` + ``mean``).
    """
    all_tags = torch.as_tensor(tags, dtype=torch.int64).reshape(-1)
    bad = (all_tags < UNTAGGED) | (all_tags >= len(assignment.groups))
    if bool(bad.any()):
        raise GradsiftError(f"tags must be -1 or 0..{len(assignment.groups) - 1}")

    def update(grads: Grads, state: State, positions: Tensor) -> tuple[Grads, State]:
        return mask_gradients(grads, all_tags[torch.as_tensor(positions).cpu()], assignment), state

    def factors(norms_sq: Grads, positions: Tensor) -> Grads:
        # Layer-wise form: the mask is a 0/1 factor per example and parameter.
        tags = all_tags[torch.as_tensor(positions).cpu()]
        return {n: mask_factors(n, tags, assignment) for n in norms_sq}

    name = f"group_masking({', '.join(assignment.groups)})"
    return Aggregator(name, lambda params: (), update, "per_example", "per_example",
                      kind="group_masking", example_wise=True, needs=("positions",),
                      row_scale=RowScale(factors, needs_norms=False))


def mask_factors(name: str, tags: Tensor, assignment: GroupAssignment) -> Tensor:
    """``[B]`` 0/1 factors: may each example (by its tag) update parameter ``name``?"""
    tags = torch.as_tensor(tags).reshape(-1)
    k = assignment.owner(name)
    if k is None:
        return torch.ones(tags.shape[0])
    allowed = tags == k
    if assignment.untagged == "all":
        allowed = allowed | (tags == UNTAGGED)
    return allowed.to(torch.get_default_dtype())


@torch.no_grad()
def remove_group(model: nn.Module, assignment: GroupAssignment, group: str) -> list[str]:
    """Zero the parameters dedicated to ``group`` in place; returns their names."""
    if group not in assignment.dedicated:
        raise GradsiftError(f"unknown group '{group}': groups are {', '.join(assignment.groups)}")
    params = dict(model.named_parameters())
    for n in assignment.dedicated[group]:
        params[n].zero_()
    return list(assignment.dedicated[group])
