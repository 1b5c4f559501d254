"""Loaders from files: CSV / Parquet with a named label column (numbers or class names),
token sequences, image folders, npz checks, and hypothesis fuzzing (any input loads or
raises gradsift's own error)."""

import io
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradsift as gs
from gradsift.data import load_csv, load_npz, load_parquet
from gradsift.errors import GradsiftError


def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


def test_csv_class_names_are_mapped_and_kept(tmp_path):
    rows = ["a,b,species"] + [f"{i},{i % 3},{['cat', 'dog', 'emu'][i % 3]}" for i in range(30)]
    tr, te = load_csv(write(tmp_path / "t.csv", "\n".join(rows)), label_column="species")
    assert tr.classes == ("cat", "dog", "emu") and tr.num_classes == 3
    full_y = np.concatenate([tr.y, te.y])
    assert set(full_y) == {0, 1, 2}
    # a cat row is 0
    assert all(tr.y[tr.x[:, 0].astype(int) % 3 == 0] == 0)


@pytest.mark.parametrize("label,msg", [("1.7", "not an integer"), ("inf", "not a finite"), ("nan", "not a finite"),
                                       ("-1", "negative"), ("1e9", "classes"), ("cat", "mix numbers and class names")])
def test_csv_bad_labels(tmp_path, label, msg):
    text = "x,label\n1,0\n2,1\n3,{}\n4,1\n".format(label)
    with pytest.raises(gs.DataError, match=msg):
        load_csv(write(tmp_path / "t.csv", text))


def test_csv_header_and_encoding_errors(tmp_path):
    with pytest.raises(gs.DataError, match="duplicate column"):
        load_csv(write(tmp_path / "d.csv", "x,label,label\n1,0,1\n2,1,0\n"))
    with pytest.raises(gs.DataError, match="only the label column"):
        load_csv(write(tmp_path / "o.csv", "label\n0\n1\n"))
    latin = write(tmp_path / "l.csv", "x,label\n1,caf\xe9\n2,th\xe9\n3,caf\xe9\n4,th\xe9\n5,caf\xe9\n", "latin-1")
    with pytest.raises(gs.DataError, match="encoding='latin-1'"):
        load_csv(latin)
    tr, te = load_csv(latin, encoding="latin-1")
    assert tr.classes == ("café", "thé")


def test_npz_checks(tmp_path):
    p = tmp_path / "a.npz"
    np.savez(p, x=np.zeros((10, 3)), y=np.arange(10) % 2, x_test=np.zeros((4, 5)), y_test=np.zeros(4))
    with pytest.raises(gs.DataError, match="same features"):
        load_npz(p)
    np.savez(p, x=np.zeros((10, 3)), y=np.arange(10) % 2, x_test=np.zeros((4, 3), np.int64), y_test=np.zeros(4))
    with pytest.raises(gs.DataError, match="dtype"):
        load_npz(p)
    np.savez(p, x=np.zeros((10, 3), np.complex64), y=np.arange(10) % 2)
    with pytest.raises(gs.DataError, match="complex"):
        load_npz(p)
    np.savez(p, x=np.array([[1, "a"]] * 10, dtype=object), y=np.arange(10) % 2)
    with pytest.raises(gs.DataError, match="object arrays"):
        load_npz(p)
    np.savez(p, x=np.zeros((10, 3)), y=np.array([0] * 9 + [10**9]))
    with pytest.raises(gs.DataError, match="classes"):
        load_npz(p)
    np.savez(p, x=np.zeros((10, 3)), y=np.array(["a", "b"] * 5))
    tr, _ = load_npz(p)
    assert tr.classes == ("a", "b")
    (tmp_path / "z.npz").write_bytes(b"")
    with pytest.raises(gs.DataError, match="not a readable"):
        load_npz(tmp_path / "z.npz")
    (tmp_path / "g.npz").write_bytes(b"garbage\x00\x01" * 10)
    with pytest.raises(gs.DataError, match="not a readable"):
        load_npz(tmp_path / "g.npz")


def test_parquet_features_and_tokens(tmp_path):
    df = pd.DataFrame({"f1": np.arange(20.0), "f2": np.ones(20), "y": ["no", "yes"] * 10})
    df.to_parquet(tmp_path / "t.parquet")
    tr, te = load_parquet(tmp_path / "t.parquet", label_column="y")
    assert tr.classes == ("no", "yes") and tr.x.shape[1] == 2
    tok = pd.DataFrame({"tokens": [list(range(1, 2 + i % 5)) for i in range(20)], "label": [0, 1] * 10})
    tok.to_parquet(tmp_path / "tok.parquet")
    tr, te = gs.data.load(str(tmp_path / "tok.parquet"))
    assert tr.token_ids and tr.x.dtype == np.int64 and tr.x.shape[1] == 5
    assert tr.tensors()[0].dtype == torch.int64


def _png(path, value, size=8):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)


def test_image_folder_and_corrupt_files(tmp_path):
    root = tmp_path / "imgs"
    for k, c in enumerate(["ant", "bee"]):
        for i in range(6):
            _png(root / c / f"{i}.png", 40 * k + i)
    ds = gs.data.image_folder(root)
    assert ds.classes == ("ant", "bee") and len(ds) == 12
    x, y = ds[7]
    assert x.shape == (1, 8, 8) and y == 1
    (root / "bee" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(gs.DataError, match="broken.png"):
        gs.data.image_folder(root)
    ds = gs.data.image_folder(root, skip_corrupt=True)
    assert len(ds) == 12 and ds.skipped[0][0].endswith("broken.png")
    tr, te = gs.data.load_image_folder(root, skip_corrupt=True)
    assert tr.x.shape[1:] == (1, 8, 8) and len(tr) + len(te) == 12
    res = gs.fit(gs.models.cnn((1, 8, 8), 2, channels=4), ds, epochs=1, batch_size=4, progress=False)
    assert len(res.history) == 1


def test_digits_as_images_for_cnn():
    tr, te = gs.data.load_digits(images=True)
    assert tr.x.shape[1:] == (1, 8, 8)
    model = gs.models.model_from_spec("cnn:channels=4", tr.shape, 10)
    assert model(torch.from_numpy(tr.x[:3])).shape == (3, 10)
    assert gs.models.model_from_spec("mlp:width=8", tr.shape, 10)(torch.from_numpy(tr.x[:3])).shape == (3, 10)


# ---------------------------------------------------------------- fuzzing

cells = st.one_of(st.integers(-3, 12).map(str), st.sampled_from(["cat", "dog", "1.5", "inf", "nan", "", "1e9", " 2 ",
                                                                  "x\"y", "0", "é"]),
                  st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=4))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.lists(st.sampled_from(["a", "b", "label", "c", ""]), min_size=0, max_size=4),
       rows=st.lists(st.lists(cells, min_size=0, max_size=4), max_size=8), raw=st.binary(max_size=40),
       use_raw=st.booleans())
def test_fuzz_csv_loads_or_raises_gradsift_error(tmp_path, header, rows, raw, use_raw):
    p = tmp_path / "f.csv"
    if use_raw:
        p.write_bytes(raw)
    else:
        lines = [",".join(header)] + [",".join(r) for r in rows]
        p.write_text("\n".join(lines), encoding="utf-8")
    try:
        tr, te = load_csv(p)
    except GradsiftError:
        return
    assert len(tr) and len(te) and np.isfinite(tr.x).all() and tr.y.min() >= 0 and tr.y.max() < tr.num_classes


arrays = st.sampled_from([np.zeros((6, 2)), np.arange(6) % 3, np.array(["a", "b"] * 3), np.array([1.5] * 6),
                          np.array([np.inf] * 6), np.zeros((6, 2), np.complex64), np.zeros(0), np.zeros((6, 2), bool),
                          np.array([[1, 2]] * 6, dtype=np.int8), np.zeros((3, 2)), np.array(7.0), np.array([-1] * 6),
                          np.array([10**12] * 6)])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.dictionaries(st.sampled_from(["x", "y", "x_test", "y_test", "z"]), arrays, max_size=5),
       raw=st.binary(max_size=60), use_raw=st.booleans())
def test_fuzz_npz_loads_or_raises_gradsift_error(tmp_path, content, raw, use_raw):
    p = tmp_path / "f.npz"
    if use_raw:
        p.write_bytes(raw)
    else:
        np.savez(p, **content)
    try:
        tr, te = load_npz(p)
    except GradsiftError:
        return
    assert len(tr) and np.isfinite(tr.x).all() and tr.y.max() < tr.num_classes


def test_cli_label_column_and_encoding(tmp_path):
    from typer.testing import CliRunner

    from gradsift.cli import app

    names = ["th\xe9", "caf\xe9"]
    rows = ["a,b,species"] + [f"{i % 7},{(i * 3) % 5},{names[i % 2]}" for i in range(40)]
    p = tmp_path / "t.csv"
    p.write_bytes("\n".join(rows).encode("latin-1"))
    runner = CliRunner()
    r = runner.invoke(app, ["train", "--dataset", str(p), "--label-column", "species", "--epochs", "1",
                            "--model", "mlp:width=8", "--run-dir", str(tmp_path / "r"), "-q"])
    assert r.exit_code == 2 and "encoding" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["train", "--dataset", str(p), "--label-column", "species", "--encoding", "latin-1",
                            "--epochs", "1", "--model", "mlp:width=8", "--run-dir", str(tmp_path / "r2"), "-q"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", "--dataset", str(p), "--epochs", "1", "--encoding", "latin-1",
                            "--run-dir", str(tmp_path / "r3"), "-q"])
    assert r.exit_code == 2 and "no column 'label'" in r.output and "--label-column" in r.output
