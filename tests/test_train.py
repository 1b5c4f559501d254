import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import gradsift as gs
from gradsift.cli import app
from gradsift.data import load_digits
from gradsift.models import mlp


@pytest.fixture(scope="module")
def digits_small():
    tr, te = load_digits()
    return tr.subset(np.arange(300)), te.subset(np.arange(100))


def make_model(seed=0, width=32):
    torch.manual_seed(seed)
    return mlp(64, 10, width=width)


# coordinate median and trimmed mean learn slowly on sparse ReLU/pixel gradients: most
# coordinates are zero for most examples, so their median is zero.
@pytest.mark.parametrize("agg,min_drop", [("mean", 0.5), ("winsorize:c=2", 0.5), ("m3", 0.5), ("rm3", 0.5),
                                          ("trimmed_mean:fraction=0.1", 0.1), ("coordinate_median", 0.005),
                                          ("clip:max_norm=1+mean", 0.3)])
def test_fit_learns_with_each_aggregator(digits_small, agg, min_drop):
    tr, te = digits_small
    model = make_model()
    x, y = tr.tensors()
    initial = gs.train.evaluate(model, torch.nn.CrossEntropyLoss(reduction="none"), x, y)["loss"]
    res = gs.fit(model, tr, te, aggregator=agg, optimizer="sgd:lr=0.3,momentum=0.9", epochs=3, batch_size=50)
    h = res.history
    assert list(h.epoch) == [1, 2, 3]
    assert h.train_loss.iloc[-1] < initial - min_drop  # learned something


def test_mean_aggregator_equals_plain_sgd(digits_small):
    tr, _ = digits_small
    a = gs.fit(make_model(), tr, aggregator="mean", optimizer="sgd:lr=0.1", epochs=1, batch_size=50).model
    b = gs.fit(make_model(), tr, aggregator="mean", optimizer="sgd:lr=0.1", epochs=1, batch_size=50,
               recorders=[gs.CoherenceRecorder(m=20)]).model  # per-example path
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-4)


def test_deterministic_under_seed(digits_small):
    tr, te = digits_small
    h1 = gs.fit(make_model(), tr, te, aggregator="m3", epochs=2, batch_size=50, seed=3).history
    h2 = gs.fit(make_model(), tr, te, aggregator="m3", epochs=2, batch_size=50, seed=3).history
    pd.testing.assert_frame_equal(h1, h2)


def test_run_dir_and_resume(digits_small, tmp_path):
    tr, te = digits_small
    full = gs.fit(make_model(), tr, te, aggregator="winsorize:c=1", epochs=3, batch_size=50,
                  recorders=[gs.CoherenceRecorder(m=20)], run_dir=tmp_path / "full")
    manifest = json.loads((tmp_path / "full" / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["status"] == "finished"
    assert manifest["config"]["aggregator"] == "winsorize(c=1)" and "torch" in manifest["versions"]
    metrics = pd.read_parquet(tmp_path / "full" / "metrics.parquet")
    assert list(metrics.epoch) == [1, 2, 3] and "m_coherence" in metrics
    coh = pd.read_parquet(tmp_path / "full" / "coherence.parquet")
    assert set(coh.layer) >= {"all", "1.weight"}
    # interrupted after 2 epochs, then resumed: same result as the uninterrupted run
    gs.fit(make_model(), tr, te, aggregator="winsorize:c=1", epochs=2, batch_size=50,
           recorders=[gs.CoherenceRecorder(m=20)], run_dir=tmp_path / "part")
    resumed = gs.fit(make_model(seed=99), tr, te, aggregator="winsorize:c=1", epochs=3, batch_size=50,
                     recorders=[gs.CoherenceRecorder(m=20)], run_dir=tmp_path / "part", resume=True)
    pd.testing.assert_frame_equal(resumed.history, full.history)


def test_nonfinite_option(digits_small):
    tr, _ = digits_small
    bad = tr.subset(np.arange(50))
    bad.x[3] = np.nan  # a corrupt example: its gradient is NaN
    with pytest.raises(gs.NonFiniteGradientError):
        gs.fit(make_model(), bad, aggregator="m3", epochs=1, batch_size=50)
    res = gs.fit(make_model(), bad, aggregator="m3", epochs=1, batch_size=50, on_nonfinite="drop")
    assert res.trainer.agg_state[0] >= 1


def test_bad_arguments(digits_small):
    tr, _ = digits_small
    with pytest.raises(ValueError, match="per-example gradients; chain"):
        gs.fit(make_model(), tr, aggregator="clip:max_norm=1")
    with pytest.raises(gs.SpecError, match="unknown optimizer"):
        gs.fit(make_model(), tr, optimizer="sgdd:lr=1")
    with pytest.raises(ValueError, match="epochs"):
        gs.fit(make_model(), tr, epochs=0)


def test_cli_train_and_errors(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["train", "--epochs", "1", "--model", "mlp:width=16", "--aggregator", "winsorize:c=2",
                            "--label-noise", "symmetric", "--noise-rate", "0.2", "--run-dir", str(tmp_path / "r"), "-q"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "r" / "metrics.parquet").exists()
    r = runner.invoke(app, ["train", "--aggregator", "bogus", "--run-dir", str(tmp_path / "x")])
    assert r.exit_code == 2 and "unknown aggregator 'bogus'" in r.output
    r = runner.invoke(app, ["train", "--dataset", str(tmp_path / "nope.npz"), "--run-dir", str(tmp_path / "x")])
    assert r.exit_code == 2 and "no such file" in r.output
    assert "Traceback" not in r.output


def test_lr_schedule_and_resume(digits_small, tmp_path):
    tr, _ = digits_small
    kw = dict(aggregator="mean", optimizer="sgd:lr=0.1", epochs=4, batch_size=100,
              lr_schedule="multisteplr:milestones=(2,),gamma=0.1")
    full = gs.fit(make_model(), tr, **kw).history
    np.testing.assert_allclose(full.lr, [0.1, 0.1, 0.01, 0.01])
    gs.fit(make_model(), tr, **{**kw, "epochs": 2}, run_dir=tmp_path / "r")
    resumed = gs.fit(make_model(), tr, **kw, run_dir=tmp_path / "r", resume=True).history
    pd.testing.assert_frame_equal(resumed, full)
    with pytest.raises(gs.SpecError, match="unknown lr schedule"):
        gs.fit(make_model(), tr, lr_schedule="warpdrive")


@pytest.mark.parametrize("agg", ["m3", "winsorize:c=2", "clip:max_norm=1+mean"])
def test_fused_training_equals_unfused(digits_small, agg):
    tr, _ = digits_small
    kw = dict(aggregator=agg, optimizer="sgd:lr=0.1,momentum=0.9", epochs=2, batch_size=50)
    fused = gs.Trainer(make_model(), tr, fuse=True, **kw)
    assert fused.fused
    a = fused.fit().model
    b = gs.fit(make_model(), tr, **kw).model
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-4)
