"""A CNN on an image folder, with augmentation, in your own training loop with gs.Sifter
and a winsorized update.

The image folder is written from the built-in digits (one sub-folder per class, 8x8 PNGs),
read lazily by ``gs.data.image_folder`` with a random one-pixel shift as augmentation.
The loop is an ordinary PyTorch loop; ``sifter.backward`` replaces ``loss.backward()``.

    python examples/cnn_image_folder.py --epochs 5 --out runs/example-cnn
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

import gradsift as gs


def write_digits_folder(root: Path, n: int) -> None:
    """Write ``n`` digits as ``root/<class>/<example_id>.png``."""
    from PIL import Image

    train, _ = gs.data.load_digits(images=True)
    for i in range(min(n, len(train))):
        folder = root / str(train.y[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((train.x[i, 0] * 255).round().astype(np.uint8)).save(folder / f"{train.example_ids[i]}.png")


def shift(x: torch.Tensor) -> torch.Tensor:
    """Augmentation: move the image [C, H, W] by up to one pixel each way."""
    dy, dx = torch.randint(-1, 2, (2,)).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(1, 2))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--n", type=int, default=1400, help="digits written to the folder")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", type=Path, default=Path("runs/example-cnn"))
    args = p.parse_args(argv)

    torch.manual_seed(0)
    write_digits_folder(args.out / "images", args.n)
    train = gs.data.image_folder(args.out / "images", transform=shift)
    loader = DataLoader(gs.data.indexed(train), batch_size=args.batch_size, shuffle=True)

    model = gs.models.cnn((1, 8, 8), len(train.classes), channels=8)
    loss_fn = nn.CrossEntropyLoss(reduction="none")  # per-example losses
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with gs.Sifter(model, loss_fn, aggregator="winsorize:c=3", recorders=[gs.DynamicsRecorder()],
                   run_dir=args.out / "run", optimizer=optimizer) as sifter:
        for epoch in range(args.epochs):
            correct = total = 0
            for ids, x, y in loader:
                losses = sifter.backward(x, y, ids=ids)  # [B]; the winsorized gradient is in .grad
                optimizer.step()
                optimizer.zero_grad()
                total += len(y)
            with torch.no_grad():  # accuracy on the un-augmented images
                for _, x, y in DataLoader(gs.data.indexed(gs.data.image_folder(args.out / "images")), batch_size=256):
                    correct += int((model(x).argmax(1) == y).sum())
            row = sifter.end_epoch(train_acc=correct / len(train), last_loss=float(losses.mean()))
            print(f"epoch {row['epoch']}: train acc {row['train_acc']:.3f}")
    scores = gs.open_run(args.out / "run").scores()
    print("hardest examples (forgetting, cumulative loss):")
    print(scores.sort_values("cum_loss", ascending=False).head(5)[["label", "forgetting", "cum_loss"]])
    return row


if __name__ == "__main__":
    main()
