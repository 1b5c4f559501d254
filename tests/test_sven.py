import numpy as np
import pytest
import torch
from torch import nn

import gradsift as gs
from gradsift.aggregate import apply
from gradsift.data import load_digits
from gradsift.models import mlp
from gradsift.aggregate import aggregator_from_spec
from gradsift.aggregate.sven import sven, sven_direction


def _jacobian(seed=0, b=6, shapes=((4, 3), (5,))):
    g = torch.Generator().manual_seed(seed)
    grads = {f"p{k}": torch.randn(b, *s, generator=g, dtype=torch.float64) for k, s in enumerate(shapes)}
    losses = torch.rand(b, generator=g, dtype=torch.float64)
    J = torch.cat([v.flatten(1) for v in grads.values()], 1)
    return grads, losses, J


def _flat(d):
    return torch.cat([v.flatten() for v in d.values()])


@pytest.mark.parametrize("method", ["gram", "lowrank"])
def test_full_rank_direction_is_the_pseudo_inverse(method):
    grads, r, J = _jacobian()
    d = sven_direction(grads, r, method=method, rcond=0.0, niter=4)
    torch.testing.assert_close(_flat(d), torch.linalg.pinv(J) @ r, atol=1e-8, rtol=1e-6)
    assert d["p0"].shape == (4, 3) and d["p1"].shape == (5,)


def test_truncation_and_damping():
    grads, r, J = _jacobian(b=8, shapes=((30,),))
    U, S, Vh = torch.linalg.svd(J, full_matrices=False)
    k, lam = 3, 0.5
    want = Vh[:k].T @ ((U[:, :k].T @ r) / S[:k])
    torch.testing.assert_close(_flat(sven_direction(grads, r, rank=k, rcond=0.0)), want)
    want = Vh.T @ ((U.T @ r) * S / (S**2 + lam))
    torch.testing.assert_close(_flat(sven_direction(grads, r, damping=lam, rcond=0.0)), want)
    # rcond drops the small directions: the first singular value alone survives rcond ~ 1
    rc = float(S[1] / S[0]) + 1e-9
    want = Vh[:1].T @ ((U[:, :1].T @ r) / S[:1])
    torch.testing.assert_close(_flat(sven_direction(grads, r, rcond=rc)), want)


def test_aggregator_needs_losses_and_spec():
    agg = aggregator_from_spec("sven:rank=2,damping=0.1")
    assert agg.needs == ("losses",) and agg.output == "batch"
    grads, r, _ = _jacobian()
    with pytest.raises(ValueError, match="losses"):
        apply(agg, grads, ())
    out, _ = apply(agg, grads, (), losses=r)
    torch.testing.assert_close(_flat(out), _flat(sven_direction(grads, r, rank=2, damping=0.1)))
    empty, _ = apply(agg, {n: g[:0] for n, g in grads.items()}, (), losses=r[:0])
    assert float(_flat(empty).abs().sum()) == 0.0


def _least_squares(n=64, d=16, cond=30.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    X = torch.randn(n, d, generator=g) @ torch.diag(torch.logspace(0, -np.log10(cond), d)) @ Q.T
    return X, X @ torch.randn(d, generator=g)


def _steps_to(agg, lr, X, y, threshold, max_steps):
    """Full-batch steps until the mean loss is below threshold * initial loss."""
    model = nn.Linear(X.shape[1], 1, bias=False)
    nn.init.zeros_(model.weight)
    loss_fn = lambda out, t: 0.5 * (out.squeeze(-1) - t) ** 2  # noqa: E731
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    state, first = agg.init({}), None
    for step in range(max_steps + 1):
        pe = gs.per_example(model, loss_fn, X, y)
        loss = float(pe.losses.mean())
        first = first if first is not None else loss
        if loss < threshold * first:
            return step
        update, state = apply(agg, pe.grads, state, losses=pe.losses)
        gs.aggregate.write_grads(model, update)
        opt.step()
    return max_steps + 1  # not reached


def test_sven_beats_sgd_on_least_squares():
    X, y = _least_squares()
    lmax = float(torch.linalg.eigvalsh(X.T @ X / len(X)).max())
    sgd = _steps_to(gs.aggregate.mean(), 1.9 / lmax, X, y, 1e-4, max_steps=100)  # near the stable limit
    sv = _steps_to(sven(), 1.0, X, y, 1e-4, max_steps=100)
    # a Gauss-Newton step on l = e^2/2 halves every residual: the loss falls 4x per step
    assert sv <= 8
    assert sgd > 100 and sv < sgd


def test_fit_with_sven_learns_digits():
    tr, _ = load_digits()
    tr = tr.subset(np.arange(200))
    torch.manual_seed(0)
    model = mlp(64, 10, width=16)
    x, y = tr.tensors()
    initial = gs.train.evaluate(model, nn.CrossEntropyLoss(reduction="none"), x, y)["loss"]
    res = gs.fit(model, tr, aggregator="sven:rank=20,damping=1e-3", optimizer="sgd:lr=0.2",
                 epochs=2, batch_size=50)
    assert res.history.train_loss.iloc[-1] < initial - 0.5
