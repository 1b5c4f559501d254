"""``rm3``: coordinate-wise median over the batch gradients of this step and the two
previous ones (Zielinski et al.). Takes *batch* gradients, so it needs no per-example
gradients: under torch.distributed the global batch mean is formed first, then every rank
runs it on identical inputs.
"""

from __future__ import annotations

from ..errors import NonFiniteGradientError
from .base import Aggregator, Grads, State, median3, register_aggregator


@register_aggregator("rm3")
def rm3() -> Aggregator:
    """Median of this step's batch gradient and the two previous ones, per coordinate.

    Until two previous steps exist, the current gradient is returned.
    """

    def update(grads: Grads, state: State) -> tuple[Grads, State]:
        history: tuple[Grads, ...] = state
        for n, g in grads.items():
            if not bool(g.isfinite().all()):
                raise NonFiniteGradientError(f"rm3: the batch gradient of '{n}' holds NaN or inf")
        current = {n: g.detach().clone() for n, g in grads.items()}
        if len(history) < 2:
            out = {n: g.clone() for n, g in current.items()}
        else:
            p1, p2 = history
            out = {n: median3(current[n], p1[n], p2[n]) for n in current}
        return out, (current, *history[:1])

    return Aggregator("rm3", lambda params: (), update, "batch", "batch", kind="rm3")
