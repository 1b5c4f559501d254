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


# ---------------------------------------------------------------- HuggingFace datasets from local files

def _hf_tokens(n=40, length=6, seed=0):
    """Token ids whose class is the keyword at position 1 (3 -> 'pos', 4 -> 'neg')."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 30, (n, length))
    label = np.arange(n) % 2
    ids[:, 1] = np.where(label == 1, 3, 4)
    return ids, label


class _BagModel(__import__("torch").nn.Module):
    """model(input_ids=, attention_mask=) -> logits [B, 2]: mean of masked token embeddings."""

    def __init__(self):
        import torch

        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(30, 8)
        self.out = torch.nn.Linear(8, 2)

    def forward(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).float()
        return self.out((self.emb(input_ids) * m).sum(1) / m.sum(1))


def test_hf_save_to_disk_dir_with_fit_sifter_and_cli(tmp_path):
    datasets = pytest.importorskip("datasets")
    import torch
    from typer.testing import CliRunner

    from gradsift.cli import app

    ids, label = _hf_tokens(40)
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int64")),
                                  "attention_mask": datasets.Sequence(datasets.Value("int64")),
                                  "text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["pos", "neg"])})

    def split(lo, hi):
        return datasets.Dataset.from_dict({"input_ids": ids[lo:hi].tolist(),
                                           "attention_mask": np.ones_like(ids[lo:hi]).tolist(),
                                           "text": ["t"] * (hi - lo), "label": (1 - label[lo:hi]).tolist()},
                                          features=features)

    root = tmp_path / "tok"
    datasets.DatasetDict({"train": split(0, 30), "test": split(30, 40)}).save_to_disk(str(root))

    train = D.load_hf(root)                    # split "train"; the text column is left out
    assert len(train) == 30 and train.input_columns == ["input_ids", "attention_mask"]
    assert train.classes == ("pos", "neg") and train.num_classes == 2
    x0, y0 = train[0]
    assert torch.equal(x0["input_ids"], torch.as_tensor(ids[0])) and y0 == 1 - label[0]
    test = D.load_hf(root, split="test")
    res = gs.fit(_BagModel(), train, test, aggregator="m3", optimizer="adam:lr=0.05", epochs=3, batch_size=10,
                 recorders=[gs.DynamicsRecorder()], run_dir=tmp_path / "run", progress=False)
    assert res.history.train_acc.iloc[-1] >= 0.9 and res.history.train_loss.iloc[-1] < res.history.train_loss.iloc[0]
    assert sorted(gs.open_run(tmp_path / "run").scores().index) == list(range(30))
    # the user's own loop
    model = _BagModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loader = torch.utils.data.DataLoader(D.indexed(train), batch_size=10, shuffle=True)
    with gs.Sifter(model, gs.losses.cross_entropy, aggregator="winsorize:c=1",
                   recorders=[gs.AUMRecorder()]) as sifter:
        for batch_ids, xb, yb in loader:
            sifter.backward(xb, yb, ids=batch_ids)
            opt.step()
            opt.zero_grad()
        sifter.end_epoch()
    assert sorted(sifter.recorders[0].scores().index) == list(range(30))

    # in memory for the CLI: its own train/test splits, ClassLabel order and names kept
    tr, te = D.load(str(root))
    assert (len(tr), len(te)) == (30, 10) and tr.token_ids and tr.classes == ("pos", "neg")
    np.testing.assert_array_equal(tr.y, 1 - label[:30])
    np.testing.assert_array_equal(tr.x, ids[:30])
    r = CliRunner().invoke(app, ["train", "--dataset", str(root), "--epochs", "1", "--quiet",
                                 "--run-dir", str(tmp_path / "cli0")])
    assert r.exit_code == 2 and "token ids" in r.output and "--model bag" in r.output
    r = CliRunner().invoke(app, ["train", "--dataset", str(root), "--model", "bag", "--epochs", "2",
                                 "--aggregator", "winsorize:c=1", "--batch-size", "10", "--quiet",
                                 "--run-dir", str(tmp_path / "cli")])
    assert r.exit_code == 0, r.output


def test_hf_json_with_class_names_and_clear_errors(tmp_path):
    datasets = pytest.importorskip("datasets")
    import json

    ids, label = _hf_tokens(12)
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"input_ids": r.tolist(), "label": ["cat", "dog"][k]})
                              for r, k in zip(ids, label)))
    ex = D.load_hf(path)
    assert ex.classes == ("cat", "dog") and ex.targets.tolist() == label.tolist()
    tr, te = D.load(str(path), seed=1)
    assert len(tr) + len(te) == 12 and tr.classes == ("cat", "dog") and tr.token_ids

    def bad(p, text, match, **kw):
        p.write_text(text)
        with pytest.raises(gs.DataError, match=match):
            D.load_hf(p, **kw)

    bad(tmp_path / "broken.json", '{"input_ids": [1, 2], "label": 0}\n{"input_ids": [1', "broken.json")
    bad(tmp_path / "nolabel.jsonl", '{"input_ids": [1, 2], "y": 0}', "no column 'label'.*label_column")
    bad(tmp_path / "text.jsonl", '{"text": "hi", "label": 0}', "tokenize")
    bad(tmp_path / "ragged.jsonl", '{"input_ids": [1, 2], "label": 0}\n{"input_ids": [1], "label": 1}',
        "different lengths.*padding")
    bad(tmp_path / "mixed.jsonl", '{"input_ids": [1], "label": "cat"}\n{"input_ids": [2], "label": 3}', "label")
    with pytest.raises(gs.DataError, match="no such file"):
        D.load_hf(tmp_path / "missing.json")
    (tmp_path / "plain").mkdir()
    with pytest.raises(gs.DataError, match="save_to_disk"):
        D.load_hf(tmp_path / "plain")
    with pytest.raises(gs.DataError, match="no split 'valid'"):
        D.load_hf(path, split="valid")
    with pytest.raises(gs.DataError, match="input column 'mask'"):
        D.load_hf(path, input_columns=["mask"])
