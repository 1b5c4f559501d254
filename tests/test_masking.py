import numpy as np
import pytest
import torch
from torch import nn

import gradsift as gs
from gradsift import masking as M
from gradsift.aggregate import apply, chain, mean
from gradsift.data import load_digits
from gradsift.errors import GradsiftError


class TwoHeads(nn.Module):
    """A shared trunk, a head for classes 0-4 ("retain") and one for 5-9 ("forget")."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(64, width), nn.ReLU())
        self.retain = nn.Linear(width, 5)
        self.forget = nn.Linear(width, 5)

    def forward(self, x):
        h = self.trunk(x)
        return torch.cat([self.retain(h), self.forget(h)], 1)


def assignment(model, untagged="shared"):
    return M.assign_parameters(model, {"retain": ["retain.*"], "forget": ["re:^forget\\."]},
                               shared=["trunk.*"], untagged=untagged)


@pytest.fixture(scope="module")
def digits():
    tr, te = load_digits()
    return tr.subset(np.arange(600)), te


def test_assignment_by_pattern_and_errors():
    m = TwoHeads()
    asg = assignment(m)
    assert asg.dedicated["forget"] == ("forget.weight", "forget.bias")
    assert asg.shared == ("trunk.0.weight", "trunk.0.bias")
    assert asg.owner("retain.bias") == 0 and asg.owner("trunk.0.bias") is None
    with pytest.raises(GradsiftError, match="claimed by both"):
        M.assign_parameters(m, {"a": ["forget.*"], "b": ["*.bias"]})
    with pytest.raises(GradsiftError, match="matches no parameter"):
        M.assign_parameters(m, {"a": ["head.*"]})
    with pytest.raises(GradsiftError, match="in no group"):
        M.assign_parameters(m, {"a": ["forget.*"]}, unassigned="error")
    with pytest.raises(GradsiftError, match="unknown group"):
        M.tags_from_names(["retain", "nope"], asg)


def test_masked_rows_are_exactly_zero_and_kept_rows_untouched():
    torch.manual_seed(0)
    m = TwoHeads(8)
    asg = assignment(m, untagged="all")
    x, y = torch.randn(6, 64), torch.randint(0, 10, (6,))
    grads = gs.per_example_gradients(m, nn.CrossEntropyLoss(reduction="none"), x, y)
    tags = torch.tensor([0, 1, -1, 1, 0, -1])
    out = M.mask_gradients(grads, tags, asg)
    for n, g in out.items():
        owner = asg.owner(n)
        for i, t in enumerate(tags.tolist()):
            allowed = owner is None or t == owner or t == -1
            assert torch.equal(g[i], grads[n][i] if allowed else torch.zeros_like(g[i])), (n, i)


def test_a_group_never_changes_another_groups_parameters(digits):
    """Exact: train on retain-tagged and untagged examples only; the forget head stays
    bit-identical (Adam), while the trunk and retain head move."""
    tr, _ = digits
    keep = np.flatnonzero(tr.y < 5)
    data = tr.subset(keep)
    torch.manual_seed(0)
    m = TwoHeads(16)
    asg = assignment(m)
    tags = torch.where(torch.arange(len(data)) % 3 == 0, -1, 0)  # retain, some untagged
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    gs.fit(m, data, aggregator=chain(M.group_masking(asg, tags), mean()),
           optimizer="adam:lr=1e-2", epochs=2, batch_size=40)
    after = dict(m.named_parameters())
    for n in asg.dedicated["forget"]:
        assert torch.equal(after[n], before[n]), n
    for n in (*asg.dedicated["retain"], *asg.shared):
        assert not torch.equal(after[n], before[n]), n


def test_other_groups_examples_do_not_enter_a_groups_update():
    """Exact: two batches that differ only in their forget examples give bit-identical
    updates of the retain head."""
    torch.manual_seed(0)
    m = TwoHeads(16)
    asg = assignment(m)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    x, y = torch.randn(10, 64), torch.randint(0, 10, (10,))
    tags = torch.tensor([0, 1] * 5)
    x2, y2 = x.clone(), y.clone()
    x2[tags == 1] = torch.randn(5, 64) * 10
    y2[tags == 1] = torch.randint(0, 10, (5,))
    agg = chain(M.group_masking(asg, tags), mean())
    idx = torch.arange(10)
    u1, _ = apply(agg, gs.per_example_gradients(m, loss_fn, x, y), agg.init({}), positions=idx)
    u2, _ = apply(agg, gs.per_example_gradients(m, loss_fn, x2, y2), agg.init({}), positions=idx)
    for n in asg.dedicated["retain"]:
        assert torch.equal(u1[n], u2[n]), n
    for n in asg.dedicated["forget"]:
        assert not torch.equal(u1[n], u2[n]), n
    with pytest.raises(ValueError, match="positions"):
        apply(agg, gs.per_example_gradients(m, loss_fn, x, y), agg.init({}))


def test_removing_a_group_removes_its_performance_and_keeps_the_rest(digits):
    """SGTM demo: forget = digits 5-9. After zeroing the forget group's parameters the model
    no longer recognizes 5-9 and still recognizes 0-4."""
    tr, te = digits
    xt, yt = te.tensors()
    torch.manual_seed(0)
    m = TwoHeads()
    asg = assignment(m)
    tags = M.tags_from_names(["forget" if v >= 5 else "retain" for v in tr.y.tolist()], asg)
    gs.fit(m, tr, aggregator=chain(M.group_masking(asg, tags), mean()),
           optimizer="adam:lr=3e-3", epochs=3, batch_size=50)

    def acc(sel):
        with torch.no_grad():
            return float((m(xt[sel]).argmax(1) == yt[sel]).float().mean())

    retain, forget = yt < 5, yt >= 5
    before = acc(retain), acc(forget)
    assert M.remove_group(m, asg, "forget") == ["forget.weight", "forget.bias"]
    after = acc(retain), acc(forget)
    assert before[0] > 0.8 and before[1] > 0.8
    assert after[1] < 0.05          # the forget group's performance is gone
    assert after[0] > 0.8           # the rest is kept
