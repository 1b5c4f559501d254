"""The score registry: every registered score satisfies the harness contract; the
consumers (pruning curves, the CLI) read it."""

import pytest
from typer.testing import CliRunner

from gradsift.cli import app
from gradsift.errors import GradsiftError
from gradsift.experiments.pruning_curve import known
from gradsift.scores import SCORES, register_score, score_for_column, score_names

from gradsift.scores import compute_scores

from .common import FAST, check_score, noisy_blobs

CHEAP = ["loss", "cum_loss", "forgetting", "learning_time", "margin", "forgetting_events", "el2n",
         "prototype_distance"]


@pytest.fixture(scope="module")
def cheap_table():
    """All cheap scores at once: one training run serves every recorder score."""
    table = compute_scores(noisy_blobs()[0], FAST, CHEAP)
    assert list(table.columns) == ["label", *CHEAP]
    return table


@pytest.mark.parametrize("name", CHEAP)
def test_cheap_scores_keep_the_contract(name, cheap_table):
    check_score(name, detects_noise=name not in ("prototype_distance", "forgetting_events"), min_auroc=0.65,
                table=cheap_table)


@pytest.mark.parametrize("name", ["grand", "memorization", "self_influence"])
def test_model_heavy_scores_keep_the_contract(name):
    check_score(name, detects_noise=False)


def test_registry_names_orientations_and_errors():
    assert {"el2n", "grand", "forgetting", "memorization", "aum", "margin"} <= set(score_names())
    assert not SCORES["margin"].higher_is_harder and SCORES["loss"].higher_is_harder
    assert score_for_column("mem_se").name == "memorization" and score_for_column("nope") is None
    assert "random" in known() and set(score_names()) <= set(known())
    with pytest.raises(GradsiftError, match="Known: .*aum"):
        SCORES["nope"]
    with pytest.raises(GradsiftError, match="already registered"):
        register_score("loss", kind="function", make=lambda *a: None)


def test_cli_help_lists_the_registry():
    out = CliRunner().invoke(app, ["scores", "--help"], env={"COLUMNS": "400"}).output
    for name in score_names():
        assert name in out
