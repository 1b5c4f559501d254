"""The memorization experiment: a short run end to end in the default test run, the full
default configuration under ``-m slow``."""

import json

import pytest
from typer.testing import CliRunner

from gradsift.cli import app
from gradsift.experiments.memorization import MemorizationConfig, run_memorization


def test_short_memorization_end_to_end(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["memorization", "--dataset", "digits", "--out", str(tmp_path), "--epochs", "2",
                            "--width", "32", "--n-train", "300", "-q"])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {(x["labels"], x["aggregator"]) for x in summary["runs"]} == {
        (lab, agg) for lab in ("real", "random") for agg in ("mean", "winsorize", "m3")
    }
    for run in summary["runs"]:
        assert 0 <= run["train_acc"] <= 1 and 0 <= run["test_acc"] <= 1
        assert len(run["coherence"]) == 2 and all(c > 0 for c in run["coherence"])
    assert (tmp_path / "memorization.png").stat().st_size > 10_000
    assert "memorization on digits" in r.output
    assert (tmp_path / "report.html").stat().st_size > 50_000  # the experiment's report, next to summary.json


@pytest.mark.slow
def test_default_memorization_shows_the_effect(tmp_path):
    """The full default experiment (several minutes): SGD fits random labels, winsorize fits
    at most half as well, M3 only delays memorization (measured: it ends below SGD but above
    half), real-label test accuracy within 3 points of SGD, and real labels are more
    coherent than random ones in the first epochs."""
    s = run_memorization(MemorizationConfig(), tmp_path, progress=False)
    f = s["findings"]
    runs = {(r["labels"], r["aggregator"]): r for r in s["runs"]}
    assert f["sgd_fits_random"]
    assert f["winsorize_suppresses_random"]
    assert runs[("random", "m3")]["train_acc"] < runs[("random", "mean")]["train_acc"]
    assert f["winsorize_real_test_gap"] <= 0.03 and f["m3_real_test_gap"] <= 0.03
    for k in range(3):
        assert runs[("real", "mean")]["coherence"][k] > 1.5 * runs[("random", "mean")]["coherence"][k]
