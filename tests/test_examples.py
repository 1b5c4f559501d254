"""The scripts in examples/ run, each with a short setting."""

import importlib.util
import os
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cnn_image_folder(tmp_path):
    row = load("cnn_image_folder").main(["--epochs", "2", "--n", "300", "--out", str(tmp_path)])
    assert row["epoch"] == 2 and row["train_acc"] > 0.2
    assert (tmp_path / "run" / "scores.parquet").exists()


def test_hf_text_classifier(tmp_path):
    pytest.importorskip("datasets")
    pytest.importorskip("accelerate")
    out = load("hf_text_classifier").main(["--epochs", "2", "--n", "96", "--aggregator", "mean",
                                           "--out", str(tmp_path)])
    assert out["epochs"] == 2
    assert (tmp_path / "run" / "scores.parquet").exists()


def test_tabular_csv(tmp_path, monkeypatch):
    root = str(EXAMPLES.parent)
    monkeypatch.setenv("PYTHONPATH", root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = load("tabular_csv").main(["--out", str(tmp_path), "--epochs", "3", "--folds", "2"])
    assert out["flagged"] > 0 and out["found"] > 0
    assert (tmp_path / "run" / "metrics.parquet").exists()
