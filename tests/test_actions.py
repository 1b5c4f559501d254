import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

import gradsift as gs
from gradsift.actions import reweight, select, weighted_sampler
from gradsift.cli import app
from gradsift.data import Dataset, symmetric_noise
from gradsift.rundir import RunDir

runner = CliRunner()


def test_select_keeps_exact_fraction_hard_easy_random():
    s = np.array([5.0, 1.0, 3.0, np.nan, 4.0, 2.0, 0.0, 6.0, 7.0, 8.0])
    np.testing.assert_array_equal(select(s, 0.3), [7, 8, 9])
    np.testing.assert_array_equal(select(s, 0.3, prefer="easy"), [1, 5, 6])  # NaN is kept last
    assert 3 not in select(s, 0.9) and 3 not in select(s, 0.9, prefer="easy") and 3 in select(s, 1.0)
    for keep in (0.0, 0.25, 0.5, 0.77, 1.0):
        for prefer in ("hard", "easy", "random"):
            idx = select(s, keep, prefer=prefer, seed=1)
            assert len(idx) == round(keep * 10) and len(set(idx)) == len(idx)
    with pytest.raises(ValueError):
        select(s, 1.5)


def test_select_class_balanced_per_class():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    s = rng.normal(size=100) + labels  # class 2 hardest overall
    idx = select(s, 0.3, labels=labels, class_balanced=True)
    assert [int((labels[idx] == c).sum()) for c in range(3)] == [15, 9, 6]
    for c in range(3):  # within each class, the kept ones are the hardest
        kept_c = idx[labels[idx] == c]
        rest = np.setdiff1d(np.flatnonzero(labels == c), kept_c)
        assert s[kept_c].min() >= s[rest].max()
    unbalanced = select(s, 0.3, labels=labels)
    assert (labels[unbalanced] == 2).sum() > 6


def test_reweight_and_weighted_sampler():
    s = np.array([0.1, 0.5, 0.3, 0.9])
    w = reweight(s)
    assert w.mean() == pytest.approx(1.0)
    np.testing.assert_array_equal(np.argsort(w), np.argsort(s))
    np.testing.assert_allclose(reweight(s, strength=0), 1.0)
    np.testing.assert_array_equal(np.argsort(reweight(s, prefer="easy")), np.argsort(-s))
    drawn = torch.cat(list(weighted_sampler(np.array([0.0, 1.0, 0.0, 3.0]), 7, seed=2)(1)))
    assert len(drawn) == 4 and set(drawn.tolist()) <= {1, 3}


def _scored_run(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], [40, 40, 20])
    ids = np.arange(100) * 3 + 7
    run = RunDir(tmp_path / "run")
    run.write_scores(pd.DataFrame({"example_id": ids, "label": labels, "el2n": rng.random(100)}))
    return run.path, ids, labels


@pytest.mark.parametrize("balanced", [False, True])
def test_prune_cli_keeps_requested_fraction(tmp_path, balanced):
    path, ids, labels = _scored_run(tmp_path)
    out = tmp_path / "idx.npy"
    args = ["prune", "--run", str(path), "--by", "el2n", "--keep", "0.25", "--out", str(out)]
    res = runner.invoke(app, args + (["--class-balanced"] if balanced else []))
    assert res.exit_code == 0, res.output
    kept = np.load(out)
    assert len(kept) == 25 and set(kept) <= set(ids)
    table = gs.open_run(path).scores()
    if balanced:
        assert table.loc[kept, "label"].value_counts().sort_index().tolist() == [10, 10, 5]
    else:
        assert table.loc[kept, "el2n"].min() >= table.el2n.drop(kept).max()
    easy = runner.invoke(app, args[:-2] + ["--keep-easy", "--out", str(tmp_path / "e.npy")])
    assert easy.exit_code == 0
    assert table.loc[np.load(tmp_path / "e.npy"), "el2n"].max() <= table.el2n.drop(np.load(tmp_path / "e.npy")).min()
    bad = runner.invoke(app, ["prune", "--run", str(path), "--by", "nope", "--keep", "0.5"])
    assert bad.exit_code == 2 and "no score 'nope'" in bad.output


def _blobs(n=240, noise=0.1, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, size=(4, 6))
    y = rng.integers(0, 4, n)
    x = (centers[y] + rng.normal(size=(n, 6))).astype(np.float32)
    return symmetric_noise(Dataset(x, y, 4, name="blobs"), noise, seed=seed)


def test_label_issue_scores_find_flipped_labels():
    data = _blobs()
    truth = data.is_noisy
    kw = dict(epochs=8, width=32, folds=3)
    sig = gs.label_issues.label_issue_signals(data.x, data.y, **kw)
    assert sig.pred_probs.shape == (len(data), 4)
    np.testing.assert_allclose(sig.pred_probs.sum(1), 1, rtol=1e-5)
    for method in gs.label_issues.METHODS:
        assert roc_auc_score(truth, sig.signals[method]) > 0.85, method
    s = gs.label_issue_scores(data.x, data.y, **kw)  # deterministic under seed
    np.testing.assert_allclose(s, sig.signals["combined"])
    assert roc_auc_score(truth, s) > 0.9
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    s2 = gs.label_issue_scores(data.x, data.y, model=model, epochs=8, folds=3)
    assert roc_auc_score(truth, s2) > 0.85
    idx, details = gs.find_label_issues(data.x, data.y, **kw, return_details=True)
    assert truth[idx].mean() > 0.6 and len(idx) > 0.5 * truth.sum()
    assert list(details.columns) == ["score", "given_label", "suggested_label", "is_issue"]
    # the suggested label of a flagged flip is mostly its clean label
    assert (details.suggested_label.to_numpy()[idx] == data.clean_y[idx])[truth[idx]].mean() > 0.7
    assert len(gs.find_label_issues(data.x, data.y, epochs=2, width=8, folds=3, num_issues=5)) == 5


def _npz(tmp_path, n=200):
    rng = np.random.default_rng(1)
    centers = rng.normal(0, 3, size=(3, 5))
    y = rng.integers(0, 3, n)
    x = (centers[y] + rng.normal(size=(n, 5))).astype(np.float32)
    path = tmp_path / "blobs.npz"
    np.savez(path, x=x, y=y)
    return path


def test_issues_cli(tmp_path):
    out = tmp_path / "issues.csv"
    res = runner.invoke(app, ["issues", "--dataset", str(_npz(tmp_path)), "--label-noise", "symmetric",
                              "--noise-rate", "0.1", "--epochs", "6", "--width", "16", "--folds", "3",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    table = pd.read_csv(out)
    assert list(table.columns[:4]) == ["example_id", "score", "given_label", "suggested_label"]
    assert table.score.is_monotonic_decreasing and table.corrupted.mean() > 0.5
    assert "precision" in res.output


def test_pruning_curve_cli(tmp_path):
    out = tmp_path / "curve"
    res = runner.invoke(app, ["pruning-curve", "--dataset", str(_npz(tmp_path)), "--scores",
                              "el2n,grand,forgetting,memorization,random", "--fractions", "0.5,1.0",
                              "--seeds", "2", "--epochs", "3", "--width", "16", "--mem-models", "4",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    scores = ("el2n", "grand", "forgetting", "memorization")
    assert set(summary["results"]) == {f"{s} ({end})" for s in scores for end in ("hard", "easy")} | {"random"}
    for name, by_frac in summary["results"].items():
        assert set(by_frac) == {"0.5", "1.0"}
        assert by_frac["0.5"]["n_kept"] == 80 and len(by_frac["0.5"]["test_acc"]) == 2
        assert 0 <= by_frac["0.5"]["test_acc_mean"] <= 1
        lo, hi = by_frac["0.5"]["ci95"]
        assert lo <= by_frac["0.5"]["test_acc_mean"] <= hi
        assert ("vs_random" in by_frac["0.5"]) == (name != "random")
    hard, easy = summary["results"]["el2n (hard)"]["0.5"], summary["results"]["el2n (easy)"]["0.5"]
    assert hard["test_acc"] != easy["test_acc"]  # the two ends train on different subsets
    assert summary["results"]["el2n (hard)"]["1.0"]["test_acc"] == summary["results"]["random"]["1.0"]["test_acc"]
    assert set(summary["findings"]) == {"best_score_at", "above_random", "below_random", "better_end"}
    assert set(summary["findings"]["better_end"]) == set(scores)
    assert "↑" in res.output or "↓" in res.output or "95% CI" in res.output
    assert (out / "pruning_curve.png").stat().st_size > 1000
    assert set(gs.open_run(out).scores().columns) >= {"label", "el2n", "grand", "forgetting", "memorization"}
    bad = runner.invoke(app, ["pruning-curve", "--dataset", str(_npz(tmp_path)), "--scores", "bogus", "--out", str(out)])
    assert bad.exit_code == 2


def test_detection_quality_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    from gradsift.experiments.label_noise import detection_quality

    rng = np.random.default_rng(0)
    noisy = rng.random(50) < 0.3
    score = rng.random(50) + noisy
    flagged = np.argsort(-score)[:10]
    q = detection_quality(noisy, flagged, score)
    assert q["injected"] == noisy.sum()
    assert q["precision"] == noisy[flagged].mean()
    assert q["recall"] == noisy[flagged].sum() / noisy.sum()
    assert q["auroc"] == roc_auc_score(noisy, score)
    assert np.isnan(detection_quality(np.zeros(5, bool), np.arange(2), np.arange(5.0))["auroc"])
