import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pytest
import torch

import gradsift as gs
from gradsift.data import load_digits
from gradsift.models import mlp
from gradsift.scores import forgetting_events, learning_time
from gradsift.rundir import RunDir


def test_write_scores_merges_and_open_run_queries(tmp_path):
    run = RunDir(tmp_path)
    run.write_scores(pd.DataFrame({"example_id": [3, 1, 2], "a": [0.3, 0.1, 0.2]}))
    run.write_scores(pd.DataFrame({"b": [10, 40]}, index=pd.Index([1, 4], name="example_id")))
    run.write_scores(pd.DataFrame({"example_id": [1, 2, 3], "a": [1.0, 2.0, 3.0]}))  # replaces a
    run.append_table("dynamics", pd.DataFrame({"example_id": [1, 2], "epoch": 1, "loss": [0.5, 0.7]}), 1)
    run.append_table("dynamics", pd.DataFrame({"example_id": [1, 2], "epoch": 2, "loss": [0.1, 0.9]}), 2)
    r = gs.open_run(tmp_path)
    assert r.tables == ["dynamics", "scores"]
    s = r.scores()
    assert list(s.index) == [1, 2, 3, 4]
    np.testing.assert_allclose(s.a.values, [1, 2, 3, np.nan])
    np.testing.assert_allclose(s.b.values, [10, np.nan, np.nan, 40])
    q = r.sql("select d.example_id, sum(d.loss) as cl, max(s.a) as a from dynamics d "
              "join scores s using (example_id) group by 1 order by 1")
    np.testing.assert_allclose(q.cl, [0.6, 1.6])
    np.testing.assert_allclose(q.a, [1.0, 2.0])
    with pytest.raises(ValueError):
        run.write_scores(pd.DataFrame({"example_id": [1, 1], "a": [0, 1]}))
    with pytest.raises(FileNotFoundError):
        r.table("nope")


WRITER = textwrap.dedent("""
    import sys, numpy as np, pandas as pd
    from gradsift.rundir import RunDir
    run = RunDir(sys.argv[1])
    n = 200_000
    for k in range(1, 10_000):
        frame = pd.DataFrame({"example_id": np.arange(n), "epoch": k, "loss": np.random.rand(n)})
        run.append_table("dynamics", frame, k)
        run.write_scores(pd.DataFrame({"example_id": np.arange(n), f"s": np.full(n, float(k))}))
        print(k, flush=True)
""")


def test_killed_writer_leaves_readable_tables(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    flushed = 0
    while flushed < 3:
        flushed = int(proc.stdout.readline())
    time.sleep(0.15)  # most likely in the middle of the next write
    proc.kill()
    proc.wait()
    r = gs.open_run(tmp_path)
    d = r.sql("select epoch, count(*) as n from dynamics group by epoch order by epoch")
    assert list(d.epoch[:flushed]) == list(range(1, flushed + 1))
    assert (d.n == 200_000).all()  # every part that exists is complete
    s = r.scores()
    assert len(s) == 200_000 and s.s.iloc[0] >= flushed


def _digits_small():
    tr, te = load_digits()
    return tr.subset(np.arange(200)), te.subset(np.arange(60))


def _model():
    torch.manual_seed(0)
    return mlp(64, 10, width=16)


def test_dynamics_recorder_tables_agree_with_pure_functions(tmp_path):
    tr, te = _digits_small()
    rec = gs.DynamicsRecorder()
    gs.fit(_model(), tr, te, optimizer="sgd:lr=0.2,momentum=0.9", epochs=4, batch_size=25,
           recorders=[rec, gs.TracInRecorder(*te.subset(np.arange(3)).tensors(), test_ids=te.example_ids[:3])],
           run_dir=tmp_path)
    r = gs.open_run(tmp_path)
    dyn = r.table("dynamics")
    assert len(dyn) == 4 * 200 and set(dyn.epoch) == {1, 2, 3, 4}
    correct = dyn.pivot(index="epoch", columns="example_id", values="correct").to_numpy()
    loss = dyn.pivot(index="epoch", columns="example_id", values="loss")
    s = r.scores().loc[loss.columns]
    np.testing.assert_array_equal(s.forgetting_events, forgetting_events(correct))
    np.testing.assert_array_equal(s.learning_time, learning_time(correct))
    np.testing.assert_allclose(s.cum_loss, loss.sum(axis=0).to_numpy(), rtol=1e-6)
    np.testing.assert_array_equal(s.label, tr.y[np.argsort(tr.example_ids)][np.searchsorted(np.sort(tr.example_ids), loss.columns)])
    assert (s.self_influence > 0).all() and "test_influence" in s
    inf = r.table("influence")
    assert len(inf) == 200 * 3 and set(inf.test_id) == set(te.example_ids[:3])
    assert s.learning_time.max() <= 5 and (s.forgetting_events >= 0).all()


def test_resume_continues_scores_without_duplicates(tmp_path):
    tr, te = _digits_small()
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    kw = dict(optimizer="sgd:lr=0.2,momentum=0.9", batch_size=25, seed=1)
    gs.fit(_model(), tr, te, epochs=3, recorders=[gs.DynamicsRecorder()], run_dir=full_dir, **kw)
    gs.fit(_model(), tr, te, epochs=2, recorders=[gs.DynamicsRecorder()], run_dir=cut_dir, **kw)
    # a stale part from a crash after epoch 2's checkpoint must be forgotten on resume
    RunDir(cut_dir).append_table("dynamics", pd.DataFrame({"example_id": [0], "epoch": [3]}), 3)
    gs.fit(_model(), tr, te, epochs=3, recorders=[gs.DynamicsRecorder()], run_dir=cut_dir, resume=True, **kw)
    a, b = gs.open_run(full_dir), gs.open_run(cut_dir)
    pd.testing.assert_frame_equal(a.scores(), b.scores())
    q = "select epoch, count(*) n, sum(loss) l from dynamics group by 1 order by 1"
    pd.testing.assert_frame_equal(a.sql(q), b.sql(q))
