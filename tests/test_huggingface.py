"""SiftTrainer: a transformers.Trainer training a tiny BERT (built from a config, random
weights) with a gradsift aggregator and recorders; scores keyed by dataset index."""

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import gradsift as gs  # noqa: E402
from gradsift.integrations.huggingface import SiftTrainer, infer_task, per_example_loss  # noqa: E402


def tiny_bert(num_labels=2):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16, num_labels=num_labels)
    return BertForSequenceClassification(cfg)


def text_items(n=48, length=8):
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        label = i % 2
        ids = torch.randint(5, 40, (length,), generator=g)
        ids[1] = 3 if label else 4  # the class keyword
        items.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long), "labels": label})
    return items


def args(tmp_path, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=16, num_train_epochs=2,
                             learning_rate=1e-3, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, seed=0, **kw)


def test_sift_trainer_trains_and_writes_scores(tmp_path):
    model = tiny_bert()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = SiftTrainer(model=model, args=args(tmp_path), train_dataset=text_items(), aggregator="mean",
                          recorders=[gs.DynamicsRecorder()], run_dir=tmp_path / "run")
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    run = gs.open_run(tmp_path / "run")
    assert run.manifest["status"] == "finished" and run.manifest["config"]["task"] == "classification"
    scores = run.scores()
    assert sorted(scores.index) == list(range(48))  # keyed by dataset index
    assert list(scores.label[:4]) == [0, 1, 0, 1]
    assert [r["epoch"] for r in trainer.sifter.history] == [1, 2]


def test_per_example_losses_of_the_tasks():
    logits = torch.randn(3, 5, 7)
    labels = torch.randint(0, 7, (3, 5))
    labels[0, 2:] = -100
    lm = per_example_loss("causal_lm")(logits, labels)
    for i in range(3):
        lo, la = logits[i, :-1], labels[i, 1:]
        keep = la != -100
        ref = torch.nn.functional.cross_entropy(lo[keep], la[keep])
        torch.testing.assert_close(lm[i], ref)
    mlm = per_example_loss("masked_lm")(logits, labels)
    keep = labels[0] != -100
    torch.testing.assert_close(mlm[0], torch.nn.functional.cross_entropy(logits[0][keep], labels[0][keep]))
    assert infer_task(tiny_bert()) == "classification"
    with pytest.raises(gs.GradsiftError, match="task"):
        infer_task(torch.nn.Linear(2, 2))


def test_refuses_gradient_accumulation(tmp_path):
    with pytest.raises(gs.GradsiftError, match="gradient_accumulation_steps"):
        SiftTrainer(model=tiny_bert(), args=args(tmp_path, gradient_accumulation_steps=2), train_dataset=text_items())


# ---------------------------------------------------------------- robust aggregators through the Trainer

def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=16, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def lm_items(n=24, length=8):
    """Token sequences with a padded tail: labels are the tokens, -100 where padded."""
    g = torch.Generator().manual_seed(1)
    items = []
    for i in range(n):
        ids = torch.randint(1, 40, (length,), generator=g)
        real = 4 + i % (length - 3)
        mask = (torch.arange(length) < real).long()
        labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
        items.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return items


def no_dropout_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


DP = "dp_sgd:max_norm=0.05,noise_multiplier=0.5,expected_batch_size=8,seed=3"


def np_reference(spec, grads, step):
    """The update ``spec`` gives for float64 per-example ``grads`` (name -> [B, *shape]),
    written out in numpy (tests/aggregate_harness.py); DP's noise is drawn as
    gs.aggregate.gaussian_noise draws it at ``step`` (same generator, so comparable)."""
    import numpy as np

    from gradsift.aggregate.dp import step_generator

    from .aggregate_harness import np_clip, np_m3, np_winsorize

    g = {n: v.numpy() for n, v in grads.items()}
    if spec == "mean":
        return {n: v.mean(0) for n, v in g.items()}
    if spec == "m3":
        return {n: np_m3(v) for n, v in g.items()}
    if spec.startswith("winsorize:c="):
        c = int(spec.split("=")[1])
        return {n: np_winsorize(v, c) for n, v in g.items()}
    assert spec == DP
    gen = step_generator(3, step, torch.device("cpu"))
    out = {}
    for n, v in np_clip(g, 0.05).items():
        noise = torch.randn(v.shape[1:], generator=gen, dtype=torch.float32).double().numpy()
        out[n] = v.sum(0) / 8 + 0.5 * 0.05 / 8 * noise
    return out


def loop_grads(model, loss_fn, inputs, labels):
    """float64 per-example gradients by one backward pass per example (name -> [B, *shape])."""
    import copy

    m = copy.deepcopy(model).double()
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    rows = []
    for i in range(len(labels)):
        m.zero_grad()
        out = m(**{k: v[i : i + 1] for k, v in inputs.items()})
        loss_fn(out.logits.double(), labels[i : i + 1]).sum().backward()
        rows.append({n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                     for n, p in m.named_parameters() if p.requires_grad})
    return {n: torch.stack([r[n] for r in rows]) for n in names}


class CapturingTrainer(SiftTrainer):
    """Records, per step, the parameters before it, the batch and the ``.grad`` it left."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.steps = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        before = {n: v.detach().clone() for n, v in self.model.state_dict().items()}
        batch = {k: v.clone() for k, v in inputs.items()}
        loss = super().training_step(model, inputs, num_items_in_batch)
        grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters()}
        self.steps.append((before, batch, grads))
        return loss


@pytest.mark.parametrize("kind,spec", [("bert", "m3"), ("bert", DP), ("gpt2", "winsorize:c=1"), ("gpt2", "m3")])
def test_sift_trainer_applies_the_aggregators_update(tmp_path, kind, spec):
    """Each step's .grad equals the numpy reference of the aggregator on float64 per-example
    gradients of the batch the Trainer drew, and is far from the plain mean (so an ignored
    aggregator fails); SGD then applies exactly -lr * that update. Dict inputs; GPT-2 with
    ignored (-100) padded tokens; scores keyed by dataset index."""
    from transformers import TrainingArguments

    model, items = (no_dropout_bert(), text_items(24)) if kind == "bert" else (tiny_gpt2(), lm_items(24))
    lr = 0.5
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    targs = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=8, num_train_epochs=1,
                              max_grad_norm=0.0, report_to=[], save_strategy="no", logging_strategy="no",
                              use_cpu=True, seed=0)
    trainer = CapturingTrainer(model=model, args=targs, train_dataset=items, aggregator=spec,
                               optimizers=(opt, sched), recorders=[gs.DynamicsRecorder()], run_dir=tmp_path / "run")
    trainer.train()
    assert len(trainer.steps) == 3
    loss_fn = per_example_loss(trainer.task)
    seen, want_loss = [], {}
    for step, (before, batch, grads) in enumerate(trainer.steps):
        ids = batch.pop("gradsift_example_id")
        seen += ids.tolist()
        labels = batch.pop("labels")
        ref_model = tiny_gpt2() if kind == "gpt2" else no_dropout_bert()
        ref_model.load_state_dict(before)
        pe = loop_grads(ref_model, loss_fn, batch, labels)
        with torch.no_grad():
            want_loss.update(zip(ids.tolist(), loss_fn(ref_model(**batch).logits, labels).tolist()))
        want = np_reference(spec, pe, step)
        mean = np_reference("mean", pe, step)
        worst_gap = 0.0
        for n, g in grads.items():
            w = torch.from_numpy(want[n]).float()
            torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4, msg=lambda m: f"step {step}, {n}: {m}")
            worst_gap = max(worst_gap, float((torch.from_numpy(mean[n]).float() - w).abs().max()))
        assert worst_gap > 1e-3, "the reference equals the mean: this test could not see an ignored aggregator"
        after = trainer.steps[step + 1][0] if step + 1 < len(trainer.steps) else dict(model.named_parameters())
        for n, g in grads.items():
            torch.testing.assert_close(after[n].detach(), before[n] - lr * g, atol=1e-6, rtol=1e-5)
    assert sorted(seen) == list(range(24))
    scores = gs.open_run(tmp_path / "run").scores()
    assert sorted(scores.index) == list(range(24))
    # keyed by dataset index: each example's recorded loss is the loss of that item
    torch.testing.assert_close(torch.tensor(scores.loss.sort_index().to_numpy()),
                               torch.tensor([want_loss[i] for i in range(24)], dtype=torch.float64),
                               atol=1e-5, rtol=1e-5)


class _DictItems(torch.utils.data.Dataset):
    """A torch Dataset of ``({input_ids, attention_mask}, label)`` items."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        it = self.items[i]
        return {"input_ids": it["input_ids"], "attention_mask": it["attention_mask"]}, it["labels"]


def test_fit_on_a_tiny_hf_classifier_with_a_robust_aggregator(tmp_path):
    """gs.fit end to end on a tiny BERT (config, random weights) from a torch Dataset of dict
    inputs with winsorize: one step equals the numpy reference on float64 per-example
    gradients (so an ignored aggregator fails), and a short run learns and writes scores."""
    items = text_items(96)
    train, test = _DictItems(items[:64]), _DictItems(items[64:])
    spec, lr = "winsorize:c=2", 0.5
    model = no_dropout_bert()
    before = {n: v.clone() for n, v in model.state_dict().items()}
    gs.fit(model, train, aggregator=spec, loss_fn=gs.losses.cross_entropy, optimizer=f"sgd:lr={lr}", epochs=1,
           batch_size=64, progress=False)
    ref = no_dropout_bert()
    ref.load_state_dict(before)
    ids = torch.stack([it["input_ids"] for it in items[:64]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    labels = torch.tensor([it["labels"] for it in items[:64]])
    pe = loop_grads(ref, per_example_loss("classification"), inputs, labels)
    # the one batch of 64 is a permutation of the set; winsorize does not depend on the order
    want, mean = np_reference(spec, pe, 0), np_reference("mean", pe, 0)
    gap = 0.0
    for n, p in model.named_parameters():
        step = (before[n] - p.detach()) / lr
        torch.testing.assert_close(step, torch.from_numpy(want[n]).float(), atol=3e-5, rtol=1e-4, msg=n)
        gap = max(gap, float(abs(mean[n] - want[n]).max()))
    assert gap > 1e-3

    res = gs.fit(no_dropout_bert(), train, test, aggregator=spec, loss_fn=gs.losses.cross_entropy,
                 optimizer="adam:lr=0.01", epochs=4, batch_size=16, progress=False,
                 recorders=[gs.DynamicsRecorder()], run_dir=tmp_path / "run")
    h = res.history
    assert h.train_loss.iloc[-1] < h.train_loss.iloc[0] and h.train_acc.iloc[-1] >= 0.8
    scores = gs.open_run(tmp_path / "run").scores()
    assert sorted(scores.index) == list(range(64))
    assert list(scores.sort_index().label[:4]) == [0, 1, 0, 1]
