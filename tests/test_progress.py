"""Progress: long library steps report to the command's display, and stay silent without one."""

from __future__ import annotations

import torch

from gradsift.progress import current, progress_scope, task
from gradsift.scores import train_members


def _finished_tasks(bar) -> list[tuple[str, float, float]]:
    """Record (description, completed, total) of every task when it is removed."""
    seen: list[tuple[str, float, float]] = []
    remove = bar.remove_task

    def recording_remove(tid):
        t = next(t for t in bar.tasks if t.id == tid)
        seen.append((t.description, t.completed, t.total))
        remove(tid)

    bar.remove_task = recording_remove
    return seen


def test_task_is_a_noop_without_a_display():
    assert current() is None
    with task("nothing", 3) as advance:
        advance()
    with progress_scope(False) as bar:
        assert bar is None and current() is None


def test_many_model_training_reports_every_member_epoch():
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    masks = torch.zeros(3, 40, dtype=torch.bool)
    masks[:, :30] = True

    def model_fn(k):
        torch.manual_seed(k)
        return torch.nn.Linear(5, 3)

    for vectorize in (True, False):
        with progress_scope(True) as bar:
            assert current() is bar
            seen = _finished_tasks(bar)
            train_members(model_fn, x, y, masks, epochs=2, batch_size=10, vectorize=vectorize)
        assert current() is None
        assert len(seen) == 1 and seen[0][1] == seen[0][2] == 6  # 3 members x 2 epochs, all done
        assert seen[0][0].startswith("training 3 models")
