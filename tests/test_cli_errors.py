"""User mistakes on the command line give a clear message (what went wrong, what to do) and
exit code 2, never a traceback."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from gradsift.cli import app, show_progress


def invoke(*args: str):
    r = CliRunner().invoke(app, list(args))
    text = re.sub(r"[\s│╭╮╰╯─]+", " ", r.output)  # rich's box and wrapping, flattened
    assert "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r.exit_code, text


@pytest.mark.parametrize("args,message", [
    (["train", "--aggregator", "bogus"], "error: unknown aggregator 'bogus' in 'bogus'. Known: clip, "),
    (["train", "--aggregator", "winsorize:c"], "error: malformed option 'c' in spec 'winsorize:c': expected key=value, e.g. 'winsorize:c=1'"),
    (["train", "--aggregator", "winsorize:c=-1"], "error: bad options for aggregator 'winsorize' in 'winsorize:c=-1': winsorize: c must be >= 0"),
    (["train", "--aggregator", "trimmed_mean:fraction=0.7+mean"], "fraction must be in [0, 0.5), got 0.7"),
    (["train", "--aggregator", "mean:width=3"], "error: bad options for aggregator 'mean'"),
    (["train", "--optimizer", "sgdd:lr=1", "--epochs", "1"], "error: unknown optimizer 'sgdd'. Known: "),
    (["train", "--model", "mlp:width=-3", "--epochs", "1"], "error: bad options for model 'mlp' in 'mlp:width=-3'"),
    (["train", "--model", "resnet", "--epochs", "1"], "error: unknown model 'resnet': use mlp or cnn"),
    (["train", "--dataset", "imagenet"], "error: unknown data set 'imagenet': use one of digits, mnist1d, a path to a .npz, .csv or .parquet file, or an image folder"),
    (["train", "--epochs", "0"], "Invalid value for '--epochs'"),
    (["train", "--batch-size", "-5"], "Invalid value for '--batch-size'"),
    (["train", "--noise-rate", "1.5"], "Invalid value for '--noise-rate'"),
    (["train", "--label-noise", "sym"], "Invalid value for '--label-noise': 'sym' is not one of: none, symmetric, asymmetric, random"),
    (["train", "--on-nonfinite", "skip"], "Invalid value for '--on-nonfinite': 'skip' is not one of: raise, drop"),
    (["memorization", "--epochs", "0"], "Invalid value for '--epochs'"),
    (["memorization", "--winsorize-c", "-1"], "Invalid value for '--winsorize-c'"),
    (["report", "--top-issues", "-1", "."], "Invalid value for '--top-issues'"),
    (["train", "--dp"], "--dp needs --target-epsilon or --noise-multiplier"),
    (["train", "--dp", "--target-epsilon", "-1", "--epochs", "1"], "error: target_epsilon must be > 0, got -1.0"),
    (["issues", "--folds", "1"], "Invalid value for '--folds'"),
    (["issues", "--label-noise", "flip"], "Invalid value for '--label-noise': 'flip' is not one of"),
    (["scores", "--scores", "el2n,bogus"], "error: unknown score(s) ['bogus']. Known: aum, el2n, grand"),
    (["scores", "--mem-models", "1"], "Invalid value for '--mem-models'"),
    (["pruning-curve", "--fractions", "0.5,abc"], "error: --fractions must be a comma list of numbers, got '0.5,abc'"),
    (["pruning-curve", "--fractions", "0,0.5", "--dataset", "digits"], "error: fractions must be in (0, 1], got (0.0, 0.5)"),
    (["pruning-curve", "--seeds", "0"], "Invalid value for '--seeds'"),
    (["prune", "--run", ".", "--by", "el2n", "--keep", "2"], "error: --keep must be a fraction in [0, 1], got 2.0"),
    (["train", "--noise-rate", "0.3"], "error: --noise-rate 0.3 has no effect with no --label-noise; add --label-noise symmetric or asymmetric"),
    (["train", "--label-noise", "random", "--noise-rate", "0.3"], "has no effect with --label-noise random"),
    (["train", "--label-noise", "symmetric"], "error: --label-noise symmetric needs --noise-rate"),
    (["scores", "--noise-rate", "0.2"], "error: --noise-rate 0.2 has no effect with no --label-noise"),
    (["issues", "--noise-rate", "0.2"], "error: --noise-rate 0.2 has no effect with no --label-noise"),
])
def test_bad_values_give_a_message(args, message, tmp_path):
    code, text = invoke(*args, "--run-dir" if args[0] == "train" else "--out", str(tmp_path / "o"))
    assert code == 2, text
    assert message in text, text


def test_bad_paths(tmp_path):
    code, text = invoke("train", "--dataset", str(tmp_path / "nope.npz"), "--run-dir", str(tmp_path / "r"))
    assert code == 2 and f"error: no such file: {tmp_path / 'nope.npz'}" in text
    code, text = invoke("report", str(tmp_path / "missing"))
    assert code == 2 and f"error: no such directory: {tmp_path / 'missing'}. Give a run directory" in text
    (tmp_path / "afile").write_text("x")
    code, text = invoke("report", str(tmp_path / "afile"))
    assert code == 2 and "is a file; give the directory that holds it" in text
    code, text = invoke("report", str(tmp_path))
    assert code == 2 and "holds neither summary.json (an experiment) nor manifest.json" in text
    code, text = invoke("train", "--epochs", "1", "--model", "mlp:width=8", "-q",
                        "--run-dir", str(tmp_path / "afile" / "run"))
    assert code == 2 and f"error: Not a directory: {tmp_path / 'afile' / 'run'}. Check the path" in text


def test_progress_only_on_a_terminal(monkeypatch):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert show_progress(quiet=False) and not show_progress(quiet=True)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert not show_progress(quiet=False)


def test_issues_refuses_a_non_csv_out_before_working(tmp_path):
    code, text = invoke("issues", "--out", str(tmp_path / "issues.txt"))
    assert code == 2 and "must name a .csv file" in text
    assert not (tmp_path / "issues.txt").exists()


def test_a_command_is_one_module_and_one_registration_line():
    import typer

    from gradsift.cli import COMMANDS, app

    names = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    assert names == set(COMMANDS)
