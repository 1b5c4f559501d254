import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import gradsift as gs
from gradsift import privacy as P
from gradsift.aggregate import apply, clip
from gradsift.data import load_digits
from gradsift.models import mlp
from gradsift.privacy import PrivacyConfigError
from gradsift.sampling import PoissonBatchSampler, declared_sampling, poisson_batches

# A reference configuration: Abadi et al.'s MNIST setting (q = 256/60000, sigma = 1.1,
# 60 epochs), delta = 1e-5.
REF = dict(noise_multiplier=1.1, sample_rate=256 / 60_000, steps=60 * 234, delta=1e-5)


@pytest.fixture(scope="module")
def digits_small():
    tr, te = load_digits()
    return tr.subset(np.arange(300)), te.subset(np.arange(100))


# ---------------------------------------------------------------- accounting

def test_rdp_epsilon_equals_opacus_own_figure():
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    eps = P.epsilon(**REF)
    alphas = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=REF["sample_rate"], noise_multiplier=REF["noise_multiplier"],
                      steps=REF["steps"], orders=alphas)
    expected, _ = get_privacy_spent(orders=alphas, rdp=rdp, delta=REF["delta"])
    assert eps == pytest.approx(float(expected), rel=1e-12)
    assert 1.0 < eps < 10.0


def test_rdp_epsilon_agrees_with_google_dp_accounting():
    dpa = pytest.importorskip("dp_accounting")
    from opacus.accountants import RDPAccountant

    acc = dpa.rdp.RdpAccountant(orders=[float(a) for a in RDPAccountant.DEFAULT_ALPHAS])
    event = dpa.SelfComposedDpEvent(
        dpa.PoissonSampledDpEvent(REF["sample_rate"], dpa.GaussianDpEvent(REF["noise_multiplier"])),
        REF["steps"],
    )
    acc.compose(event)
    # Google's conversion from RDP to (eps, delta) is slightly tighter than Opacus's
    assert P.epsilon(**REF) == pytest.approx(acc.get_epsilon(REF["delta"]), rel=0.05)


def test_prv_epsilon_equals_opacus_prv_accountant():
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [(REF["noise_multiplier"], REF["sample_rate"], REF["steps"])]
    expected = acc.get_epsilon(delta=REF["delta"])
    assert P.epsilon(**REF, accountant="prv") == pytest.approx(expected, rel=1e-9)
    assert P.epsilon(**REF, accountant="prv") < P.epsilon(**REF)  # PRV is tighter than RDP


def test_noise_multiplier_for_target_epsilon():
    sigma = P.noise_multiplier_for(2.0, 1e-5, 0.01, 1000)
    eps = P.epsilon(sigma, 0.01, 1000, 1e-5)
    assert 2.0 - 0.02 <= eps <= 2.0
    assert P.epsilon(sigma * 0.9, 0.01, 1000, 1e-5) > 2.0  # smaller sigma overspends


def test_epsilon_edge_cases():
    assert P.epsilon(1.0, 0.01, 0, 1e-5) == 0.0
    assert P.epsilon(0.0, 0.01, 10, 1e-5) == math.inf
    assert P.epsilon(1.0, 0.01, 200, 1e-5) < P.epsilon(1.0, 0.01, 400, 1e-5)
    with pytest.raises(PrivacyConfigError, match="delta"):
        P.epsilon(1.0, 0.01, 10, 0.0)
    with pytest.raises(PrivacyConfigError, match="accountant"):
        P.epsilon(1.0, 0.01, 10, 1e-5, accountant="moments")


# ---------------------------------------------------------------- clipping and noise

@pytest.mark.parametrize("per_layer", [False, True])
def test_every_clipped_per_example_gradient_has_norm_at_most_C(per_layer):
    torch.manual_seed(1)
    model = mlp(64, 10, width=16)
    x, y = torch.randn(40, 64) * 50, torch.randint(0, 10, (40,))
    grads = gs.per_example_gradients(model, nn.CrossEntropyLoss(reduction="none"), x, y)
    grads["1.weight"][:5] *= 1e4  # some huge gradients
    C = 0.5
    clipped, _ = clip(C, per_layer=per_layer).update(grads, ())
    norms = gs.engine.grad_norms(clipped)
    assert float(gs.engine.grad_norms(grads).max()) > 10 * C  # clipping had work to do
    assert bool((norms <= C * (1 + 1e-6)).all())
    if per_layer:
        for n, g in clipped.items():
            assert bool((g.flatten(1).norm(dim=1) <= C / math.sqrt(len(clipped)) * (1 + 1e-6)).all())


def test_dp_sgd_without_noise_matches_opacus_dp_optimizer():
    """sigma = 0: gradsift's update equals Opacus's clipped-sum / expected-batch-size."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(12, 6) * 3, torch.randint(0, 3, (12,))
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    C, L = 0.3, 20.0

    grads = gs.per_example_gradients(model, loss_fn, x, y)
    agg = P.dp_sgd(C, 0.0, L)
    ours, _ = agg.update(grads, agg.init(dict(model.named_parameters())))

    gsm = GradSampleModule(model)
    opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=0.0), noise_multiplier=0.0,
                      max_grad_norm=C, expected_batch_size=int(L))
    loss_fn(gsm(x), y).sum().backward()
    opt.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, atol=1e-6, rtol=1e-5)


def test_noise_has_the_right_standard_deviation():
    sigma, C, L = 1.3, 0.7, 50.0
    agg = P.gaussian_noise(sigma, C, L, seed=123)
    zero = {"w": torch.zeros(400, 500)}
    out, state = agg.update(zero, agg.init(zero))
    z = out["w"].flatten().double()
    std = sigma * C / L
    # 200k draws: the sample std is within 1% of the truth with overwhelming probability
    assert float(z.std()) == pytest.approx(std, rel=0.01)
    assert abs(float(z.mean())) < 5 * std / math.sqrt(z.numel())
    from scipy.stats import kstest

    assert kstest((z / std).numpy()[:20_000], "norm").pvalue > 1e-3
    # a fresh draw at the next step, the same draw for the same (seed, step)
    out2, _ = agg.update(zero, state)
    assert not torch.equal(out["w"], out2["w"])
    again, _ = agg.update(zero, agg.init(zero))
    assert torch.equal(out["w"], again["w"])


def test_dp_sgd_adds_noise_to_the_normalized_clipped_sum():
    sigma, C, L = 2.0, 1.0, 8.0
    torch.manual_seed(0)
    grads = {"w": torch.randn(5, 300, 200) * 3}
    agg = P.dp_sgd(C, sigma, L, seed=0)
    out, _ = agg.update(grads, agg.init({"w": torch.zeros(300, 200)}))
    clipped, _ = clip(C).update(grads, ())
    noise = out["w"] - clipped["w"].sum(0) / L
    assert float(noise.std()) == pytest.approx(sigma * C / L, rel=0.02)


def test_empty_batch_gives_pure_noise():
    agg = P.dp_sgd(1.0, 1.0, 10.0, seed=0)
    empty = {"w": torch.zeros(0, 100, 100)}
    out, _ = agg.update(empty, agg.init({"w": torch.zeros(100, 100)}))
    assert out["w"].shape == (100, 100)
    assert float(out["w"].std()) == pytest.approx(0.1, rel=0.05)


def test_missing_per_example_gradients_are_refused():
    agg = P.dp_sgd(1.0, 1.0, 10.0)
    state = agg.init({"a": torch.zeros(3), "b": torch.zeros(2)})
    with pytest.raises(gs.UnsupportedModelError, match="b"):
        agg.update({"a": torch.zeros(4, 3)}, state)


# ---------------------------------------------------------------- Poisson sampling

def test_poisson_batches_sample_each_example_with_probability_q():
    n, q = 200, 0.05
    s = poisson_batches(n, q, seed=0)
    batches = [b for e in range(1, 41) for b in s(e)]
    assert len(batches) == 40 * 20
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float)
    assert float(sizes.mean()) == pytest.approx(q * n, rel=0.05)
    assert float(sizes.var()) == pytest.approx(n * q * (1 - q), rel=0.2)  # Binomial
    counts = torch.bincount(torch.cat(batches), minlength=n).float() / len(batches)
    assert float(counts.mean()) == pytest.approx(q, rel=0.05)
    assert [b.tolist() for b in s(3)] == [b.tolist() for b in s(3)]  # deterministic


def test_poisson_sampling_yields_empty_batches_and_fit_steps_on_them(digits_small):
    tr, _ = digits_small
    tiny = tr.subset(np.arange(20))
    sizes = [len(b) for b in poisson_batches(20, 0.02, seed=0)(1)]
    assert 0 in sizes
    torch.manual_seed(0)
    model = mlp(64, 10, width=8)
    before = [p.detach().clone() for p in model.parameters()]
    res = gs.fit(model, tiny, optimizer="sgd:lr=0.1", epochs=1, batch_size=1,
                 privacy=P.DPSGD(delta=1e-3, noise_multiplier=1.0, sample_rate=0.02, seed=0))
    assert res.trainer.step == 50  # every sampled batch is a step, empty ones included
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_torch_batch_sampler_and_declared_sampling():
    s = PoissonBatchSampler(100, 0.1, generator=torch.Generator().manual_seed(0))
    batches = list(s)
    assert len(batches) == len(s) == 10
    assert declared_sampling(s) == ("poisson", 0.1)
    loader = torch.utils.data.DataLoader(torch.arange(100), batch_sampler=s)
    assert declared_sampling(loader) == ("poisson", 0.1)
    shuffled = torch.utils.data.DataLoader(torch.arange(100), batch_size=10, shuffle=True)
    assert declared_sampling(shuffled) == ("other", None)


# ---------------------------------------------------------------- refusals

def test_refuses_a_shuffled_loader_declared_as_poisson(digits_small):
    tr, _ = digits_small
    shuffled = torch.utils.data.DataLoader(torch.arange(300), batch_size=50, shuffle=True)
    with pytest.raises(PrivacyConfigError, match="Poisson"):
        P.check_sampler(shuffled, 50 / 300)
    with pytest.raises(PrivacyConfigError, match="does not sample"):
        gs.fit(mlp(64, 10, width=8), tr, batch_size=50, sampler=gs.train.shuffled_batches(300, 50, 0),
               privacy=P.DPSGD(noise_multiplier=1.0, delta=1e-4))
    with pytest.raises(PrivacyConfigError, match="q=0.1"):
        gs.fit(mlp(64, 10, width=8), tr, batch_size=50, sampler=poisson_batches(300, 0.1),
               privacy=P.DPSGD(noise_multiplier=1.0, delta=1e-4))


def test_refuses_batchnorm_and_running_statistics(digits_small):
    tr, _ = digits_small
    bn = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    with pytest.raises(PrivacyConfigError, match="BatchNorm1d"):
        gs.fit(bn, tr, privacy=P.DPSGD(noise_multiplier=1.0, delta=1e-4))
    inorm = nn.Sequential(nn.Unflatten(1, (4, 16)), nn.InstanceNorm1d(4, track_running_stats=True),
                          nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(PrivacyConfigError, match="running"):
        P.check_private_model(inorm)
    bn.eval()
    P.check_private_model(bn)  # frozen statistics are fine


def test_refuses_other_bad_configurations(digits_small):
    tr, _ = digits_small
    m = mlp(64, 10, width=8)
    with pytest.raises(PrivacyConfigError, match="aggregator"):
        gs.fit(m, tr, aggregator="winsorize:c=2", privacy=P.DPSGD(noise_multiplier=1.0, delta=1e-4))
    with pytest.raises(PrivacyConfigError, match="1/N"):
        gs.fit(m, tr, privacy=P.DPSGD(noise_multiplier=1.0, delta=0.01))
    with pytest.raises(PrivacyConfigError, match="exactly one"):
        gs.fit(m, tr, privacy=P.DPSGD(delta=1e-4))
    with pytest.raises(PrivacyConfigError, match="exactly one"):
        gs.fit(m, tr, privacy=P.DPSGD(delta=1e-4, noise_multiplier=1.0, target_epsilon=1.0))


# ---------------------------------------------------------------- fit and CLI

def test_fit_with_dp_records_the_guarantee_and_learns(digits_small, tmp_path):
    tr, te = digits_small
    torch.manual_seed(0)
    model = mlp(64, 10, width=32)
    x, y = tr.tensors()
    initial = gs.train.evaluate(model, nn.CrossEntropyLoss(reduction="none"), x, y)["loss"]
    res = gs.fit(model, tr, te, optimizer="sgd:lr=2.0,momentum=0.5", epochs=3, batch_size=50,
                 run_dir=tmp_path / "run",
                 privacy=P.DPSGD(delta=1e-4, noise_multiplier=0.8, max_norm=1.0, seed=0))
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    priv = manifest["privacy"]
    assert priv["steps"] == res.trainer.step == 18
    assert priv["sample_rate"] == pytest.approx(50 / 300)
    assert priv["noise_multiplier"] == 0.8 and priv["max_norm"] == 1.0 and priv["delta"] == 1e-4
    assert priv["epsilon"] == pytest.approx(P.epsilon(0.8, 50 / 300, 18, 1e-4))
    eps = res.history["epsilon"].tolist()
    assert eps == sorted(eps) and eps[-1] == pytest.approx(priv["epsilon"])
    assert res.history["train_loss"].iloc[-1] < initial - 0.8  # it still learns


def test_cli_train_dp_prints_epsilon(tmp_path):
    from gradsift.cli import app

    out = tmp_path / "dp"
    r = CliRunner().invoke(app, [
        "train", "--epochs", "1", "--batch-size", "100", "--model", "mlp:width=16", "--no-coherence",
        "--dp", "--target-epsilon", "2", "--delta", "1e-5", "--max-grad-norm", "1.0",
        "--optimizer", "sgd:lr=0.5", "--run-dir", str(out), "-q",
    ])
    assert r.exit_code == 0, r.output
    assert "epsilon spent" in r.output
    priv = json.loads((out / "manifest.json").read_text())["privacy"]
    assert f"{priv['epsilon']:.3f}" in r.output and priv["epsilon"] <= 2.0
    bad = CliRunner().invoke(app, ["train", "--dp", "--noise-multiplier", "1", "--delta", "0.5",
                                   "--epochs", "1", "--run-dir", str(tmp_path / "bad"), "-q"])
    assert bad.exit_code == 2 and "delta" in bad.output


def test_big_cpu_noise_is_drawn_in_chunks_the_same_at_any_thread_count():
    """step_noise draws a big CPU tensor's noise in NOISE_CHUNK pieces, each with a generator
    of its own, in parallel: the values depend on (seed, step) only, neighbouring chunks are
    independent streams, the whole is standard normal, and small tensors still come from the
    step's one generator."""
    from scipy.stats import kstest

    from gradsift.aggregate.dp import NOISE_CHUNK, PARALLEL_NOISE_MIN, step_generator, step_noise

    like = [torch.empty(7), torch.empty(PARALLEL_NOISE_MIN + 5), torch.empty(3, 4)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = list(step_noise(like, 5, 2))
        torch.set_num_threads(2)
        two = list(step_noise(like, 5, 2))
    finally:
        torch.set_num_threads(before)
    for a, b, t in zip(one, two, like):
        assert a.shape == t.shape and torch.equal(a, b)
    gen = step_generator(5, 2, torch.device("cpu"))
    assert torch.equal(one[0], torch.randn(7, generator=gen))  # small: the step's generator,
    assert torch.equal(one[2], torch.randn(3, 4, generator=gen))  # which the big one skips
    big = one[1].double()
    c0, c1 = big[:NOISE_CHUNK], big[NOISE_CHUNK : 2 * NOISE_CHUNK]
    assert abs(float(torch.corrcoef(torch.stack([c0, c1]))[0, 1])) < 0.02  # not one stream twice
    assert kstest(big.numpy()[::7], "norm").pvalue > 1e-3
    assert not torch.equal(one[1], list(step_noise(like, 5, 3))[1])  # the next step: fresh
    assert not torch.equal(list(step_noise(like, None, 2))[1], list(step_noise(like, None, 2))[1])


def test_noise_added_in_place_is_the_drawn_noise():
    """add_step_noise adds, chunk by chunk through a scratch buffer, exactly the noise
    step_noise draws: small, big (chunked) and non-contiguous big tensors, 1 or 2 threads."""
    from gradsift.aggregate.dp import PARALLEL_NOISE_MIN, add_step_noise, step_noise

    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(7, generator=gen), torch.randn(PARALLEL_NOISE_MIN + 5, generator=gen),
            torch.randn(3, 4, generator=gen), torch.randn(8, PARALLEL_NOISE_MIN // 8 + 1, generator=gen).T]
    assert not base[3].is_contiguous()
    std = 0.3
    want = [u + std * z for u, z in zip(base, step_noise(base, 11, 4))]
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got = [u.clone() for u in base]
            add_step_noise(got, std, 11, 4)
            for g, w, u in zip(got, want, base):
                assert g.shape == u.shape and g.stride() == u.clone().stride()
                torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
    finally:
        torch.set_num_threads(before)


def test_a_bad_noise_seed_is_named():
    with pytest.raises(TypeError, match="seed must be an int or None, got 'x'"):
        P.gaussian_noise(1.0, 1.0, seed="x")
