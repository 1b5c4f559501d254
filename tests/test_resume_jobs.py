"""Crash safety of the long commands (issue 16): ``gradsift scores`` killed with SIGKILL
mid-run, then run again with ``--resume``, writes the same table as an uninterrupted run;
the K-model trainer continues from its per-epoch / per-model checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from gradsift.ensemble import seeded_factory, subset_masks, train_members, train_members_tracked
from gradsift.models import mlp
from gradsift.rundir import JobCheckpoints, RunDir, RunDirError, checkpointing


def _env():
    return {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1"}


def _cli(*args):
    return [sys.executable, "-m", "gradsift", *map(str, args)]


def _run(*args) -> subprocess.CompletedProcess:
    """``gradsift ARGS`` in a subprocess, to completion (10 min at most)."""
    return subprocess.run(_cli(*args), env=_env(), capture_output=True, text=True, timeout=600)


def _data(tmp_path: Path) -> str:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 6)).astype(np.float32)
    y = (x[:, 0] + 0.5 * rng.normal(size=240) > 0).astype(np.int64) + (x[:, 1] > 0.8)
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=y)
    return str(path)


def _kill_when(cmd: list[str], path: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Start ``cmd``, SIGKILL it as soon as ``path`` exists."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start = time.monotonic()
    while not path.exists() and proc.poll() is None and time.monotonic() - start < timeout:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_scores_killed_then_resumed_equals_uninterrupted(tmp_path):
    data = _data(tmp_path)
    args = ["scores", "--dataset", data, "--scores", "el2n,memorization,forgetting", "--epochs", "12",
            "--mem-models", "3", "--width", "8", "-q"]
    full = _run(*args, "--run-dir", tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    part = tmp_path / "part"
    # memorization's models are the second K-model training: kill after its 2nd epoch's checkpoint
    killed = _kill_when(_cli(*args, "--run-dir", part), part / "checkpoints" / "members-001.pt")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (part / "scores.parquet").exists()
    assert (part / "checkpoints" / "members-000.pt").exists()  # the Data Diet models, finished
    done = torch.load(part / "checkpoints" / "members-001.pt", weights_only=True)["epoch"]
    assert 1 <= done < 12
    again = _run(*args, "--run-dir", part)
    assert again.returncode == 2 and "pass --resume to continue it" in again.stderr, again.stderr[-3000:]
    resumed = _run(*args, "--run-dir", part, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = pd.read_parquet(tmp_path / "full" / "scores.parquet")
    b = pd.read_parquet(part / "scores.parquet")
    pd.testing.assert_frame_equal(a, b)
    assert not (part / "checkpoints").exists()  # removed once finished
    other = _run(*args[:-1], "--seed", "3", "--run-dir", part, "--resume")
    assert other.returncode == 2 and "seed: 0 -> 3" in other.stderr, other.stderr[-3000:]
    assert "Traceback" not in other.stderr


def _xy(n=60):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g)
    return x, (x[:, 0] > 0).long()


class Stop(Exception):
    pass


@pytest.mark.parametrize("vectorize", [True, False])
def test_train_members_continues_from_its_checkpoints(tmp_path, vectorize):
    """Interrupted after some epochs (an exception from on_epoch stands in for a kill),
    the same call in the same checkpointing block continues and ends with the same
    models and the same per-epoch outputs as an uninterrupted one."""
    x, y = _xy()
    masks = subset_masks(len(y), 3, 0.5, seed=1)
    mf = seeded_factory(lambda: mlp(5, 2, width=4), 0)
    kw = dict(epochs=4, batch_size=8, seed=2, vectorize=vectorize)
    ref, ref_hist = train_members_tracked(mf, x, y, masks, **kw)

    def stop_at(k_stop, e_stop):
        def on_epoch(k, e, out):
            if (k, e) == (k_stop, e_stop):
                raise Stop
        return on_epoch

    run = RunDir(tmp_path / "r")
    with pytest.raises(Stop), checkpointing(run):
        train_members(mf, x, y, masks, on_epoch=stop_at(1, 3), **kw)
    assert JobCheckpoints(run).exist()
    with checkpointing(run):
        models, hist = train_members_tracked(mf, x, y, masks, **kw)
    assert torch.equal(hist, ref_hist)
    for a, b in zip(ref, models):
        for (n, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p, q), n
    with pytest.raises(RunDirError, match="written by a different training"), checkpointing(run):
        train_members(mf, x, y, masks, **{**kw, "seed": 5})


def test_pruning_curve_killed_then_resumed_and_reruns_checked(tmp_path):
    data = _data(tmp_path)
    args = ["pruning-curve", "--dataset", data, "--scores", "el2n,random", "--fractions", "0.5,1.0", "--seeds", "2",
            "--epochs", "12", "--width", "8", "-q"]
    full = _run(*args, "--out", tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    part = tmp_path / "part"
    killed = _kill_when(_cli(*args, "--out", part), part / "checkpoints" / "members-001.pt")  # retraining at 0.5
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = _run(*args, "--out", part, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = json.loads((tmp_path / "full" / "summary.json").read_text())
    b = json.loads((part / "summary.json").read_text())
    assert a["results"] == b["results"]
    again = _run(*args, "--out", part)
    assert again.returncode == 2 and "already holds a run" in again.stderr and "--overwrite" in again.stderr
    assert "Traceback" not in again.stderr


@pytest.mark.slow  # four CLI runs of six trainings each (about 1 min of CPU); the quick check is below
def test_memorization_killed_then_resumed(tmp_path):
    args = ["memorization", "--epochs", "3", "--width", "8", "--n-train", "60", "-q"]
    full = _run(*args, "--out", tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    part = tmp_path / "part"
    killed = _kill_when(_cli(*args, "--out", part), part / "runs" / "real-winsorize" / "checkpoint.pt")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = _run(*args, "--out", part, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = json.loads((tmp_path / "full" / "summary.json").read_text())
    b = json.loads((part / "summary.json").read_text())
    assert a["runs"] == b["runs"] and a["config"]["n_train"] == 60
    other = _run(*args[:-1], "--epochs", "4", "--out", part, "--resume")
    assert other.returncode == 2 and "different config" in other.stderr, other.stderr[-3000:]


def test_memorization_out_is_one_run(tmp_path):
    from gradsift.experiments.memorization import MemorizationConfig, run_memorization

    cfg = MemorizationConfig(epochs=2, width=8, n_train=50, aggregators=("mean",), labels=("real",), probe_size=10)
    first = run_memorization(cfg, tmp_path, progress=False)
    with pytest.raises(RunDirError, match="already holds a run"):
        run_memorization(cfg, tmp_path, progress=False)
    with pytest.raises(RunDirError, match="different config: epochs: 2 -> 3"):
        run_memorization(MemorizationConfig(**{**cfg.__dict__, "epochs": 3}), tmp_path, progress=False, resume=True)
    again = run_memorization(cfg, tmp_path, progress=False, resume=True)  # finished: continues nothing
    assert again["runs"] == first["runs"]
    assert run_memorization(cfg, tmp_path, progress=False, overwrite=True)["runs"] == first["runs"]


def test_issues_killed_then_resumed_equals_uninterrupted(tmp_path):
    data = _data(tmp_path)
    args = ["issues", "--dataset", data, "--folds", "3", "--epochs", "15", "--width", "8", "-q"]
    full = _run(*args, "--out", tmp_path / "full.csv")
    assert full.returncode == 0, full.stderr[-3000:]
    assert not (tmp_path / "full.checkpoints").exists()
    out = tmp_path / "part.csv"
    killed = _kill_when(_cli(*args, "--out", out), tmp_path / "part.checkpoints" / "checkpoints" / "members-000.pt")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    again = _run(*args, "--out", out)
    assert again.returncode == 2 and "pass --resume to continue it" in again.stderr, again.stderr[-3000:]
    resumed = _run(*args, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "full.csv"), pd.read_csv(out))
    assert not (tmp_path / "part.checkpoints").exists()
