"""Models and batches of the benchmarks, built locally with random weights (nothing is
downloaded; torchvision is not needed).

Every builder returns ``(model, inputs, targets, loss_fn)`` for a batch of ``B`` examples,
where ``inputs`` is a tensor or a dict of tensors with the batch on dim 0 and ``loss_fn``
maps ``(model output, targets [B]) -> [B]`` per-example losses.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CE = nn.CrossEntropyLoss(reduction="none")


def ce_logits(out: Any, y: Tensor) -> Tensor:
    """Per-example cross-entropy ``[B]`` on a tensor of logits or an output with ``.logits``."""
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits, y, reduction="none")


# ---------------------------------------------------------------- small models

def mlp() -> nn.Module:
    """64 -> 512 -> 512 -> 10 (301k parameters)."""
    return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def cnn() -> nn.Module:
    """Small CNN for 1x28x28 inputs (20k parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
    )


# ---------------------------------------------------------------- ResNet-18 with GroupNorm

def _gn(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, c), c)


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs) with GroupNorm and no in-place ops."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.gn1 = _gn(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.gn2 = _gn(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _gn(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.gn1(self.conv1(x)))
        out = self.gn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18GN(nn.Module):
    """ResNet-18 (torchvision's layout: 7x7 stem, max-pool, 4 stages of 2 blocks) with
    GroupNorm(32) in place of BatchNorm; 11.2M parameters; inputs ``[B, 3, H, W]``."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.gn1 = _gn(64)
        self.pool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(F.relu(self.gn1(self.conv1(x))))
        x = self.layers(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------- LSTM classifier

class LSTMClassifier(nn.Module):
    """Embedding(vocab, 64) -> LSTM(64, 128, batch_first) -> Linear(128, classes) on the
    last step; inputs: token ids ``[B, T]``."""

    def __init__(self, vocab: int = 1000, emb: int = 64, hidden: int = 128, classes: int = 2,
                 lstm: nn.Module | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.lstm = lstm if lstm is not None else nn.LSTM(emb, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(self.emb(x))
        return self.fc(out[:, -1])


class EncoderBlock(nn.Module):
    """Pre-norm transformer block on ``nn.MultiheadAttention`` with a bool key padding mask
    (as ``nn.TransformerEncoderLayer(norm_first=True)``, whose float-converted mask Opacus's
    ``DPMultiheadAttention`` does not take)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))

    def forward(self, h: Tensor, pad: Tensor) -> Tensor:
        x = self.ln1(h)
        h = h + self.attn(x, x, x, key_padding_mask=pad, need_weights=False)[0]
        return h + self.ff(self.ln2(h))


class TorchEncoder(nn.Module):
    """Embedding(vocab, 128) -> 2 pre-norm blocks on ``nn.MultiheadAttention`` (4 heads, FF
    512) with a key padding mask -> mean over the kept tokens -> Linear(128, classes);
    inputs ``tokens [B, T]``, ``keep [B, T]`` (1 = token)."""

    def __init__(self, vocab: int = 1000, dim: int = 128, classes: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([EncoderBlock(dim, 4) for _ in range(2)])
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: Tensor, keep: Tensor) -> Tensor:
        h, pad = self.emb(tokens), keep == 0
        for block in self.blocks:
            h = block(h, pad)
        w = keep.to(h.dtype).unsqueeze(2)
        return self.head((h * w).sum(1) / w.sum(1))


# ---------------------------------------------------------------- HF transformers

def _padding_mask(b: int, t: int, g: torch.Generator) -> Tensor:
    """``[B, T]`` attention mask: example i keeps its first ``len_i`` tokens (right padding),
    lengths uniform in ``[T/4, T]`` with the first example at full length."""
    lengths = torch.randint(t // 4, t + 1, (b,), generator=g)
    lengths[0] = t
    return (torch.arange(t)[None, :] < lengths[:, None]).long()


def bert_tiny(attn: str = "eager") -> nn.Module:
    """BERT-tiny (2 layers, hidden 128, 2 heads, intermediate 512, vocab 30522) for sequence
    classification, random weights, dropout off."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2,
                     attn_implementation=attn)
    return BertForSequenceClassification(cfg)


def gpt2_tiny(attn: str = "eager") -> nn.Module:
    """GPT-2-tiny (2 layers, n_embd 128, 2 heads, vocab 50257, 128 positions) for sequence
    classification, random weights, dropout off."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    cfg = GPT2Config(n_layer=2, n_embd=128, n_head=2, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, num_labels=2, pad_token_id=0, attn_implementation=attn)
    return GPT2ForSequenceClassification(cfg)


# ---------------------------------------------------------------- registry

Built = tuple[nn.Module, Any, Tensor, Callable[[Any, Tensor], Tensor]]


def build(name: str, b: int, seed: int = 0) -> Built:
    """``(model, inputs, targets, loss_fn)`` for model ``name`` at batch size ``b``."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if name == "mlp":
        return mlp(), torch.randn(b, 64, generator=g), torch.randint(0, 10, (b,), generator=g), CE
    if name == "cnn":
        return cnn(), torch.randn(b, 1, 28, 28, generator=g), torch.randint(0, 10, (b,), generator=g), CE
    if name == "resnet18-gn":
        return ResNet18GN(), torch.randn(b, 3, 32, 32, generator=g), torch.randint(0, 10, (b,), generator=g), CE
    if name == "lstm":
        return LSTMClassifier(), torch.randint(0, 1000, (b, 32), generator=g), torch.randint(0, 2, (b,), generator=g), CE
    if name == "torch-encoder":
        t = 64
        keep = _padding_mask(b, t, g)
        ids = torch.randint(1, 1000, (b, t), generator=g) * keep
        return TorchEncoder(), {"tokens": ids, "keep": keep}, torch.randint(0, 2, (b,), generator=g), CE
    if name in ("bert-tiny", "gpt2-tiny"):
        model = bert_tiny() if name == "bert-tiny" else gpt2_tiny()
        t = 64
        mask = _padding_mask(b, t, g)
        ids = torch.randint(1, model.config.vocab_size, (b, t), generator=g) * mask
        return model, {"input_ids": ids, "attention_mask": mask}, torch.randint(0, 2, (b,), generator=g), ce_logits
    raise KeyError(f"unknown benchmark model '{name}'")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def select(inputs: Any, index: slice | Tensor) -> Any:
    """Rows ``index`` of a tensor or of every tensor in a dict."""
    if isinstance(inputs, dict):
        return {k: v[index] for k, v in inputs.items()}
    return inputs[index]


def call(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a dict, else ``model(inputs)``."""
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)
