"""``gradsift train``: train one model with any aggregator and optimizer into a run directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .common import UsageError, out_console, show_progress
from .options import (Dataset, Encoding, LabelColumn, LabelNoise, NoiseRate, Overwrite, Quiet, Resume, RunDirOption,
                      Seed, choice, noise_rate_for)


def train(
    dataset: Dataset = "digits",
    label_column: LabelColumn = "label",
    encoding: Encoding = "utf-8",
    model: str = typer.Option("mlp:width=256", help="mlp[:width=..,depth=..] or cnn[:channels=..]"),
    aggregator: str = typer.Option("mean", help="e.g. mean, winsorize:c=2, m3, rm3, trimmed_mean:fraction=0.1, clip:max_norm=1+mean, sven:rank=16"),
    optimizer: str = typer.Option("sgd:lr=0.1,momentum=0.9", help="NAME[:k=v,...] from torch.optim or pytorch_optimizer, e.g. adamw:lr=1e-3, lion:lr=1e-4"),
    epochs: int = typer.Option(10, min=1, help="number of epochs"),
    batch_size: int = typer.Option(100, min=1, help="batch size"),
    lr_schedule: Optional[str] = typer.Option(None, "--lr-schedule", help="epoch-wise torch.optim.lr_scheduler by spec, e.g. multisteplr:milestones=(30,),gamma=0.1 or cosine:T_max=50"),
    label_noise: LabelNoise = "none",
    noise_rate: NoiseRate = None,
    coherence: bool = typer.Option(True, help="record m-coherence on a probe batch each epoch"),
    on_nonfinite: str = typer.Option("raise", callback=choice("raise", "drop"), help="raise or drop examples with NaN/inf gradients"),
    run_dir: RunDirOption = Path("runs/train"),
    resume: Resume = False,
    overwrite: Overwrite = False,
    seed: Seed = 0,
    quiet: Quiet = False,
    dist_mode: str = typer.Option("exact", help="under torchrun: exact (same update as one process on the global batch) or local (each rank aggregates its slice, then mean)"),
    dist_backend: str = typer.Option("auto", help="under torchrun: gloo, nccl or auto (nccl when CUDA is available)"),
    dist_timeout: float = typer.Option(300.0, help="under torchrun: seconds a rank waits for the others before failing"),
    dp: bool = typer.Option(False, "--dp", help="train with DP-SGD (per-example clipping, Gaussian noise, Poisson sampling)"),
    target_epsilon: Optional[float] = typer.Option(None, "--target-epsilon", help="DP: plan the noise multiplier for this epsilon"),
    noise_multiplier: Optional[float] = typer.Option(None, "--noise-multiplier", help="DP: sigma (instead of --target-epsilon)"),
    delta: float = typer.Option(1e-5, "--delta", help="DP: delta (must be below 1/N)"),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", help="DP: per-example clipping bound C"),
    per_layer_clip: bool = typer.Option(False, "--per-layer-clip", help="DP: clip each layer to C/sqrt(layers)"),
    sample_rate: Optional[float] = typer.Option(None, "--sample-rate", help="DP: Poisson sampling rate q (default batch_size/N)"),
    accountant: str = typer.Option("rdp", "--accountant", callback=choice("rdp", "prv"), help="DP: rdp or prv (Opacus)"),
) -> None:
    """Train a model with any aggregator and optimizer; write a run directory.

    Started by torchrun (e.g. ``torchrun --nproc-per-node 2 -m gradsift train ...``) it
    trains data-parallel: --batch-size is the global batch, rank 0 writes the run directory."""
    import torch

    from .. import data as data_mod
    from ..aggregate import aggregator_from_spec
    from ..models import model_from_spec
    from ..recorders import CoherenceRecorder
    from ..train import fit

    agg = aggregator_from_spec(aggregator)  # fail fast on a bad spec, before loading data
    noise_rate = noise_rate_for(label_noise, noise_rate)
    if dist_mode not in ("exact", "local"):
        raise UsageError(f"--dist-mode must be exact or local, got '{dist_mode}'")
    privacy = None
    if dp:
        from ..privacy import DPSGD

        if target_epsilon is None and noise_multiplier is None:
            raise typer.BadParameter("--dp needs --target-epsilon or --noise-multiplier")
        privacy = DPSGD(delta=delta, max_norm=max_grad_norm, noise_multiplier=noise_multiplier,
                        target_epsilon=target_epsilon, sample_rate=sample_rate,
                        per_layer=per_layer_clip, accountant=accountant)
    elif target_epsilon is not None or noise_multiplier is not None:
        raise typer.BadParameter("--target-epsilon / --noise-multiplier need --dp")
    train_data, test_data = data_mod.load(dataset, seed=seed, label_column=label_column, encoding=encoding)
    train_data = data_mod.corrupt(train_data, label_noise, noise_rate, seed=seed)
    torch.manual_seed(seed)
    vocab = int(max(train_data.x.max(), test_data.x.max())) + 1 if train_data.token_ids else None
    net = model_from_spec(model, train_data.shape or train_data.x.shape[1:], train_data.num_classes, vocab_size=vocab)
    config = dict(dataset=dataset, model=model, aggregator_spec=aggregator, optimizer_spec=optimizer,
                  label_noise=label_noise, noise_rate=noise_rate, corrupted=len(train_data.corrupted))
    kwargs = dict(
        aggregator=agg, optimizer=optimizer, epochs=epochs, batch_size=batch_size, seed=seed,
        run_dir=run_dir, resume=resume, overwrite=overwrite, recorders=[CoherenceRecorder(seed=seed)] if coherence else [],
        on_nonfinite=on_nonfinite, progress=show_progress(quiet), config=config, privacy=privacy,
        lr_schedule=lr_schedule,
    )
    from ..distributed import launched_by_torchrun

    if launched_by_torchrun():
        from ..distributed import fit_distributed, init_from_env

        comm = init_from_env(dist_backend, dist_timeout)
        try:
            result = fit_distributed(net, train_data, test_data, comm=comm, mode=dist_mode, **kwargs)
        finally:
            comm.close()
        if comm.rank != 0:
            return
    else:
        result = fit(net, train_data, test_data, **kwargs)
    last = result.history.iloc[-1].to_dict()
    out_console.print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in last.items()}))
    if privacy is not None:
        rep = result.trainer.privacy_report
        out_console.print(
            f"privacy: epsilon spent {rep['epsilon']:.3f} at delta {rep['delta']:g} "
            f"(sigma {rep['noise_multiplier']:.4g}, C {rep['max_norm']:g}, q {rep['sample_rate']:.4g}, "
            f"{rep['steps']} steps, {rep['accountant']} accountant)"
        )
    out_console.print(f"wrote {run_dir}")
