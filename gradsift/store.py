"""Run directories: a manifest, metrics and per-example tables in Parquet, checkpoints.

Layout of a run directory::

    RUN/manifest.json      config, versions, seed, status
    RUN/metrics.parquet    one row per epoch (train/test accuracy and loss, recorder metrics)
    RUN/<table>.parquet    other tables written by recorders (e.g. coherence per layer)
    RUN/checkpoint.pt      model, optimizer and aggregator state for resuming

Every file is written atomically (to a temporary file in the same directory, then
``os.replace``), so an interrupted run never leaves a half-written file and loses no row
that was already written.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pandas as pd


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (indented, keys in insertion order)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def write_parquet(path: str | Path, frame: pd.DataFrame) -> None:
    """Write a DataFrame to Parquet atomically."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def versions() -> dict[str, str]:
    """Versions of Python and the main libraries, for manifests."""
    import numpy
    import torch

    from . import __version__

    return {
        "gradsift": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
        "python": sys.version.split()[0], "platform": platform.platform(),
    }


class RunDir:
    """A run directory being written (see the module docstring for its layout)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def read_manifest(self) -> dict:
        return json.loads(self.manifest_path.read_text()) if self.manifest_path.exists() else {}

    def write_manifest(self, config: dict, **extra: Any) -> dict:
        """Write (or update) the manifest with ``config``, versions and ``extra`` keys."""
        manifest = self.read_manifest()
        manifest.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        manifest.update({"config": config, "versions": versions(), **extra})
        write_json(self.manifest_path, manifest)
        return manifest

    def update_manifest(self, **fields: Any) -> dict:
        manifest = self.read_manifest()
        manifest.update(fields)
        write_json(self.manifest_path, manifest)
        return manifest

    def write_table(self, name: str, frame: pd.DataFrame) -> Path:
        """Write ``RUN/<name>.parquet`` atomically."""
        path = self.path / f"{name}.parquet"
        write_parquet(path, frame)
        return path

    def read_table(self, name: str) -> pd.DataFrame:
        path = self.path / f"{name}.parquet"
        if not path.exists():
            raise FileNotFoundError(f"{self.path} has no table '{name}' ({path.name})")
        return pd.read_parquet(path)

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    def save_checkpoint(self, state: dict) -> None:
        import torch

        with atomic_path(self.checkpoint_path) as tmp:
            torch.save(state, tmp)

    def load_checkpoint(self) -> dict | None:
        import torch

        if not self.checkpoint_path.exists():
            return None
        return torch.load(self.checkpoint_path, weights_only=False)
