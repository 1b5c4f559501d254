"""The HTML report: contents per directory kind, no external URLs, and the page checked in
headless Chromium (no console errors, every plot decoded, a screenshot)."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import gradsift as gs
from gradsift.cli import app
from gradsift.data import load_digits
from gradsift.models import mlp
from gradsift.report import ReportError, build_report, write_report
from gradsift.report import figures
from gradsift.report.run_sections import privacy_info
from gradsift.report.sift import corrupted_ids, pruning_tables
from gradsift.scores import DynamicsRecorder

EXTERNAL = re.compile(r"""(?:src|href|action|poster|data)\s*=\s*["']?\s*(?:https?:)?//""", re.I)
URL = re.compile(r"https?://", re.I)


def plot_ids(html: str) -> list[str]:
    return re.findall(r'<figure class="plot" id="plot-([^"]+)"', html)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny real run (digits with 20% symmetric label noise, 2 epochs, per-example scores
    from the dynamics recorder), plus a label-issues table."""
    path = tmp_path_factory.mktemp("report") / "run"
    train, test = load_digits(seed=0)
    train = gs.data.corrupt(train, "symmetric", 0.2, seed=0)  # as `gradsift train` does
    model = mlp(64, 10, width=16)
    gs.fit(model, train, test.subset(np.arange(100)), aggregator="mean", optimizer="sgd:lr=0.3,momentum=0.9",
           epochs=2, batch_size=100, recorders=[gs.CoherenceRecorder(m=20), DynamicsRecorder()], run_dir=path,
           config={"dataset": "digits", "label_noise": "symmetric", "noise_rate": 0.2})
    rng = np.random.default_rng(0)
    ids, noisy = train.example_ids, train.is_noisy
    order = np.argsort(-noisy.astype(float) - 0.1 * rng.random(len(ids)))[:20]
    pd.DataFrame({"example_id": ids[order], "score": np.linspace(1, 0.5, 20),
                  "given_label": train.y[order], "suggested_label": train.clean_y[order]}).to_csv(path / "issues.csv", index=False)
    return path


@pytest.fixture(scope="module")
def dp_run_dir(tmp_path_factory) -> Path:
    """A tiny DP-SGD run (digits, 2 epochs, noise multiplier 1): the manifest's privacy block
    and the per-epoch epsilon come from the privacy accountant."""
    path = tmp_path_factory.mktemp("report") / "dp"
    train, test = load_digits()
    gs.fit(mlp(64, 10, width=16), train.subset(np.arange(400)), test.subset(np.arange(100)),
           optimizer="sgd:lr=0.5", epochs=2, batch_size=50, run_dir=path, config={"dataset": "digits"},
           privacy=gs.privacy.DPSGD(delta=1e-3, noise_multiplier=1.0, seed=0))
    return path


@pytest.fixture(scope="module")
def experiment_dir(tmp_path_factory) -> Path:
    """A tiny memorization experiment written by the CLI (which writes its report)."""
    out = tmp_path_factory.mktemp("report") / "mem"
    r = CliRunner().invoke(app, ["memorization", "--out", str(out), "--epochs", "2", "--width", "16",
                                 "--n-train", "200", "-q"])
    assert r.exit_code == 0, r.output
    return out


def test_run_report_has_every_section(run_dir, tmp_path):
    out = write_report(run_dir, tmp_path / "r.html")
    html = out.read_text()
    for section in ("config", "training", "coherence", "scores", "issues"):
        assert f'id="section-{section}"' in html, section
    assert 'id="section-privacy"' not in html  # not a DP run
    ids = plot_ids(html)
    assert {"accuracy", "loss", "coherence", "coherence-layers", "score-loss", "score-margin", "score-cum-loss",
            "score-forgetting", "score-learning-time"} <= set(ids)
    assert "score-label" not in ids  # labels are not scores
    assert "red: examples whose label was corrupted (280)" in html  # recomputed from the recorded recipe
    assert html.count("<dt>corrupted</dt><dd>yes</dd>") == 12
    assert sum(i.startswith("issue-") for i in ids) == 12  # the top 12 label issues drawn
    assert len(ids) == len(set(ids))
    assert not URL.search(html) and not EXTERNAL.search(html)
    assert out.stat().st_mode & 0o044  # readable by others, like any written file


def test_dp_report_shows_the_privacy_spent(dp_run_dir):
    spent = json.loads((dp_run_dir / "manifest.json").read_text())["privacy"]
    metrics = pd.read_parquet(dp_run_dir / "metrics.parquet")
    assert metrics["epsilon"].iloc[-1] == pytest.approx(spent["epsilon"]) and spent["steps"] > 0
    html = build_report(dp_run_dir)
    assert html.index('id="section-privacy"') < html.index('id="section-training"')  # right after the config
    assert f"ε = {spent['epsilon']:.3g} spent at δ = 0.001 (σ = 1, C = 1, q = 0.125, {spent['steps']} steps)" in html
    assert "privacy" in plot_ids(html) and '<table id="privacy-table">' in html


def test_sections_follow_the_directory_contents(run_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("manifest.json", "metrics.parquet"):
        shutil.copy(run_dir / name, bare / name)
    html = build_report(bare)
    assert 'id="section-training"' in html and 'id="section-coherence"' in html  # from metrics' m_coherence
    for absent in ("privacy", "scores", "issues"):
        assert f'id="section-{absent}"' not in html
    assert "coherence-layers" not in plot_ids(html)  # needs coherence.parquet


def test_issue_examples_are_drawn_as_images_or_lines():
    image = figures.example_drawing(np.arange(64.0), (8, 8))
    assert len(image.axes[0].images) == 1 and image.axes[0].images[0].get_array().shape == (8, 8)
    line = figures.example_drawing(np.sin(np.arange(40.0)), (40,))
    assert not line.axes[0].images and len(line.axes[0].lines[0].get_ydata()) == 40


def test_experiment_report_written_by_the_command(experiment_dir):
    html = (experiment_dir / "report.html").read_text()
    assert "gradsift memorization" in html
    for section in ("config", "findings", "memorization", "runs"):
        assert f'id="section-{section}"' in html
    ids = set(plot_ids(html))
    assert "memorization" in ids
    for labels in ("real", "random"):
        for agg in ("mean", "winsorize", "m3"):
            assert {f"run-{labels}-{agg}-accuracy", f"run-{labels}-{agg}-coherence-layers"} <= ids
    assert not URL.search(html)


def test_pruning_summary_formats():
    nested = {"curves": {"el2n": {"0.5": {"mean": 0.8, "std": 0.01}, "1.0": {"mean": 0.9, "std": 0.0}},
                         "random": {"0.5": 0.7, "1.0": 0.9}}}
    rows = {"results": [{"score": "el2n", "fraction": 0.5, "test_acc": 0.8, "std": 0.01},
                        {"score": "el2n", "fraction": 1.0, "test_acc": 0.9, "std": 0.0}]}
    written = {"results": {"el2n": {"0.5": {"test_acc_mean": 0.8, "test_acc_std": 0.01, "test_acc": [0.79, 0.81]},
                                    "1.0": {"test_acc_mean": 0.9, "test_acc_std": 0.0, "test_acc": [0.9, 0.9]}}}}
    per_seed = {"results": {"el2n": {"0.5": {"test_acc": [0.79, 0.81]}, "1.0": {"test_acc": [0.9]}}}}
    for summary in (nested, rows, written, per_seed):
        t = pruning_tables(summary)
        el2n = t["el2n"].sort_values("fraction")
        assert list(el2n["fraction"]) == [0.5, 1.0] and np.allclose(el2n["mean"], [0.8, 0.9])
    assert pruning_tables({"runs": []}) == {}


def test_corrupted_ids_recomputed_only_when_labels_match(run_dir):
    scores = gs.open_run(run_dir).scores()
    config = {"dataset": "digits", "label_noise": "symmetric", "noise_rate": 0.2}
    ids = corrupted_ids(config, 0, scores)
    assert len(ids) == 280 and ids <= set(scores.index)
    assert corrupted_ids(config, 1, scores) is None  # another seed: other labels, no overlay
    assert corrupted_ids({**config, "label_noise": "none"}, 0, scores) is None


def test_privacy_info_only_for_dp_runs():
    assert privacy_info({"config": {"epochs": 3}}) == {}
    assert privacy_info({"config": {"sigma": 1.0, "delta": 1e-5}, "epsilon": 3.0}) == {
        "epsilon": 3.0, "sigma": 1.0, "delta": 1e-5}


def test_issues_csv_report(run_dir, tmp_path):
    shutil.copy(run_dir / "issues.csv", tmp_path / "issues.csv")
    r = CliRunner().invoke(app, ["report", str(tmp_path / "issues.csv"), "--dataset", "digits", "--top-issues", "5"])
    assert r.exit_code == 0, r.output
    html = (tmp_path / "issues.html").read_text()
    assert sum(i.startswith("issue-") for i in plot_ids(html)) == 5 and "<h3>Next issues</h3>" in html
    no_data = build_report(tmp_path / "issues.csv")  # without --dataset: listed, not drawn
    assert not plot_ids(no_data) and "examples are not drawn" in no_data
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ReportError, match="no example_id column"):
        build_report(tmp_path / "other.csv")


def test_report_errors(tmp_path):
    with pytest.raises(ReportError, match="no such directory"):
        build_report(tmp_path / "missing")
    with pytest.raises(ReportError, match="neither summary.json"):
        build_report(tmp_path)


@pytest.fixture(scope="module")
def pruning_dir(tmp_path_factory) -> Path:
    """A tiny pruning-curve experiment written by the CLI (which writes its report)."""
    out = tmp_path_factory.mktemp("report") / "pruning"
    r = CliRunner().invoke(app, ["pruning-curve", "--dataset", "digits", "--scores", "el2n,forgetting,random",
                                 "--fractions", "0.5,1.0", "--seeds", "1", "--epochs", "1", "--width", "8",
                                 "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def issues_csv(tmp_path_factory) -> Path:
    """Label issues of noisy digits written by the CLI (which writes issues.html beside)."""
    out = tmp_path_factory.mktemp("report") / "issues.csv"
    r = CliRunner().invoke(app, ["issues", "--dataset", "digits", "--label-noise", "symmetric", "--noise-rate", "0.2",
                                 "--folds", "2", "--epochs", "2", "--width", "16", "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    return out


def test_pruning_curve_report_written_by_the_command(pruning_dir):
    html = (pruning_dir / "report.html").read_text()
    assert "gradsift pruning-curve" in html
    for section in ("config", "findings", "pruning", "scores"):
        assert f'id="section-{section}"' in html
    assert {"pruning", "score-el2n", "score-forgetting"} <= set(plot_ids(html))
    assert re.search(r'<table id="pruning-table">.*<td>random</td>', html)
    assert not URL.search(html)


def test_issues_report_written_by_the_command(issues_csv):
    html = issues_csv.with_suffix(".html").read_text()
    assert sum(i.startswith("issue-") for i in plot_ids(html)) == 12
    assert "<dt>given</dt>" in html and "<dt>suggested</dt>" in html and "<dt>corrupted</dt>" in html
    assert not URL.search(html)


# ------------------------------------------------------------------ headless Chromium

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium driven by selenium through the system chromedriver."""
    missing = [n for n, p in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if not p]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (pip install selenium)")
    if missing:
        reason = f"browser test needs {', '.join(missing)} (apt-get install chromium chromium-driver)"
        if os.environ.get("GRADSIFT_REQUIRE_BROWSER"):
            pytest.fail(reason + "; GRADSIFT_REQUIRE_BROWSER is set, so this is an error")
        pytest.skip(reason)
    profile = tempfile.mkdtemp(prefix="gradsift-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1400,1000", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def open_and_check(driver, html_path: Path, screenshot: Path) -> dict:
    """Load ``html_path``; return what the page shows; save a full-page screenshot."""
    driver.get_log("browser")  # drop messages of earlier pages
    driver.get(html_path.resolve().as_uri())
    state = driver.execute_script("""
        const figs = [...document.querySelectorAll('figure.plot')];
        return {
          title: document.title,
          sections: [...document.querySelectorAll('section[data-section]')].map(s => s.dataset.section),
          plots: figs.map(f => ({id: f.dataset.plot, n: f.querySelectorAll('img').length,
                                 ok: [...f.querySelectorAll('img')].every(i => i.complete && i.naturalWidth > 0)})),
          external: [...document.querySelectorAll('[src],[href]')].map(e => e.getAttribute('src') || e.getAttribute('href'))
                       .filter(u => !u.startsWith('data:') && !u.startsWith('#')),
          height: document.body.scrollHeight,
        };""")
    state["console"] = [m for m in driver.get_log("browser") if m["level"] in ("SEVERE", "WARNING")]
    driver.set_window_size(1400, min(int(state["height"]) + 50, 8000))
    driver.save_screenshot(str(screenshot))
    return state


def test_run_report_in_chromium(browser, run_dir, tmp_path):
    html = write_report(run_dir, tmp_path / "run.html").read_text()
    state = open_and_check(browser, tmp_path / "run.html", tmp_path / "run.png")
    assert state["console"] == []
    assert state["external"] == []
    assert state["title"].startswith("gradsift run")
    assert {"config", "training", "coherence", "scores", "issues"} <= set(state["sections"])
    shown = {p["id"]: p for p in state["plots"]}
    assert set(shown) == set(plot_ids(html))  # every plot of the HTML is in the page
    assert {"accuracy", "loss", "coherence", "coherence-layers", "score-loss"} <= set(shown)
    assert all(p["n"] == 1 and p["ok"] for p in shown.values()), [p for p in shown.values() if not p["ok"]]
    assert (tmp_path / "run.png").stat().st_size > 20_000


def test_experiment_report_in_chromium(browser, experiment_dir, tmp_path):
    state = open_and_check(browser, experiment_dir / "report.html", tmp_path / "experiment.png")
    assert state["console"] == [] and state["external"] == []
    shown = {p["id"]: p for p in state["plots"]}
    assert "memorization" in shown and "run-random-m3-coherence-layers" in shown
    assert len(shown) == 1 + 6 * 4 and all(p["ok"] for p in shown.values())
    assert (tmp_path / "experiment.png").stat().st_size > 20_000


def test_score_histograms_bin_integers_per_value():
    counts = figures.score_histogram(np.array([0, 1, 1, 3, 3, 3.0]), "forgetting").axes[0].patches
    assert [p.get_height() for p in counts] == [1, 2, 0, 3]
    stacked = figures.score_histogram(np.random.default_rng(0).random(50), "loss",
                                      flagged=np.arange(50) < 10).axes[0].patches
    assert len(stacked) == 60 and sum(p.get_height() for p in stacked[30:]) == 10


def test_dp_pruning_and_issues_reports_in_chromium(browser, dp_run_dir, pruning_dir, issues_csv, tmp_path):
    dp_html = write_report(dp_run_dir, tmp_path / "dp.html")
    for page, shot, expected in ((dp_html, "dp.png", {"privacy", "accuracy", "loss"}),
                                 (pruning_dir / "report.html", "pruning.png", {"pruning", "score-el2n"}),
                                 (issues_csv.with_suffix(".html"), "issues.png", set())):
        state = open_and_check(browser, page, tmp_path / shot)
        assert state["console"] == [] and state["external"] == []
        shown = {p["id"]: p for p in state["plots"]}
        assert expected <= set(shown) and all(p["ok"] for p in shown.values())
        assert set(shown) == set(plot_ids(page.read_text()))
        assert (tmp_path / shot).stat().st_size > 20_000
    assert sum(i.startswith("issue-") for i in shown) == 12
