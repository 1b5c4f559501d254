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
