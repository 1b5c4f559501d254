"""A run directory is one run: one writer at a time, no silent mixing of runs, checkpoints
that cannot run code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from gradsift.rundir import (RunDir, RunDirError, RunInUseError, allow_checkpoint_types, config_differences,
                             fingerprint, open_run)

CONFIG = {"dataset": "digits", "aggregator": "mean", "epochs": 3, "seed": 0}


def test_config_differences_lists_each_key_and_ignores_may_differ():
    new = {**CONFIG, "aggregator": "m3", "epochs": 5, "lr": 0.1}
    assert config_differences(CONFIG, new, may_differ={"epochs"}) == ["aggregator: 'mean' -> 'm3'", "lr: None -> 0.1"]
    assert config_differences({"m": (1, 2)}, {"m": [1, 2]}) == []  # as JSON reads it back


def test_fingerprint_follows_the_data():
    x, y = np.arange(12.0).reshape(4, 3), np.array([0, 1, 0, 1])
    assert fingerprint(x, y) == fingerprint(x.copy(), torch.tensor(y))
    assert fingerprint(x, y) != fingerprint(x, y[::-1].copy())
    assert fingerprint(x, y) != fingerprint(x.astype(np.float32), y)


def test_new_run_refuses_an_existing_one_unless_overwrite(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.start(CONFIG) is None
    run.write_table("metrics", pd.DataFrame({"epoch": [1]}))
    run.unlock()
    with pytest.raises(RunDirError, match=r"already holds a run \(manifest.json, metrics.parquet\); pass --resume"):
        RunDir(tmp_path / "r").start(CONFIG)
    again = RunDir(tmp_path / "r")
    again.start({**CONFIG, "seed": 1}, overwrite=True)
    assert again.contents() == ["manifest.json"] and again.manifest["config"]["seed"] == 1
    again.unlock()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("do not delete")
    with pytest.raises(RunDirError, match=r"not a gradsift run directory \(no manifest.json or metrics.parquet\); refusing to clear it"):
        RunDir(tmp_path / "mine").start(CONFIG, overwrite=True)
    assert (tmp_path / "mine" / "thesis.tex").exists()


def test_resume_checks_checkpoint_config_and_epochs(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(RunDirError, match="has no checkpoint.pt to continue from"):
        run.start(CONFIG, resume=True)
    run.start(CONFIG)
    run.save_checkpoint({"epoch": 3, "w": torch.ones(2)})
    run.unlock()
    with pytest.raises(RunDirError, match=r"different config: aggregator: 'mean' -> 'm3'; seed: 0 -> 2\. Resume"):
        run.start({**CONFIG, "aggregator": "m3", "seed": 2}, resume=True)
    with pytest.raises(RunDirError, match="already trained 3 epochs; --epochs 2 would rewrite its history"):
        run.start({**CONFIG, "epochs": 2}, resume=True)
    ckpt = run.start({**CONFIG, "epochs": 5}, resume=True)
    assert ckpt["epoch"] == 3 and run.manifest["config"]["epochs"] == 5
    run.unlock()
    with pytest.raises(RunDirError, match="choose one"):
        run.start(CONFIG, resume=True, overwrite=True)


def test_merge_needs_the_same_config(tmp_path):
    run = RunDir(tmp_path)
    run.start({**CONFIG, "scores": ["el2n"]}, merge=True, may_differ={"scores"})
    run.unlock()
    run.start({**CONFIG, "scores": ["grand"]}, merge=True, may_differ={"scores"})
    run.unlock()
    with pytest.raises(RunDirError, match="holds a run with a different config: dataset: 'digits' -> 'mnist1d'"):
        run.start({**CONFIG, "dataset": "mnist1d"}, merge=True, may_differ={"scores"})


def test_stale_tmp_files_are_removed_on_start(tmp_path):
    (tmp_path / "dynamics").mkdir()
    stale = [tmp_path / ".metrics.parquet.abc.tmp", tmp_path / "dynamics" / ".part-000001.parquet.x.tmp"]
    for p in stale:
        p.write_text("half")
    RunDir(tmp_path).write_manifest(CONFIG)
    run = RunDir(tmp_path)
    run.start(CONFIG, merge=True)
    assert not any(p.exists() for p in stale) and run.contents() == ["dynamics", "manifest.json"]


HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from gradsift.rundir import RunDir, RunInUseError
    go = Path(sys.argv[2])
    while not go.exists():
        time.sleep(0.01)
    run = RunDir(sys.argv[1])
    try:
        run.start({"who": sys.argv[3]}, merge=True)
    except RunInUseError as e:
        print(e)
        sys.exit(3)
    time.sleep(2.0)
    run.unlock()
""")


def test_two_writers_started_together_exactly_one_wins(tmp_path):
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "r"), str(go), str(k)],
                              stdout=subprocess.PIPE, text=True) for k in range(2)]
    go.write_text("")
    outs = [p.communicate(timeout=120)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 3], outs
    loser = next(o for o, p in zip(outs, procs) if p.returncode == 3)
    assert "is in use by process" in loser and "on " + os.uname().nodename in loser


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tmp_path.joinpath(".lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    run = RunDir(tmp_path)
    with pytest.warns(UserWarning, match=f"took over the lock of process {dead.pid}"):
        run.start(CONFIG)
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    with pytest.raises(RunInUseError, match="in use by this process"):
        RunDir(tmp_path).start(CONFIG, merge=True)
    run.unlock()
    RunDir(tmp_path).start(CONFIG, merge=True)


class Planted:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/nonexistent")


def test_a_planted_pickle_is_refused(tmp_path, monkeypatch):
    global MARKER
    MARKER = tmp_path / "pwned"
    torch.save({"epoch": 1, "model": Planted()}, tmp_path / "checkpoint.pt")
    with pytest.raises(RunDirError, match="holds objects that gradsift does not unpickle .*GLOBAL posix.system.*refusing to load it"):
        RunDir(tmp_path).load_checkpoint()
    assert not MARKER.exists()


@pytest.mark.parametrize("content,message", [
    (b"", "is empty"),
    (b"garbage" * 10, "is not a readable checkpoint"),
])
def test_corrupt_checkpoints_are_errors(tmp_path, content, message):
    (tmp_path / "checkpoint.pt").write_bytes(content)
    with pytest.raises(RunDirError, match=message):
        RunDir(tmp_path).load_checkpoint()


def test_checkpoints_keep_numpy_state_and_allowed_types(tmp_path):
    state = {"epoch": 2, "w": torch.arange(3.0), "rows": [np.arange(4), np.float32(1.5)], "t": (1, "a")}
    run = RunDir(tmp_path)
    run.save_checkpoint(state)
    back = run.load_checkpoint()
    np.testing.assert_array_equal(back["rows"][0], np.arange(4))
    assert back["rows"][1] == np.float32(1.5) and back["t"] == (1, "a") and torch.equal(back["w"], state["w"])


def test_invalid_manifest_is_an_error(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(RunDirError, match="manifest.json is not valid JSON"):
        open_run(tmp_path).manifest
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(RunDirError, match="does not hold a JSON object"):
        open_run(tmp_path).manifest


def _cli(*args):
    from typer.testing import CliRunner

    from gradsift.cli import app

    r = CliRunner().invoke(app, list(args))
    assert "Traceback" not in r.output
    return r.exit_code, " ".join(r.output.split())


def test_cli_resume_grows_epochs_and_overwrite_starts_over(tmp_path):
    run = ["train", "--model", "mlp:width=8", "--batch-size", "200", "--no-coherence", "-q", "--run-dir", str(tmp_path)]
    assert _cli(*run, "--epochs", "1")[0] == 0
    assert _cli(*run, "--epochs", "2", "--resume")[0] == 0
    r = open_run(tmp_path)
    assert list(r.table("metrics").epoch) == [1, 2] and r.manifest["config"]["epochs"] == 2
    assert r.manifest["resumed"] is True and r.manifest["status"] == "finished"
    code, text = _cli(*run, "--epochs", "1")
    assert code == 2 and "already holds a run" in text and "--overwrite" in text
    assert _cli(*run, "--epochs", "1", "--overwrite", "--seed", "4")[0] == 0
    r = open_run(tmp_path)
    assert list(r.table("metrics").epoch) == [1] and r.manifest["config"]["seed"] == 4


def test_cli_scores_adds_columns_only_to_the_same_run(tmp_path):
    base = ["scores", "--epochs", "1", "--width", "8", "-q", "--run-dir", str(tmp_path)]
    assert _cli(*base, "--scores", "loss")[0] == 0
    first = set(open_run(tmp_path).scores().columns)
    assert _cli(*base, "--scores", "margin")[0] == 0
    r = open_run(tmp_path)
    assert first < set(r.scores().columns) and r.manifest["config"]["scores"] == ["loss", "margin"]
    code, text = _cli(*base, "--scores", "loss", "--seed", "1")
    assert code == 2 and "holds a run with a different config: data:" in text and "seed: 0 -> 1" in text
