"""The HuggingFace ``transformers.Trainer`` with gradsift's per-example view:
:class:`SiftTrainer`.

    from gradsift.integrations.huggingface import SiftTrainer
    trainer = SiftTrainer(model=hf_model, args=training_args, train_dataset=ds, aggregator="m3",
                          recorders=[gs.DynamicsRecorder()], run_dir="runs/hf")
    trainer.train()

Each training step goes through a :class:`gradsift.Sifter`: per-example losses from the
model's task, the aggregated gradient left in ``.grad``, then the Trainer's own clipping,
optimizer and schedule. The per-example loss the task implies:

* ``"classification"`` (``*ForSequenceClassification``): cross-entropy of ``logits
  [B, C]`` against ``labels [B]``;
* ``"causal_lm"`` (``*ForCausalLM``, ``*LMHeadModel``): mean next-token cross-entropy over
  the example's tokens whose label is not ``-100``;
* ``"masked_lm"`` (``*ForMaskedLM``): mean cross-entropy over its tokens whose label is not
  ``-100``.

Examples are keyed by their index in ``train_dataset``: recorders and
``RUN/scores.parquet`` use it as ``example_id``. Gradient accumulation is not supported
(the aggregated gradient of each batch replaces ``.grad``).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    import transformers
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("gradsift.integrations.huggingface needs transformers: pip install transformers") from e

from ..errors import GradsiftError
from ..recorders import Recorder
from ..sifter import Sifter

__all__ = ["SiftTrainer", "TASKS", "per_example_loss", "infer_task", "LogitsModel"]

IGNORE_INDEX = -100
TASKS = ("classification", "causal_lm", "masked_lm")
_ID = "gradsift_example_id"
_LABEL_KEYS = ("labels", "label", "label_ids")


def _classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


def _token_loss(logits: Tensor, labels: Tensor, shift: bool) -> Tensor:
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    b, t, v = logits.shape
    tok = F.cross_entropy(logits.reshape(b * t, v), labels.reshape(b * t), ignore_index=IGNORE_INDEX,
                          reduction="none").reshape(b, t)
    count = (labels != IGNORE_INDEX).sum(1).clamp(min=1)
    return tok.sum(1) / count


def per_example_loss(task: str) -> Callable[[Tensor, Tensor], Tensor]:
    """``(logits, labels) -> [B]`` per-example losses for ``task`` (one of :data:`TASKS`)."""
    if task == "classification":
        return _classification_loss
    if task == "causal_lm":
        return lambda logits, labels: _token_loss(logits, labels, shift=True)
    if task == "masked_lm":
        return lambda logits, labels: _token_loss(logits, labels, shift=False)
    raise GradsiftError(f"unknown task '{task}': use one of {', '.join(TASKS)}")


def infer_task(model: nn.Module) -> str:
    """The task of a HuggingFace model from its class name."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "classification"
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "causal_lm"
    if name.endswith("ForMaskedLM"):
        return "masked_lm"
    raise GradsiftError(f"cannot tell the task of {name}; pass task= (one of {', '.join(TASKS)})")


class LogitsModel(nn.Module):
    """``model(**inputs).logits``: a HuggingFace model as a module returning a tensor
    (its parameters are ``model.<name>``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **inputs: Any) -> Tensor:
        return self.model(**inputs).logits


class _Indexed(torch.utils.data.Dataset):
    """Items of ``dataset`` (dicts) with their index under :data:`_ID`."""

    def __init__(self, dataset: Any, keep: set[str] | None):
        self.dataset, self.keep = dataset, keep

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[i]
        if not isinstance(item, dict):
            raise GradsiftError(f"train_dataset item {i} is a {type(item).__name__}; SiftTrainer needs dict "
                                "items (input_ids, attention_mask, labels, ...)")
        if self.keep is not None:
            item = {k: v for k, v in item.items() if k in self.keep}
        return {**item, _ID: i}


class _Examples(torch.utils.data.Dataset):
    """``(inputs, label)`` view of the training set, for recorders reading it whole."""

    def __init__(self, dataset: Any, keep: set[str] | None, collator: Callable):
        self.dataset, self.keep, self.collator = dataset, keep, collator

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def targets(self) -> Tensor | None:
        names = getattr(self.dataset, "column_names", None)
        for k in _LABEL_KEYS:
            if names is not None and k in names:
                return torch.as_tensor(self.dataset[k])
        return None

    def __getitem__(self, i: int) -> tuple[dict, Any]:
        item = dict(self.dataset[i])
        label = next((item.pop(k) for k in _LABEL_KEYS if k in item), None)
        if self.keep is not None:
            item = {k: v for k, v in item.items() if k in self.keep}
        return {k: torch.as_tensor(v) for k, v in item.items()}, label


class _EpochCallback(transformers.TrainerCallback):
    def __init__(self, trainer: "SiftTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.sifter.open(task=self.trainer.task)

    def on_epoch_end(self, args, state, control, **kwargs):
        self.trainer.sifter.end_epoch()

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.sifter.close()


class SiftTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that trains with a gradsift aggregator and recorders.

    Args:
        aggregator: a gradsift aggregator or spec (``"m3"``, ``"winsorize:c=3"``, ...).
        recorders: gradsift recorders (e.g. ``gs.DynamicsRecorder()``); they see each
            step's per-example losses and logits, keyed by the index in ``train_dataset``.
        run_dir: gradsift run directory (manifest, metrics, scores); separate from
            ``args.output_dir``.
        task: one of :data:`TASKS` (default: from the model's class name).
        chunk_size, fuse, precision: as for :class:`gradsift.Sifter`.
        Everything else as ``transformers.Trainer``.
    """

    def __init__(self, *args: Any, aggregator: Any = "mean", recorders: Sequence[Recorder] = (),
                 run_dir: Any = None, task: str | None = None, chunk_size: int | None = None,
                 fuse: bool = False, precision: str | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.args.gradient_accumulation_steps != 1:
            raise GradsiftError("SiftTrainer: gradient_accumulation_steps must be 1 (each batch's aggregated "
                                "gradient replaces .grad); raise per_device_train_batch_size instead")
        self.task = task or infer_task(self.model)
        keep = self._model_inputs()
        if self.train_dataset is not None:
            self._raw_train = self.train_dataset
            self.train_dataset = _Indexed(self.train_dataset, keep)
            data = _Examples(self._raw_train, keep, self.data_collator)
        else:
            data = None
        self.sifter = Sifter(
            LogitsModel(self.model), per_example_loss(self.task), aggregator=aggregator, recorders=recorders,
            run_dir=run_dir, data=data, chunk_size=chunk_size, fuse=fuse, precision=precision,
            config={"task": self.task, "hf_model": type(self.model).__name__},
        )
        self.add_callback(_EpochCallback(self))

    def _model_inputs(self) -> set[str] | None:
        try:
            params = set(inspect.signature(self.model.forward).parameters)
        except (TypeError, ValueError):
            return None
        return params | set(_LABEL_KEYS)

    def _set_signature_columns_if_needed(self) -> None:
        # the Trainer's collator drops the columns the model's forward does not take
        # (remove_unused_columns): keep the example index
        super()._set_signature_columns_if_needed()
        if _ID not in self._signature_columns:
            self._signature_columns.append(_ID)

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Tensor:
        model.train()
        inputs = dict(self._prepare_inputs(inputs))
        ids = inputs.pop(_ID, None)
        if ids is None:
            raise GradsiftError(f"SiftTrainer: the batch lost its '{_ID}' column (the example index every "
                                "score is keyed by); a custom data_collator must pass it through")
        labels = next((inputs.pop(k) for k in _LABEL_KEYS if k in inputs), None)
        if labels is None:
            raise GradsiftError("SiftTrainer: the batch has no labels ('labels' or 'label'); per-example "
                                "losses need them")
        self.sifter.optimizer = self.optimizer
        losses = self.sifter.backward(inputs, labels, ids=None if ids is None else ids.cpu())
        return losses.mean().detach()
