"""A tiny BERT text classifier (built from a config, random weights) trained with the
HuggingFace Trainer through gradsift's SiftTrainer, recording training-dynamics scores.

The text is generated locally: short "reviews" whose label is carried by a sentiment word,
with 10% of the labels flipped so that the dynamics scores have something to find.

    python examples/hf_text_classifier.py --epochs 3 --out runs/example-hf
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import gradsift as gs
from gradsift.integrations.huggingface import SiftTrainer

FILLER = "the a movie film plot actor scene story was it very quite really and but so".split()
GOOD, BAD = ["great", "lovely", "superb", "fun"], ["awful", "boring", "dull", "bad"]


def make_texts(n: int, seed: int = 0, noise: float = 0.1) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``n`` sentences, their (possibly flipped) labels and which labels were flipped."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        words = list(rng.choice(FILLER, size=6))
        words.insert(int(rng.integers(0, 6)), str(rng.choice(GOOD if label else BAD)))
        texts.append(" ".join(words))
        labels.append(label)
    labels = np.array(labels)
    flipped = rng.random(n) < noise
    labels[flipped] = 1 - labels[flipped]
    return texts, labels, flipped


def tokenize(texts: list[str], length: int = 10) -> tuple[list[list[int]], dict[str, int]]:
    """Word-level ids (0 = padding, 1 = [CLS]), padded to ``length``."""
    vocab = {w: k + 2 for k, w in enumerate(sorted({w for t in texts for w in t.split()}))}
    ids = [[1] + [vocab[w] for w in t.split()][: length - 1] for t in texts]
    return [s + [0] * (length - len(s)) for s in ids], vocab


def main(argv: list[str] | None = None) -> dict:
    from datasets import Dataset
    from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--aggregator", default="mean", help="any gradsift aggregator (per-example ones need the engine to take dict inputs)")
    p.add_argument("--out", type=Path, default=Path("runs/example-hf"))
    args = p.parse_args(argv)

    texts, labels, flipped = make_texts(args.n)
    ids, vocab = tokenize(texts)
    ds = Dataset.from_dict({"text": texts, "input_ids": ids,
                            "attention_mask": [[int(t != 0) for t in s] for s in ids], "label": labels.tolist()})
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(vocab) + 2, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=16, num_labels=2))
    training_args = TrainingArguments(
        output_dir=str(args.out / "hf"), per_device_train_batch_size=32, num_train_epochs=args.epochs,
        learning_rate=2e-3, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, seed=0,
        disable_tqdm=True)
    trainer = SiftTrainer(model=model, args=training_args, train_dataset=ds, aggregator=args.aggregator,
                          recorders=[gs.DynamicsRecorder()], run_dir=args.out / "run")
    trainer.train()
    scores = gs.open_run(args.out / "run").scores()
    top = scores.sort_values("cum_loss", ascending=False).head(int(flipped.sum()))
    found = float(flipped[top.index.to_numpy()].mean()) if len(top) else float("nan")
    print(f"{int(flipped.sum())} flipped labels; {found:.0%} of the as many highest cumulative losses are flipped")
    return {"flipped": int(flipped.sum()), "precision_at_k": found, "epochs": len(trainer.sifter.history)}


if __name__ == "__main__":
    main()
