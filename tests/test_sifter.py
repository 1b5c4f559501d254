"""gs.Sifter in the user's own loop, and gs.fit on torch Datasets, DataLoaders and dict inputs."""

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradsift as gs
from gradsift.data import load_digits
from gradsift.models import mlp
from gradsift.sampling import shuffled_batches


@pytest.fixture(scope="module")
def digits_small():
    tr, te = load_digits()
    return tr.subset(np.arange(200)), te.subset(np.arange(80))


def make_model(seed=0, width=16):
    torch.manual_seed(seed)
    return mlp(64, 10, width=width)


def assert_same_params(a, b, **kw):
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, msg=n, **(kw or dict(atol=1e-6, rtol=1e-5)))


LOSS = nn.CrossEntropyLoss(reduction="none")


@pytest.mark.parametrize("agg", ["winsorize:c=2", "mean"])
def test_sifter_loop_equals_fit(digits_small, agg):
    tr, _ = digits_small
    fitted = gs.fit(make_model(), tr, aggregator=agg, optimizer="sgd:lr=0.2,momentum=0.9", epochs=2,
                    batch_size=40, seed=5, progress=False).model
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    x, y = tr.tensors()
    ids = torch.from_numpy(tr.example_ids)
    sampler = shuffled_batches(len(tr), 40, 5)
    with gs.Sifter(model, LOSS, aggregator=agg) as sifter:
        for epoch in (1, 2):
            for pos in sampler(epoch):
                losses = sifter.backward(x[pos], y[pos], ids=ids[pos])
                assert losses.shape == (len(pos),)
                opt.step()
                opt.zero_grad()
            sifter.end_epoch()
    assert sifter.step == 10 and [r["epoch"] for r in sifter.history] == [1, 2]
    assert_same_params(model, fitted)


def test_mean_costs_one_plain_backward(monkeypatch, digits_small):
    tr, _ = digits_small
    x, y = tr.tensors()
    import gradsift.aggregate.layerwise as step_mod

    def boom(*a, **k):
        raise AssertionError("per-example gradients computed for plain mean")

    monkeypatch.setattr(step_mod, "per_example", boom)
    monkeypatch.setattr(step_mod.layers, "record", boom)
    model, ref = make_model(), make_model()
    for agg in (None, "mean"):
        s = gs.Sifter(model, LOSS, aggregator=agg)
        losses = s.backward(x[:30], y[:30])
        LOSS(ref(x[:30]), y[:30]).mean().backward()
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad)
        torch.testing.assert_close(losses, LOSS(ref(x[:30]), y[:30]).detach())
        ref.zero_grad()


def test_fit_on_torch_dataset_and_dataloader_equals_gs_dataset(digits_small):
    tr, te = digits_small
    kw = dict(aggregator="winsorize:c=2", optimizer="sgd:lr=0.2", epochs=2, batch_size=40, seed=1, progress=False)
    ref = gs.fit(make_model(), tr, te, **kw)
    x, y = tr.tensors()
    xt, yt = te.tensors()
    tds = gs.fit(make_model(), TensorDataset(x, y), TensorDataset(xt, yt), **kw)
    assert_same_params(tds.model, ref.model)
    cols = ["train_acc", "train_loss", "test_acc", "test_loss"]
    pd.testing.assert_frame_equal(tds.history[cols], ref.history[cols], atol=1e-5, rtol=1e-5)
    # a DataLoader: its own batches; the same as a Sifter loop over the same loader
    torch.manual_seed(3)
    loader = DataLoader(gs.data.indexed(TensorDataset(x, y)), batch_size=40, shuffle=True)
    res = gs.fit(make_model(), loader, DataLoader(TensorDataset(xt, yt), batch_size=64),
                 **{k: v for k, v in kw.items() if k != "batch_size"})
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    torch.manual_seed(1)  # fit seeds torch with seed=1 before the first epoch
    with gs.Sifter(model, LOSS, aggregator="winsorize:c=2") as sifter:
        for _ in range(2):
            for ids, xb, yb in loader:
                sifter.backward(xb, yb, ids=ids)
                opt.step()
                opt.zero_grad()
            sifter.end_epoch()
    assert_same_params(model, res.model)
    assert list(res.history.epoch) == [1, 2] and res.history.test_acc.notna().all()


class DictData(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixels": self.x[i], "scale": torch.tensor(2.0)}, int(self.y[i])


class DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = mlp(64, 10, width=16)

    def forward(self, pixels, scale):
        return self.net(pixels * scale[:, None] / 2)


def test_fit_with_dict_inputs_and_recorders(digits_small, tmp_path):
    tr, te = digits_small
    x, y = tr.tensors()
    res = gs.fit(DictModel(), DictData(x, y), DictData(*te.tensors()), aggregator="mean",
                 optimizer="sgd:lr=0.2", epochs=2, batch_size=40, progress=False,
                 recorders=[gs.DynamicsRecorder()], run_dir=tmp_path / "r")
    ref = gs.fit(make_model(), tr, te, aggregator="mean", optimizer="sgd:lr=0.2", epochs=2, batch_size=40,
                 progress=False)
    assert_same_params(res.model.net, ref.model)
    scores = pd.read_parquet(tmp_path / "r" / "scores.parquet")
    assert sorted(scores.example_id) == list(range(200))  # ids = positions of the torch Dataset


def test_indexed_and_malformed_items(digits_small):
    tr, _ = digits_small
    x, y = tr.tensors()
    ds = gs.data.indexed(TensorDataset(x, y), ids=np.arange(len(y)) + 1000)
    i, xi, yi = ds[3]
    assert i == 1003 and torch.equal(xi, x[3]) and int(yi) == int(y[3])
    with pytest.raises(gs.DataError, match="duplicate example ids"):
        gs.data.indexed(TensorDataset(x, y), ids=np.zeros(len(y)))

    class Bad(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return x[i]  # not (inputs, target)

    with pytest.raises(gs.DataError, match=r"expected \(inputs, target\) or \(example_id, inputs, target\)"):
        gs.fit(make_model(), Bad(), epochs=1, batch_size=2, progress=False)

    class DupIds(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return 7, x[i], y[i]

    with pytest.raises(gs.DataError, match="duplicate example ids"):
        gs.data.examples(DupIds()).ids
    with pytest.raises(gs.DataError, match="cannot train on a str"):
        gs.fit(make_model(), "digits")


def test_sifter_recorders_with_data_and_run_dir(digits_small, tmp_path):
    tr, _ = digits_small
    x, y = tr.tensors()
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(gs.data.indexed(tr), batch_size=50, shuffle=True)
    with gs.Sifter(model, LOSS, aggregator="m3", data=tr, optimizer=opt, run_dir=tmp_path / "own",
                   recorders=[gs.DynamicsRecorder(), gs.CoherenceRecorder(m=10)]) as sifter:
        for _ in range(2):
            for ids, xb, yb in loader:
                sifter.backward(xb, yb, ids=ids)  # positions looked up in data
                opt.step()
                opt.zero_grad()
            row = sifter.end_epoch(note=1.0)
    assert {"m_coherence", "lr", "note", "forgotten"} <= set(row)
    run = gs.open_run(tmp_path / "own")
    assert run.manifest["status"] == "finished"
    assert {"metrics", "scores", "dynamics", "coherence"} <= set(run.tables)
    assert sorted(run.scores().index) == sorted(tr.example_ids.tolist())


def test_sifter_without_data_says_what_it_needs():
    s = gs.Sifter(make_model(), LOSS, recorders=[gs.CoherenceRecorder(m=4)])
    with pytest.raises(gs.GradsiftError, match="needs the training set"):
        s.open()


def test_privacy_in_own_loop_checks_the_loader(digits_small):
    tr, _ = digits_small
    model = make_model()
    plan = gs.privacy.DPSGD(noise_multiplier=1.0, delta=1e-3, seed=0).plan(len(tr), batch_size=40, epochs=1)
    ds = gs.data.indexed(tr)
    with pytest.raises(gs.privacy.PrivacyConfigError, match="Poisson"):
        gs.Sifter(model, LOSS, privacy=plan, data=DataLoader(ds, batch_size=40, shuffle=True))
    sampler = gs.sampling.PoissonBatchSampler(len(tr), plan.sample_rate, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(ds, batch_sampler=sampler)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gs.Sifter(model, LOSS, privacy=plan, data=loader) as sifter:
        for ids, xb, yb in loader:
            sifter.backward(xb, yb, ids=ids)
            opt.step()
            opt.zero_grad()
        row = sifter.end_epoch()
    assert row["epsilon"] > 0 and sifter.privacy_report["steps"] == len(sampler)


def test_bf16_precision_runs(digits_small):
    tr, te = digits_small
    res = gs.fit(make_model(), tr, te, epochs=1, batch_size=50, precision="bf16", progress=False)
    assert np.isfinite(res.history.train_loss.iloc[0])
    with pytest.raises(gs.GradsiftError, match="precision"):
        gs.fit(make_model(), tr, precision="fp8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fit_and_sifter_on_cuda(digits_small):
    tr, te = digits_small
    kw = dict(aggregator="winsorize:c=2", optimizer="sgd:lr=0.2", epochs=1, batch_size=40, progress=False)
    cpu = gs.fit(make_model(), tr, te, **kw)
    gpu = gs.fit(make_model(), tr, te, device="cuda", recorders=[gs.DynamicsRecorder()], **kw)
    assert next(gpu.model.parameters()).is_cuda
    for p, q in zip(cpu.model.parameters(), gpu.model.parameters()):
        torch.testing.assert_close(p, q.cpu(), atol=1e-4, rtol=1e-3)
    x, y = TensorDataset(*tr.tensors()).tensors
    loader = DataLoader(TensorDataset(x, y), batch_size=40)
    res = gs.fit(make_model(), loader, device="cuda", precision="bf16", **{k: v for k, v in kw.items() if k != "batch_size"})
    assert np.isfinite(res.history.train_loss.iloc[0])


def test_tensorboard_recorder(digits_small, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tr, te = digits_small
    gs.fit(make_model(), tr, te, epochs=2, batch_size=50, progress=False, run_dir=tmp_path / "r",
           recorders=[gs.DynamicsRecorder(), gs.CoherenceRecorder(m=8), gs.TensorBoardRecorder()],
           privacy=gs.privacy.DPSGD(noise_multiplier=1.0, delta=1e-3, seed=0))
    acc = EventAccumulator(str(tmp_path / "r" / "tensorboard"))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train/acc", "test/loss", "m_coherence", "epsilon"} <= scalars
    assert [e.step for e in acc.Scalars("epsilon")] == [1, 2]
    assert {"scores/forgetting", "scores/cum_loss"} <= set(acc.Tags()["histograms"])


def test_issue_example_own_loop_without_data(digits_small, tmp_path):
    """The issue's loop: Sifter(..., recorders=[DynamicsRecorder()], run_dir=...), no data=."""
    tr, _ = digits_small
    x, y = tr.tensors()
    train = gs.data.indexed(TensorDataset(x, y))  # ids = positions
    loader = DataLoader(train, batch_size=32, shuffle=True)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gs.Sifter(model, LOSS, aggregator="winsorize:c=3", recorders=[gs.DynamicsRecorder()],
                   run_dir=tmp_path / "own") as sifter:
        for epoch in range(2):
            for ids, xb, yb in loader:
                losses = sifter.backward(xb, yb, ids=ids)
                assert losses.shape == (len(ids),)
                optimizer.step()
                optimizer.zero_grad()
            sifter.end_epoch()
    scores = gs.open_run(tmp_path / "own").scores()
    assert sorted(scores.index) == list(range(len(tr)))
    np.testing.assert_array_equal(scores.label.to_numpy(), tr.y)
    assert scores.forgetting.notna().all()


class _Items(torch.utils.data.Dataset):
    """(example_id, inputs, target) items whose ids are not positions."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return 1000 + 7 * i, self.x[i], self.y[i]


def test_recorders_learn_ids_without_data(digits_small, tmp_path):
    """AUM, alignment and dynamics in the user's own loop without data=: the ids (not
    positions) are learnt as they come, also ids first seen in a later epoch, and every
    score equals the same loop with data= given."""
    tr, _ = digits_small
    x, y = tr.tensors()
    items = _Items(x[:120], y[:120])
    half = torch.utils.data.Subset(items, range(60))

    def run(data, where):
        model = make_model(3)
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        recs = [gs.AUMRecorder(), gs.scores.AlignmentRecorder(), gs.DynamicsRecorder()]
        with gs.Sifter(model, LOSS, aggregator="m3", recorders=recs, run_dir=tmp_path / where, data=data) as s:
            for epoch, ds in enumerate((half, items, items)):  # epoch 1 sees only the first half
                loader = DataLoader(ds, batch_size=20, shuffle=True, generator=torch.Generator().manual_seed(epoch))
                for ids, xb, yb in loader:
                    s.backward(xb, yb, ids=ids)
                    opt.step()
                    opt.zero_grad()
                s.end_epoch()
        return gs.open_run(tmp_path / where).scores(), recs

    known, _ = run(items, "known")
    learnt, recs = run(None, "learnt")
    assert sorted(learnt.index) == [1000 + 7 * i for i in range(120)]
    pd.testing.assert_frame_equal(learnt.sort_index(), known.sort_index(), check_like=True)
    assert learnt.aum.notna().all() and learnt.alignment.notna().all()
    # the ids first seen in epoch 2 have one presentation less
    aum = recs[0]
    seen = dict(zip(aum.ids.tolist(), aum.count.tolist()))
    assert seen[1000] == 3 and seen[1000 + 7 * 119] == 2


@pytest.mark.parametrize("mode", ["exact", "local"])
def test_distributed_sifter_takes_step_update(digits_small, mode):
    """Two thread-ranks, each with its contiguous half of a batch of 11: the exact mode
    gives the one-process update, the local mode the size-weighted mean of each half's
    own update (both by gs.aggregate.step_update, the one step path)."""
    from gradsift.distributed.trainer import DistributedSifter

    from ._dist import run_threads

    tr, _ = digits_small
    x, y = tr.tensors()
    x, y = x[:11], y[:11]
    agg = "winsorize:c=1"
    bounds = [(0, 6), (6, 11)]
    init = make_model(4)  # built here: threads would race on torch's global seed

    def rank(comm):
        model = copy.deepcopy(init)
        s = DistributedSifter(model, comm=comm, mode=mode, loss_fn=LOSS, aggregator=agg)
        lo, hi = bounds[comm.rank]
        s.backward(x[lo:hi], y[lo:hi], ids=torch.arange(lo, hi))
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    got = run_threads(2, rank)
    for g in got:
        assert not isinstance(g, BaseException), g
    model = copy.deepcopy(init)
    if mode == "exact":
        want = gs.aggregate.step_update(model, LOSS, x, y, agg, layerwise=False).update
    else:
        parts = [gs.aggregate.step_update(model, LOSS, x[lo:hi], y[lo:hi], agg).update for lo, hi in bounds]
        want = {n: (parts[0][n] * 6 + parts[1][n] * 5) / 11 for n in parts[0]}
    for g in got:
        for n in want:
            torch.testing.assert_close(g[n], want[n], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("agg,fuse", [("m3", True), ("clip:max_norm=0.5+mean", False)])
def test_sifter_loop_equals_fit_fused_and_chained(digits_small, agg, fuse):
    tr, _ = digits_small
    fitted = gs.fit(make_model(), tr, aggregator=agg, optimizer="sgd:lr=0.2", epochs=1, batch_size=40, seed=2,
                    fuse=fuse, progress=False)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    x, y = tr.tensors()
    with gs.Sifter(model, LOSS, aggregator=agg, fuse=fuse) as sifter:
        for pos in shuffled_batches(len(tr), 40, 2)(1):
            sifter.backward(x[pos], y[pos], ids=torch.as_tensor(pos))
            opt.step()
            opt.zero_grad()
        sifter.end_epoch()
    assert sifter.fused == fuse and fitted.trainer.fused == fuse
    assert_same_params(model, fitted.model)


@pytest.mark.parametrize("agg", ["mean", "winsorize:c=2"])
def test_bf16_autocast_on_cpu_is_used_and_close_to_fp32(digits_small, agg):
    """precision='bf16' runs the forward under CPU bfloat16 autocast: the losses differ
    from fp32 (so autocast is on) by bfloat16's rounding, the update stays close and
    lands in the float32 .grad."""
    tr, _ = digits_small
    x, y = tr.tensors()
    out = {}
    for precision in ("fp32", "bf16"):
        model = make_model(1)
        losses = gs.Sifter(model, LOSS, aggregator=agg, precision=precision).backward(x[:40], y[:40])
        out[precision] = losses, {n: p.grad for n, p in model.named_parameters()}
    (l32, g32), (l16, g16) = out["fp32"], out["bf16"]
    assert not torch.equal(l32, l16)
    torch.testing.assert_close(l16.float(), l32, atol=0.05, rtol=0.02)
    for n in g32:
        assert g16[n].dtype == torch.float32
        rel = float((g16[n] - g32[n]).norm() / g32[n].norm())
        assert rel < 0.05, (n, rel)
