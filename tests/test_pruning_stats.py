"""Pruning-curve statistics against hand-computed values."""

import math

import pytest

from gradsift.experiments.pruning_curve import (PruningCurveConfig, compare_with_random, curves_for, format_point,
                                                mean_ci, summarize)


def test_mean_ci_is_the_student_t_interval():
    # n = 3, mean 2, sample sd 1, t_{0.975, 2} = 4.302652729911275
    mean, lo, hi = mean_ci([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)
    assert mean == 2.0 and lo == pytest.approx(2 - half) and hi == pytest.approx(2 + half)
    # n = 2: t_{0.975, 1} = 12.706204736174698, sd = 0.1 / sqrt(2)
    mean, lo, hi = mean_ci([0.8, 0.9])
    assert hi - mean == pytest.approx(12.706204736174698 * (0.1 / math.sqrt(2)) / math.sqrt(2))
    assert mean_ci([0.7]) == (0.7, None, None)


def test_paired_t_test_against_random():
    # differences 0.1, 0.2, 0.0: t = 0.1 / (0.1 / sqrt 3) = sqrt 3 with 2 degrees of freedom, whose
    # two-sided p has the closed form 1 - t / sqrt(2 + t^2) = 1 - sqrt(3/5)
    got = compare_with_random([0.8, 0.9, 0.7], [0.7, 0.7, 0.7])
    assert got["diff"] == pytest.approx(0.1)
    assert got["p_value"] == pytest.approx(1 - math.sqrt(3 / 5))
    assert compare_with_random([0.8], [0.7]) == {"diff": pytest.approx(0.1), "p_value": None}
    assert compare_with_random([0.8, 0.9], [0.7, 0.8])["p_value"] is None  # the same gain for every seed: undefined
    assert compare_with_random([0.8, 0.9], [0.8, 0.9])["p_value"] is None


def test_curves_both_ends_and_findings():
    cfg = PruningCurveConfig(scores=("el2n", "random"), prefer="both")
    curves = curves_for(cfg)
    assert [c for c, _, _ in curves] == ["el2n (hard)", "el2n (easy)", "random"]
    assert [c for c, _, _ in curves_for(PruningCurveConfig(scores=("el2n", "random"), prefer="hard"))] == ["el2n", "random"]

    def point(accs):
        return {"test_acc_mean": sum(accs) / len(accs), "test_acc_std": 0.0, "test_acc": accs, "n_kept": 10}

    results = {"el2n (hard)": {"0.5": point([0.60, 0.62, 0.61]), "1.0": point([0.9, 0.9, 0.9])},
               "el2n (easy)": {"0.5": point([0.80, 0.83, 0.81]), "1.0": point([0.9, 0.9, 0.9])},
               "random": {"0.5": point([0.70, 0.71, 0.73]), "1.0": point([0.9, 0.9, 0.9])}}
    findings = summarize(results, curves, (0.5, 1.0))
    assert findings["best_score_at"] == {"0.5": "el2n (easy)"}
    assert findings["above_random"] == {"0.5": ["el2n (easy)"]}
    assert findings["below_random"] == {"0.5": ["el2n (hard)"]}
    assert findings["better_end"] == {"el2n": {"0.5": "easy"}}
    assert results["el2n (easy)"]["0.5"]["vs_random"]["diff"] == pytest.approx(0.1)
    assert format_point(results["el2n (easy)"]["0.5"]).endswith(" ↑")
    assert format_point(results["el2n (hard)"]["0.5"]).endswith(" ↓")
    assert "vs_random" not in results["random"]["0.5"]
