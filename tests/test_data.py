import numpy as np
import pytest

import gradsift as gs
from gradsift import data as D


def test_digits_split_and_scale():
    tr, te = D.load_digits()
    assert len(tr) == 1400 and len(te) == 397
    assert tr.x.shape == (1400, 64) and tr.x.max() <= 1.0 and tr.x.min() >= 0.0
    assert set(np.unique(tr.y)) == set(range(10))
    assert len(set(tr.example_ids) & set(te.example_ids)) == 0
    tr2, _ = D.load_digits()
    np.testing.assert_array_equal(tr.example_ids, tr2.example_ids)


def test_mnist1d_is_generated_locally():
    tr, te = D.load_mnist1d(num_samples=200)
    assert tr.x.shape == (160, 40) and te.x.shape == (40, 40)
    assert tr.num_classes == 10 and tr.shape == (40,)


def test_symmetric_noise_exact_count_and_recorded():
    tr, _ = D.load_digits()
    noisy = D.symmetric_noise(tr, 0.2, seed=1)
    assert len(noisy.corrupted) == 280
    assert (noisy.y[noisy.corrupted] != tr.y[noisy.corrupted]).all()
    keep = np.setdiff1d(np.arange(len(tr)), noisy.corrupted)
    np.testing.assert_array_equal(noisy.y[keep], tr.y[keep])
    np.testing.assert_array_equal(noisy.clean_y, tr.y)
    assert noisy.is_noisy.sum() == 280


def test_asymmetric_noise_class_pairs():
    tr, _ = D.load_digits()
    noisy = D.asymmetric_noise(tr, 0.4, seed=0)
    changed = noisy.corrupted
    np.testing.assert_array_equal(noisy.y[changed], (tr.y[changed] + 1) % 10)
    for c in range(10):
        n_c = (tr.y == c).sum()
        assert ((tr.y[changed] == c).sum()) == int(round(0.4 * n_c))


def test_random_labels():
    tr, _ = D.load_digits()
    r = D.random_labels(tr, seed=0)
    assert 0.8 < (r.y != tr.y).mean() < 0.95  # about 90% differ by chance
    np.testing.assert_array_equal(r.corrupted, np.flatnonzero(r.y != tr.y))


def test_subset_keeps_corruption_positions():
    tr, _ = D.load_digits()
    noisy = D.symmetric_noise(tr, 0.5, seed=0)
    sub = noisy.subset(np.arange(100))
    np.testing.assert_array_equal(sub.corrupted, np.flatnonzero(sub.y != sub.clean_y))


def test_npz_and_csv(tmp_path):
    x = np.random.rand(30, 4).astype(np.float32)
    y = np.arange(30) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    tr, te = D.load(str(tmp_path / "d.npz"))
    assert len(tr) + len(te) == 30 and tr.num_classes == 3
    lines = ["a,b,label"] + [f"{i},{i * 2},{i % 2}" for i in range(10)]
    (tmp_path / "d.csv").write_text("\n".join(lines))
    tr, te = D.load(str(tmp_path / "d.csv"))
    assert tr.x.shape[1] == 2 and len(tr) + len(te) == 10


@pytest.mark.parametrize(
    "x,y,k,msg",
    [
        (np.zeros((0, 3)), np.zeros(0, int), 2, "empty"),
        (np.zeros((3, 3)), np.zeros(2, int), 2, "different lengths"),
        (np.zeros((3, 3)), np.array([0, 1, 5]), 3, r"out of range \[0, 3\).*position 2"),
        (np.zeros((3, 3)), np.array([0, -1, 1]), 3, "out of range"),
        (np.zeros((2, 3)), np.array([0.5, 1.0]), 3, "integers"),
    ],
)
def test_clear_errors(x, y, k, msg):
    with pytest.raises(gs.DataError, match=msg):
        D.Dataset(x, y, k)


def test_file_errors(tmp_path):
    with pytest.raises(gs.DataError, match="no such file"):
        D.load(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "bad.npz", features=np.zeros((3, 2)))
    with pytest.raises(gs.DataError, match="no array 'x'"):
        D.load(str(tmp_path / "bad.npz"))
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(gs.DataError, match="no column 'label'"):
        D.load(str(tmp_path / "bad.csv"))
    with pytest.raises(gs.DataError, match="unknown data set"):
        D.load("imagenet")
    with pytest.raises(gs.DataError, match="unknown label noise"):
        D.corrupt(D.load_digits()[0], "weird", 0.1)
