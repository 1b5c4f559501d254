"""``drop_nonfinite``: drop the examples whose per-example gradient holds NaN or inf.

State: the total number of examples dropped so far (an ``int``). Layer-wise form: a
batch whose squared norms are all finite passes unchanged; otherwise the runner
materializes the batch and this stage drops the examples. Sharded form: each rank drops
its own and the counts are summed over ranks.
"""

from __future__ import annotations

import torch

from .base import Aggregator, Grads, RowScale, Shard, State, finite_rows, register_aggregator


def _all_finite(norms_sq: Grads) -> Grads | None:
    if all(bool(torch.isfinite(v).all()) for v in norms_sq.values()):
        return {}
    return None


@register_aggregator("drop_nonfinite")
def drop_nonfinite() -> Aggregator:
    """Drop examples whose per-example gradient holds NaN or inf."""

    def update(grads: Grads, state: State) -> tuple[Grads, State]:
        keep = finite_rows(grads)
        if keep is None or bool(keep.all()):
            return grads, state
        return {n: g[keep] for n, g in grads.items()}, state + int((~keep).sum())

    def sharded(grads: Grads, state: State, shard: Shard) -> tuple[Grads, State]:
        out, new = update(grads, state)
        dropped = int(shard.comm.all_reduce_sum(torch.tensor([float(new - state)]))[0])
        return out, state + dropped

    return Aggregator("drop_nonfinite", lambda params: 0, update, "per_example", "per_example",
                      kind="drop_nonfinite", example_wise=True, row_scale=RowScale(_all_finite),
                      sharded=sharded)
