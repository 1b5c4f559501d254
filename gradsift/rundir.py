"""Run directories: write and read one run's manifest, tables and checkpoint.

    run = gs.open_run("runs/t")
    run.tables                                  # ['dynamics', 'metrics', 'scores', ...]
    run.sql("select epoch, avg(loss) from dynamics group by epoch order by epoch")
    run.scores()                                # DataFrame indexed by example_id

Layout of a run directory::

    RUN/manifest.json      config, versions, seed, status
    RUN/metrics.parquet    one row per epoch (train/test accuracy and loss, recorder metrics)
    RUN/<table>.parquet    other tables written by recorders (e.g. coherence per layer)
    RUN/<table>/part-*.parquet
                           an append-only table: one Parquet file per flush (e.g. one per
                           epoch); read as one table (``read_table``, DuckDB views)
    RUN/scores.parquet     one row per training example, indexed by ``example_id``: the
                           per-example scores (see :mod:`gradsift.scores`); writers merge
                           their columns in (``write_scores``)
    RUN/checkpoint.pt      model, optimizer and aggregator state for resuming

Every file is written atomically (to a temporary file in the same directory, then
``os.replace``), so an interrupted run never leaves a half-written file and loses no row
that was already written. For queries, every table is a DuckDB view named after the table
(:meth:`RunDir.sql`), so SQL can join them; views are rebuilt on each query, so parts
written since the run was opened (a run still training) are seen.
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
from typing import Any, Callable, Iterator

import pandas as pd

from .errors import GradsiftError

__all__ = ["RunDir", "Run", "RunDirError", "open_run", "atomic_path", "write_json", "write_parquet",
           "versions", "is_run_dir"]


class RunDirError(GradsiftError, ValueError):
    """A run directory cannot be used as asked (unreadable file, differing config, in use)."""


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


def is_run_dir(path: str | Path) -> bool:
    """A run directory has a manifest or a metrics table."""
    path = Path(path)
    return (path / "manifest.json").exists() or (path / "metrics.parquet").exists()


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class RunDir:
    """One run directory, to write and to read (see the module docstring for its layout).

    Nothing is created until something is written.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # -------------------------------------------------------------- manifest
    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def read_manifest(self) -> dict:
        """The run's ``manifest.json`` (``{}`` if there is none)."""
        if not self.manifest_path.exists():
            return {}
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunDirError(f"{self.manifest_path} is not valid JSON ({e}); fix or delete it") from None
        if not isinstance(manifest, dict):
            raise RunDirError(f"{self.manifest_path} does not hold a JSON object; fix or delete it")
        return manifest

    @property
    def manifest(self) -> dict:
        """The run's ``manifest.json`` (``{}`` if there is none)."""
        return self.read_manifest()

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

    # -------------------------------------------------------------- tables
    def write_table(self, name: str, frame: pd.DataFrame) -> Path:
        """Write ``RUN/<name>.parquet`` atomically."""
        path = self.path / f"{name}.parquet"
        write_parquet(path, frame)
        return path

    def append_table(self, name: str, frame: pd.DataFrame, part: str | int) -> Path:
        """Write one part of the append-only table ``RUN/<name>/part-<part>.parquet``
        atomically. Writing the same ``part`` again replaces it, so a step that is redone
        after a resume does not duplicate rows."""
        label = f"{part:06d}" if isinstance(part, int) else str(part)
        path = self.path / name / f"part-{label}.parquet"
        write_parquet(path, frame)
        return path

    def drop_parts(self, name: str, keep: Callable[[str], bool]) -> None:
        """Delete the parts of table ``name`` whose label ``keep`` rejects (used on resume
        to forget parts written after the checkpoint)."""
        folder = self.path / name
        if folder.is_dir():
            for f in folder.glob("part-*.parquet"):
                if not keep(f.stem[len("part-"):]):
                    f.unlink()

    @property
    def tables(self) -> list[str]:
        """Names of the run's tables (each is a DuckDB view in :meth:`sql`)."""
        return self.table_names()

    def table_names(self) -> list[str]:
        """Names of the tables in the run directory (single files and part folders)."""
        if not self.path.is_dir():
            return []
        names = {p.stem for p in self.path.glob("*.parquet")}
        names |= {d.name for d in self.path.iterdir() if d.is_dir() and any(d.glob("part-*.parquet"))}
        return sorted(names)

    def table_files(self, name: str) -> list[Path]:
        """The Parquet files of table ``name`` (one for a single file, the parts of a folder)."""
        single = self.path / f"{name}.parquet"
        if single.exists():
            return [single]
        parts = sorted((self.path / name).glob("part-*.parquet")) if (self.path / name).is_dir() else []
        if not parts:
            raise FileNotFoundError(f"{self.path} has no table '{name}' ({single.name} or {name}/part-*.parquet)")
        return parts

    def has_table(self, name: str) -> bool:
        return name in self.table_names()

    def read_table(self, name: str) -> pd.DataFrame:
        """One table as a DataFrame (parts concatenated in order)."""
        files = self.table_files(name)
        if len(files) == 1:
            return pd.read_parquet(files[0])
        return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)

    table = read_table

    def sql(self, query: str) -> pd.DataFrame:
        """Run a DuckDB SQL query over the run's tables; returns a pandas DataFrame."""
        import duckdb

        con = duckdb.connect()
        try:
            for name in self.tables:
                files = [str(f) for f in self.table_files(name)]
                listed = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
                con.execute(
                    f"create view {_quote_ident(name)} as select * from "
                    f"read_parquet([{listed}], union_by_name=true)"
                )
            return con.execute(query).df()
        finally:
            con.close()

    # -------------------------------------------------------------- scores
    def write_scores(self, frame: pd.DataFrame) -> Path:
        """Merge per-example score columns into ``RUN/scores.parquet`` (atomically).

        ``frame`` has an ``example_id`` column (or index) and one row per example; its
        columns replace columns of the same name already there, other columns are kept,
        and rows are outer-joined on ``example_id``.
        """
        new = _by_example_id(frame)
        path = self.path / "scores.parquet"
        if path.exists():
            old = pd.read_parquet(path).set_index("example_id")
            old = old.drop(columns=[c for c in new.columns if c in old.columns])
            new = old.join(new, how="outer") if len(old.columns) else new.join(old, how="outer")
        merged = new.sort_index().reset_index()
        write_parquet(path, merged)
        return path

    def scores(self) -> pd.DataFrame:
        """The per-example scores (``RUN/scores.parquet``), indexed by ``example_id``."""
        return self.read_table("scores").set_index("example_id").sort_index()

    # -------------------------------------------------------------- checkpoint
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

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r}, tables={self.tables})"


# The reading view of a run directory is the same class.
Run = RunDir


def open_run(path: str | Path) -> RunDir:
    """Open an existing run directory for reading and querying (:class:`RunDir`)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no run directory at {path}")
    return RunDir(path)


def _by_example_id(frame: pd.DataFrame) -> pd.DataFrame:
    if "example_id" in frame.columns:
        frame = frame.set_index("example_id")
    elif frame.index.name != "example_id":
        raise ValueError("a scores frame needs an 'example_id' column or index")
    if not frame.index.is_unique:
        raise ValueError("a scores frame must have one row per example_id")
    frame = frame.copy()
    frame.index = frame.index.astype("int64")
    return frame
