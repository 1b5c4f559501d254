"""AUM (area under the margin): hand-computed values, and the registry contract."""

from types import SimpleNamespace

import numpy as np
import torch

from gradsift.scores import SCORES, AUMRecorder, area_under_margin, logit_margin

from .common import check_score


def test_logit_margin_by_hand():
    z = torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0], [2.0, 1.0, 0.0], [0.5, 3.0, 3.0]])
    y = torch.tensor([0, 1, 2, 1])
    # z_y - max_{k != y} z_k: 2-1, 1-2, 0-2, 3-3
    torch.testing.assert_close(logit_margin(z, y), torch.tensor([1.0, -1.0, -2.0, 0.0]))


def test_area_under_margin_averages_presentations():
    m = np.array([[1.0, -1.0, np.nan], [3.0, 0.0, np.nan], [2.0, 0.5, np.nan]])
    np.testing.assert_allclose(area_under_margin(m)[:2], [2.0, -0.5 / 3])
    assert np.isnan(area_under_margin(m)[2])


def test_recorder_over_training_by_hand():
    """Three examples, two epochs, batches of two and one; the logits change between epochs."""
    trainer = SimpleNamespace(ids=torch.tensor([10, 11, 12]), run=None)
    rec = AUMRecorder()
    rec.on_fit_begin(trainer)
    step = lambda pos, z, y: SimpleNamespace(positions=torch.tensor(pos), outputs=torch.tensor(z),  # noqa: E731
                                             targets=torch.tensor(y))
    # epoch 1: margins 1 (ex 10), -1 (ex 11); then 0.5 (ex 12)
    rec.on_step(trainer, step([0, 1], [[2.0, 1.0], [2.0, 1.0]], [0, 1]))
    rec.on_step(trainer, step([2], [[0.0, 0.5]], [1]))
    rec.on_epoch_end(trainer, 1)
    # epoch 2 (another order): margins 3 (ex 12), 2 (ex 10); then 1 (ex 11)
    rec.on_step(trainer, step([2, 0], [[-1.0, 2.0], [4.0, 2.0]], [1, 0]))
    rec.on_step(trainer, step([1], [[0.0, 1.0]], [1]))
    got = rec.scores()
    assert list(got.index) == [10, 11, 12] and got.index.name == "example_id"
    np.testing.assert_allclose(got["aum"], [(1 + 2) / 2, (-1 + 1) / 2, (0.5 + 3) / 2])
    clone = AUMRecorder()  # resumes from its state
    clone.load_state_dict(rec.state_dict())
    clone.ids = rec.ids
    np.testing.assert_allclose(clone.scores()["aum"], got["aum"])


def test_aum_registered_low_is_suspect_and_finds_flipped_labels():
    entry = SCORES["aum"]
    assert entry.kind == "recorder" and entry.columns == ("aum",) and not entry.higher_is_harder
    check_score("aum", min_auroc=0.85)
