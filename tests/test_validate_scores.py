"""validate-scores: the table's statistics by hand, a short end-to-end run, the GraNd warning."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from gradsift.experiments.validate_scores import validation_table


def test_validation_table_by_hand():
    mem = np.array([0.0, 0.1, 0.5, 0.9, np.nan])
    truth = np.array([False, False, True, True, False])
    perfect = np.array([0.0, 1.0, 2.0, 3.0, 0.5])
    t = validation_table({"perfect": [perfect, perfect], "reversed": [-perfect]}, mem, truth, bootstrap=20)
    row = t.set_index("score")
    assert row.loc["perfect", "spearman"] == pytest.approx(1.0) and row.loc["perfect", "auroc"] == pytest.approx(1.0)
    assert row.loc["reversed", "spearman"] == pytest.approx(-1.0) and row.loc["reversed", "auroc"] == pytest.approx(0.0)
    assert row.loc["perfect", "seeds"] == 2 and row.loc["perfect", "spearman_lo"] <= 1.0


def test_validate_scores_command_short(tmp_path):
    from gradsift.cli import app

    out = tmp_path / "v"
    r = CliRunner().invoke(app, ["validate-scores", "--n-train", "120", "--mem-models", "8", "--epochs", "2",
                                 "--seeds", "1", "--width", "16", "--scores", "loss,aum,grand_init,alignment",
                                 "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert [row["score"] for row in summary["rows"]] == ["loss", "aum", "grand_init", "alignment", "random"]
    assert any("2303.14753" in w for w in summary["warnings"])
    assert "2303.14753" in r.output and (out / "validate_scores.png").exists()
    # 2 epochs of a width-16 MLP memorize nothing: the ground truth is flagged as noise
    assert summary["mem_label_errors"] < 0.1 and any("barely memorized" in w for w in summary["warnings"])


def test_memorization_check_by_hand():
    from gradsift.experiments.validate_scores import memorization_check

    mem = np.array([0.5, 0.3, np.nan, 0.0, 0.9])
    truth = np.array([True, True, True, False, False])
    assert memorization_check(mem, truth) == (0.4, None)  # mean of 0.5 and 0.3; NaN skipped
    m, warning = memorization_check(np.array([0.05, 0.1, 0.9]), np.array([True, True, False]))
    assert m == pytest.approx(0.075) and "0.075 < 0.1" in warning
    assert memorization_check(mem, np.zeros(5, bool)) == (None, None)
