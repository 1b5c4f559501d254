"""Fused (layer-by-layer) aggregation equals the unfused result and holds less memory."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from gradsift import aggregate as A
from gradsift.aggregate import aggregated_gradient

CE = nn.CrossEntropyLoss(reduction="none")


def model_and_batch(seed=0, b=20):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 6 * 6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3),
    )
    return model, torch.randn(b, 1, 8, 8), torch.randint(0, 3, (b,))


AGGREGATORS = {
    "mean": lambda: A.mean(),
    "winsorize1": lambda: A.winsorize(1),
    "winsorize3": lambda: A.winsorize(3),
    "m3": lambda: A.m3(),
    "trimmed": lambda: A.trimmed_mean(0.2),
    "median": lambda: A.coordinate_median(),
    "clip-mean": lambda: A.chain(A.clip(0.5), A.mean()),
    "clip-layer-mean": lambda: A.chain(A.clip(0.5, per_layer=True), A.mean()),
    "drop-clip-winsorize": lambda: A.chain(A.drop_nonfinite(), A.clip(0.5), A.winsorize(2)),
    "clip-mean-rm3": lambda: A.chain(A.clip(0.3), A.mean(), A.rm3()),
}


@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_fused_equals_unfused(name):
    model, x, y = model_and_batch()
    agg = AGGREGATORS[name]()
    fused_state = unfused_state = None
    for step in range(2):  # two steps: stateful tails (rm3) must agree too
        xs, ys = x[step:], y[step:]
        f = aggregated_gradient(model, CE, xs, ys, agg, fused_state)
        u = aggregated_gradient(model, CE, xs, ys, agg, unfused_state, fuse=False)
        assert f.fused and not u.fused
        assert set(f.update) == set(u.update)
        for n in u.update:
            torch.testing.assert_close(f.update[n], u.update[n], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(f.losses, u.losses)
        fused_state, unfused_state = f.state, u.state


def test_nonfinite_batches_take_the_unfused_path():
    model, x, y = model_and_batch()
    x = x.clone()
    x[3] = float("nan")
    r = aggregated_gradient(model, CE, x, y, A.chain(A.drop_nonfinite(), A.winsorize(1)))
    assert not r.fused and r.state[0] == 1
    ref = aggregated_gradient(model, CE, x[torch.arange(20) != 3], y[torch.arange(20) != 3], A.winsorize(1))
    for n in ref.update:
        torch.testing.assert_close(r.update[n], ref.update[n])
    with pytest.raises(Exception, match="NaN or inf"):
        aggregated_gradient(model, CE, x, y, A.winsorize(1))


def test_unfusable_aggregators_and_models_fall_back():
    model, x, y = model_and_batch()
    # rm3 alone takes batch gradients: not of the fusable form
    r = aggregated_gradient(model, CE, x, y, A.rm3())
    assert not r.fused
    with pytest.raises(ValueError, match="per-example"):
        aggregated_gradient(model, CE, x, y, A.clip(1.0))
    prelu = nn.Sequential(nn.Flatten(), nn.Linear(64, 3), nn.PReLU())  # PReLU: no hook rule
    r = aggregated_gradient(prelu, CE, x, y, A.winsorize(1))
    ref = aggregated_gradient(prelu, CE, x, y, A.winsorize(1), method="vmap", fuse=False)
    assert not r.fused
    for n in ref.update:
        torch.testing.assert_close(r.update[n], ref.update[n])


PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from torch import nn
    from gradsift import aggregate as A
    from gradsift.aggregate import aggregated_gradient
    torch.set_num_threads(1)  # the cores are shared; oversubscribed threads crawl
    torch.manual_seed(0)
    width, depth, b = 512, 8, 32
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(width, 10))
    x, y = torch.randn(b, width), torch.randint(0, 10, (b,))
    loss = nn.CrossEntropyLoss(reduction="none")
    # warm-up, B = 3 so that c = 1 applies: imports and compiles (Numba) are not counted
    aggregated_gradient(model, loss, x[:3], y[:3], A.winsorize(1), fuse=sys.argv[1] == "fused")
    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the RSS high-water mark (VmHWM) to the current RSS
    before = status("VmRSS")
    r = aggregated_gradient(model, loss, x, y, A.winsorize(1), fuse=sys.argv[1] == "fused")
    after = status("VmHWM")
    total = sum(p.numel() for p in model.parameters()) * 4 * b
    largest = max(p.numel() for p in model.parameters()) * 4 * b
    print(json.dumps({"peak": after - before, "total": total, "largest": largest, "fused": r.fused}))
    """
)


def peak(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, mode], capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fused_peak_memory_stays_near_one_layer():
    """Peak RSS growth: fused < 2.5 x (B x largest layer) < B x all parameters <= unfused."""
    fused, unfused = peak("fused"), peak("unfused")
    assert fused["fused"] and not unfused["fused"]
    bound = 3 * fused["largest"]
    assert bound < fused["total"]  # the bound separates the two paths
    assert fused["peak"] < bound, (fused, unfused)
    assert unfused["peak"] >= 0.9 * unfused["total"], (fused, unfused)


class _SeqModel(nn.Module):
    """A grouped Conv1d, a Linear over positions ([B, T, d]: T > 1) and a Linear on [B, d]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, groups=2)
        self.seq = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):  # [B, 2, L]
        h = self.conv(x).transpose(1, 2)  # [B, L-2, 4]
        return self.head(torch.tanh(self.seq(h)).mean(1))


@pytest.mark.parametrize("agg", [lambda: A.chain(A.clip(0.5), A.mean()), lambda: A.m3(),
                                 lambda: A.chain(A.clip(0.3, per_layer=True), A.mean())])
def test_weighted_sums_on_every_matmul_layout_equal_unfused(agg):
    """Book-kept weighted sums (one matmul over positions, grouped einsum) equal the
    materialized per-example gradients' reduction."""
    torch.manual_seed(1)
    model, x, y = _SeqModel(), torch.randn(9, 2, 7), torch.randint(0, 3, (9,))
    f = aggregated_gradient(model, CE, x, y, agg())
    u = aggregated_gradient(model, CE, x, y, agg(), fuse=False)
    assert f.fused and not u.fused
    for n in u.update:
        torch.testing.assert_close(f.update[n], u.update[n], atol=1e-6, rtol=1e-5)
