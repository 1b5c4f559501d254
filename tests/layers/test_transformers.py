"""HuggingFace BERT and GPT-2 (tiny configs, random weights) with padding masks and dict
inputs: exact per-example gradients on the hooks path, eager and sdpa attention."""

import functools

import pytest
import torch

import gradsift as gs

from .harness import check_path, check_per_example

tf = pytest.importorskip("transformers")

B, T, V, C = 3, 5, 23, 3


def bert(kind: str, attn: str):
    cfg = tf.BertConfig(
        vocab_size=V, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=12,
        max_position_embeddings=16, num_labels=C, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation=attn,
    )
    return {"cls": tf.BertForSequenceClassification, "mlm": tf.BertForMaskedLM}[kind](cfg)


def gpt2(kind: str, attn: str):
    cfg = tf.GPT2Config(
        vocab_size=V, n_embd=8, n_layer=1, n_head=2, n_positions=16, num_labels=C, pad_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation=attn, use_cache=False,
    )
    return {"cls": tf.GPT2ForSequenceClassification, "lm": tf.GPT2LMHeadModel}[kind](cfg)


def padded_batch():
    ids = torch.randint(1, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 3:] = 0
    mask[2, 1:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


def lm_targets(batch):
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    return labels


CASES = [
    ("bert", "cls"), ("bert", "mlm"), ("gpt2", "cls"), ("gpt2", "lm"),
]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family,kind", CASES, ids=["-".join(c) for c in CASES])
def test_hf_models_on_the_hooks_path(family, kind, attn):
    torch.manual_seed(0)
    model = (bert if family == "bert" else gpt2)(kind, attn)
    batch = padded_batch()
    if kind == "cls":
        loss, targets = gs.losses.cross_entropy, torch.randint(0, C, (B,))
    else:
        loss = functools.partial(gs.losses.sequence_cross_entropy, shift=(kind == "lm"))
        targets = lm_targets(batch)
    assert check_path(model, batch, targets, loss_fn=loss) == "hooks", gs.layers.explain(model, loss, batch, targets)
    check_per_example(model, batch, targets, loss_fn=loss, methods=("hooks",))


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_hf_models_replay_without_the_trace(family, monkeypatch):
    """After one traced recording, BERT's and GPT-2's (position ids shared by all examples)
    are replayed: no batch trace, the same captures."""
    import importlib

    from .test_replay import NoTrace, assert_same

    torch.manual_seed(0)
    model, batch, targets = (bert if family == "bert" else gpt2)("cls", "eager"), padded_batch(), torch.randint(0, C, (B,))
    traced = gs.layers.record(model, gs.losses.cross_entropy, batch, targets)
    monkeypatch.setattr(importlib.import_module("gradsift.layers.record"), "BatchTrace", NoTrace)
    assert_same(traced, gs.layers.record(model, gs.losses.cross_entropy, batch, targets))
