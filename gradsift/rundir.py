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
    RUN/checkpoints/       a long job's pieces while it runs (the K-model trainings of
                           ``gradsift scores``, ``issues``, ``pruning-curve``, per epoch
                           or per model; :class:`JobCheckpoints`), removed when it finishes

Every file is written atomically (to a temporary file in the same directory, then
``os.replace``), so an interrupted run never leaves a half-written file and loses no row
that was already written.

A run directory is one run. :meth:`RunDir.start` begins writing one: it takes the
directory's lock (``RUN/.lock``, holder PID and host; one writer at a time), removes
``.tmp`` files a killed writer left, and refuses to mix runs: a new run goes only into an
empty directory (or one cleared with ``overwrite=True``); ``resume=True`` needs the
checkpoint and the same config (only keys such as ``epochs`` may differ), and
``merge=True`` (adding score columns) needs the same config. Checkpoints are loaded with
``torch.load(weights_only=True)`` and an allow-list of types, never arbitrary pickles.

For queries, every table is a DuckDB view named after the table
(:meth:`RunDir.sql`), so SQL can join them; views are rebuilt on each query, so parts
written since the run was opened (a run still training) are seen.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import pandas as pd

from .errors import GradsiftError

__all__ = ["RunDir", "Run", "RunDirError", "RunInUseError", "open_run", "atomic_path", "write_json",
           "write_parquet", "versions", "is_run_dir", "fingerprint", "config_differences",
           "allow_checkpoint_types", "RESUMABLE", "JobCheckpoints", "checkpointing", "active_checkpoints"]

# Config keys that may differ when a run is resumed: they cannot change the results so far
# (world_size: the exact distributed mode gives the one-process update on the global batch).
RESUMABLE = frozenset({"epochs", "world_size"})
LOCK_NAME = ".lock"
JOB_DIR = "checkpoints"  # RUN/checkpoints/: the pieces of a long job (see JobCheckpoints)


# Types of the manifest's fields that gradsift reads back.
_MANIFEST_TYPES = {"config": (dict, "an object"), "versions": (dict, "an object"), "seed": (int, "an integer"),
                   "n_train": (int, "an integer"), "status": (str, "a string"), "created": (str, "a string")}


class RunDirError(GradsiftError, ValueError):
    """A run directory cannot be used as asked (unreadable file, differing config, ...)."""


class RunInUseError(RunDirError):
    """Another process is writing the run directory."""


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

    from .version import __version__

    return {
        "gradsift": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
        "python": sys.version.split()[0], "platform": platform.platform(),
    }


def is_run_dir(path: str | Path) -> bool:
    """A run directory has a manifest or a metrics table."""
    path = Path(path)
    return (path / "manifest.json").exists() or (path / "metrics.parquet").exists()


def fingerprint(*arrays: Any) -> str:
    """A short SHA-256 of arrays (dtype, shape and bytes), for manifests: two runs on the
    same data have the same fingerprint. Objects with ``x``/``y`` (and ``example_ids``)
    attributes, such as :class:`gradsift.data.Dataset`, stand for those arrays; ``None``
    is skipped."""
    import numpy as np

    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            continue
        if hasattr(a, "x") and hasattr(a, "y"):
            parts = [a.x, a.y, getattr(a, "example_ids", None)]
        else:
            parts = [a]
        for part in parts:
            if part is None:
                continue
            if hasattr(part, "detach"):
                part = part.detach().cpu().numpy()
            arr = np.ascontiguousarray(np.asarray(part))
            h.update(f"{arr.dtype.str}{arr.shape}".encode())
            h.update(arr.tobytes() if arr.dtype != object else repr(arr.tolist()).encode())
    return h.hexdigest()[:16]


def _plain_json(value: Any) -> Any:
    """``value`` as JSON would read it back (tuples become lists, numpy numbers plain)."""
    return json.loads(json.dumps(value, default=_json_default))


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any], *, may_differ: Iterable[str] = ()) -> list[str]:
    """``["aggregator: 'mean' -> 'm3'", ...]`` for every key whose value differs between two
    configs (a missing key reads as ``None``), except the keys in ``may_differ``."""
    old, new = _plain_json(dict(old)), _plain_json(dict(new))
    skip = set(may_differ)
    out = []
    for key in [*old, *(k for k in new if k not in old)]:
        if key in skip or old.get(key) == new.get(key):
            continue
        out.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return out


# Types a checkpoint may hold besides tensors and plain containers (numpy arrays of recorders).
_CHECKPOINT_TYPES: list[Any] = []


def allow_checkpoint_types(*types: Any) -> None:
    """Allow checkpoints to hold instances of ``types`` (e.g. the state class of your own
    aggregator). Checkpoints are loaded with ``torch.load(weights_only=True)``; only allow
    types that cannot run code when unpickled."""
    _CHECKPOINT_TYPES.extend(t for t in types if t not in _CHECKPOINT_TYPES)


def _checkpoint_types() -> list[Any]:
    if not _CHECKPOINT_TYPES:
        import numpy as np

        try:
            from numpy._core.multiarray import _reconstruct, scalar
        except ImportError:  # numpy < 2
            from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[no-redef]
        dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
        allow_checkpoint_types(_reconstruct, scalar, np.ndarray, np.dtype, *dtypes)
    return list(_CHECKPOINT_TYPES)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class RunDir:
    """One run directory, to write and to read (see the module docstring for its layout).

    Nothing is created until something is written.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock_fd: int | None = None

    # -------------------------------------------------------------- one writer
    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_NAME

    @property
    def locked(self) -> bool:
        """Whether this object holds the directory's lock."""
        return self._lock_fd is not None

    def lock(self) -> None:
        """Take the directory's advisory lock (``RUN/.lock`` records the holder's PID and
        host). Raises :class:`RunInUseError` if another writer holds it; a lock left by a
        process that died is taken over."""
        import fcntl

        if self._lock_fd is not None:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise RunInUseError(self._in_use_message()) from None
            try:  # the file may have been removed by the holder that just released it
                same = os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = self._holder(fd)
        if previous and previous.get("pid") not in (None, os.getpid()):
            warnings.warn(f"{self.path}: took over the lock of process {previous.get('pid')} on "
                          f"{previous.get('host')}, which is no longer running", stacklevel=2)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._lock_fd = fd

    @staticmethod
    def _holder(fd: int) -> dict:
        try:
            text = os.pread(fd, 4096, 0).decode()
            holder = json.loads(text) if text.strip() else {}
        except (ValueError, UnicodeDecodeError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _in_use_message(self) -> str:
        try:
            holder = json.loads(self.lock_path.read_text())
        except (OSError, ValueError):
            holder = {}
        who = (f"process {holder.get('pid')} on {holder.get('host')} (since {holder.get('since')})"
               if isinstance(holder, dict) and holder.get("pid") else "another process")
        if isinstance(holder, dict) and holder.get("pid") == os.getpid():
            who = "this process (an earlier run in it that has not finished)"
        return (f"run directory {self.path} is in use by {who}; wait for it to finish, "
                "or write to another directory (--out)")

    def unlock(self) -> None:
        """Release the lock taken by :meth:`lock` (a no-op if not held)."""
        import fcntl

        fd, self._lock_fd = self._lock_fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __del__(self) -> None:
        if getattr(self, "_lock_fd", None) is not None:
            try:
                os.close(self._lock_fd)
            except OSError:
                pass

    def remove_stale_tmp(self) -> list[Path]:
        """Delete the ``.tmp`` files an interrupted writer left (call with the lock held)."""
        if not self.path.is_dir():
            return []
        stale = [p for p in self.path.rglob(".*.tmp") if p.is_file()]
        for p in stale:
            p.unlink(missing_ok=True)
        return stale

    def contents(self) -> list[str]:
        """Names in the directory other than the lock and stale ``.tmp`` files."""
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir()
                      if p.name != LOCK_NAME and not (p.name.startswith(".") and p.name.endswith(".tmp")))

    def clear(self) -> None:
        """Delete everything in a run directory but its lock. Refuses a directory that is
        not a gradsift run directory (no manifest.json or metrics.parquet)."""
        if not self.contents():
            return
        if not is_run_dir(self.path):
            raise RunDirError(f"{self.path} is not empty and is not a gradsift run directory (no manifest.json "
                              "or metrics.parquet); refusing to clear it. Choose a new or empty --run-dir")
        for p in self.path.iterdir():
            if p.name == LOCK_NAME:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

    def start(self, config: Mapping[str, Any], *, resume: bool = False, overwrite: bool = False,
              merge: bool = False, may_differ: Iterable[str] = RESUMABLE, job: bool = False,
              **manifest: Any) -> dict | None:
        """Begin writing a run with ``config`` (what determines its results); returns the
        checkpoint to continue from when ``resume`` (else ``None``).

        Takes the lock (:meth:`lock`; release it with :meth:`unlock`), removes stale
        ``.tmp`` files, then:

        * ``resume``: the directory must hold a run with a checkpoint and the same config
          (keys in ``may_differ`` excepted); a smaller ``epochs`` than the checkpoint's is
          refused, so history is never rewritten;
        * ``merge``: a directory holding a run is kept if its config matches (to add
          columns, e.g. scores), else refused;
        * otherwise the directory must be empty, or ``overwrite`` clears it first.

        ``job=True`` is for a job that checkpoints its pieces in ``RUN/checkpoints/``
        (:class:`JobCheckpoints`) instead of ``checkpoint.pt``: ``resume`` then needs a run
        started with the same config (its pieces, if any, are continued), and a directory
        holding an interrupted job's pieces is refused without ``resume`` or ``overwrite``.

        Every refusal is a :class:`RunDirError` naming the fix. The manifest is written
        with ``config`` (``status="running"`` and ``manifest`` keys).
        """
        if resume and overwrite:
            raise RunDirError("--resume continues the run in the directory, --overwrite deletes it: choose one")
        self.lock()
        try:
            self.remove_stale_tmp()
            checkpoint = self._check(dict(config), resume=resume, overwrite=overwrite, merge=merge,
                                     may_differ=set(may_differ), job=job)
            self.write_manifest(dict(config), status="running", **manifest)
        except BaseException:
            self.unlock()
            raise
        return checkpoint

    def _refuse_differences(self, old: dict, config: dict, may_differ: set) -> None:
        """``--resume``: refuse ``config`` where it differs from the manifest's ``old`` one
        (beyond ``may_differ``), listing the differences."""
        diffs = config_differences(old.get("config") or {}, config, may_differ=may_differ)
        if diffs:
            raise RunDirError(f"--resume: the run in {self.path} was made with a different config: "
                              + "; ".join(diffs) + ". Resume with the same options, or start a new run "
                              "(another directory (--out), or --overwrite)")

    def _check(self, config: dict, *, resume: bool, overwrite: bool, merge: bool, may_differ: set,
               job: bool = False) -> dict | None:
        old = self.read_manifest()
        if job and resume:
            if not old:
                held = ", ".join(self.contents()) or "nothing"
                raise RunDirError(f"--resume: {self.path} holds no run to continue (it holds {held}); "
                                  "drop --resume to start a new run")
            self._refuse_differences(old, config, may_differ)
            return None
        if job and not overwrite and JobCheckpoints(self).exist():
            raise RunDirError(f"{self.path} holds an interrupted run ({JOB_DIR}/ has its finished pieces); "
                              "pass --resume to continue it, --overwrite to start again, or choose another directory")
        if resume:
            if not self.checkpoint_path.exists():
                held = ", ".join(self.contents()) or "nothing"
                raise RunDirError(f"--resume: {self.path} has no checkpoint.pt to continue from (it holds {held}); "
                                  "drop --resume to start a new run (with --overwrite to replace what is there)")
            self._refuse_differences(old, config, may_differ)
            checkpoint = self.load_checkpoint()
            done, target = checkpoint.get("epoch"), config.get("epochs")
            if isinstance(done, int) and isinstance(target, int) and target < done:
                raise RunDirError(f"--resume: the run in {self.path} has already trained {done} epochs; "
                                  f"--epochs {target} would rewrite its history. Pass --epochs {done} or more")
            return checkpoint
        if merge and old:
            diffs = config_differences(old.get("config") or {}, config, may_differ=may_differ)
            if diffs:
                raise RunDirError(f"{self.path} holds a run with a different config: " + "; ".join(diffs)
                                  + ". Write to another directory (--out), or pass --overwrite to replace it")
            return None
        held = self.contents()
        if held:
            if not overwrite:
                raise RunDirError(f"{self.path} already holds a run ({', '.join(held[:5])}"
                                  f"{', ...' if len(held) > 5 else ''}); pass --resume to continue it, "
                                  "--overwrite to replace it, or choose another directory (--out)")
            self.clear()
        return None

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
        for key, (kind, what) in _MANIFEST_TYPES.items():
            value = manifest.get(key)
            if value is not None and not (isinstance(value, kind) and not isinstance(value, bool)):
                raise RunDirError(f"{self.manifest_path}: '{key}' should be {what}, got {json.dumps(value)}; "
                                  "fix or delete it")
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
        frames = [_read_parquet(f) for f in self.table_files(name)]
        return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)

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
        except duckdb.IOException as e:
            raise RunDirError(f"a table of {self.path} is not readable Parquet ({e})") from None
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
            old = _read_parquet(path).set_index("example_id")
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

    def save_checkpoint(self, state: dict, path: str | Path | None = None) -> None:
        """Write ``state`` to ``checkpoint.pt`` (or ``path``) atomically."""
        import torch

        with atomic_path(self.checkpoint_path if path is None else path) as tmp:
            torch.save(state, tmp)

    def load_checkpoint(self, path: str | Path | None = None) -> dict | None:
        """The checkpoint (``checkpoint.pt``, or ``path``; ``None`` if there is none), loaded
        with ``torch.load(weights_only=True)``: tensors, plain containers, numbers, strings and
        the types of :func:`allow_checkpoint_types` only, so a planted pickle cannot run
        code. A file that is not such a checkpoint raises :class:`RunDirError`."""
        import pickle

        import torch

        path = self.checkpoint_path if path is None else Path(path)
        if not path.exists():
            return None
        if path.stat().st_size == 0:
            raise RunDirError(f"{path} is empty (a crash while it was first written?); delete it, or start "
                              "again with --overwrite")
        try:
            with torch.serialization.safe_globals(_checkpoint_types()):
                state = torch.load(path, weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            blocked = next((ln for ln in lines if "GLOBAL" in ln), None)
            if blocked is not None:
                raise RunDirError(f"{path} holds objects that gradsift does not unpickle ({blocked}); refusing "
                                  "to load it, since unpickling can run code. If you wrote it and trust it, allow "
                                  "its types with gradsift.rundir.allow_checkpoint_types(...)") from None
            detail = next((ln for ln in lines if "Unsupported" in ln or "error" in ln.lower()), lines[-1] if lines else "")
            raise RunDirError(f"{path} is not a readable checkpoint ({detail}); delete it, or start again "
                              "with --overwrite") from None
        except (RuntimeError, EOFError, ValueError, OSError, pickle.PickleError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RunDirError(f"{path} is not a readable checkpoint ({first}); delete it, or start again "
                              "with --overwrite") from None
        if not isinstance(state, dict):
            raise RunDirError(f"{path} does not hold a gradsift checkpoint (a dict of states); delete it, or "
                              "start again with --overwrite")
        return state

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r}, tables={self.tables})"


# The reading view of a run directory is the same class.
Run = RunDir


class JobCheckpoints:
    """The checkpoints of a long job's pieces in ``RUN/checkpoints/<key>.pt``.

    A long command (``gradsift scores``, ``issues``, ``pruning-curve``) is a fixed sequence
    of pieces (K-model trainings, one recorder run), each checkpointing per epoch or per
    model under a key that counts the pieces of its kind in order (``members-000``,
    ``members-001``, ``fit-000``, ...). The same command with the same config (checked by
    :meth:`RunDir.start`) asks for the same keys in the same order, so a resumed job finds
    each piece's last checkpoint, and loses at most the work in flight. Files are written
    atomically and read with ``weights_only`` (:meth:`RunDir.load_checkpoint`).

    Use :func:`checkpointing` to make the trainers inside a block checkpoint here.
    """

    def __init__(self, run: RunDir):
        self.run = run
        self.path = run.path / JOB_DIR
        self._counts: dict[str, int] = {}

    def next_key(self, kind: str) -> str:
        """The key of the next piece of ``kind`` (``kind-000``, ``kind-001``, ...)."""
        n = self._counts.get(kind, 0)
        self._counts[kind] = n + 1
        return f"{kind}-{n:03d}"

    def file(self, key: str) -> Path:
        return self.path / f"{key}.pt"

    def save(self, key: str, state: dict) -> None:
        """Write piece ``key``'s checkpoint atomically."""
        self.run.save_checkpoint(state, self.file(key))

    def load(self, key: str) -> dict | None:
        """Piece ``key``'s checkpoint (``None`` if it has none)."""
        return self.run.load_checkpoint(self.file(key))

    def remove(self, key: str) -> None:
        self.file(key).unlink(missing_ok=True)

    def subdir(self, key: str) -> Path:
        """A directory for a piece that keeps a run directory of its own (a :func:`gradsift.fit`)."""
        return self.path / key

    def exist(self) -> bool:
        """Whether any piece has a checkpoint."""
        return self.path.is_dir() and any(self.path.iterdir())

    def clear(self) -> None:
        """Delete every piece's checkpoint (when the job has finished)."""
        if self.path.is_dir():
            shutil.rmtree(self.path)


_ACTIVE: ContextVar[JobCheckpoints | None] = ContextVar("gradsift_job_checkpoints", default=None)


@contextmanager
def checkpointing(run: RunDir | JobCheckpoints | None) -> Iterator[JobCheckpoints | None]:
    """Within the block, the K-model trainer (:func:`gradsift.ensemble.train_members`) and
    :func:`gradsift.scores.compute_scores`' recorder run checkpoint their pieces in
    ``run``'s ``checkpoints/`` folder and continue from what is there (``None``: no
    checkpoints)::

        run = RunDir("runs/mem")
        run.start(config, resume=resume, job=True)
        with checkpointing(run):
            table = gs.memorization_scores(data, model_fn, n_models=64)   # resumable
        JobCheckpoints(run).clear()
    """
    jobs = JobCheckpoints(run) if isinstance(run, RunDir) else run
    token = _ACTIVE.set(jobs)
    try:
        yield jobs
    finally:
        _ACTIVE.reset(token)


def active_checkpoints() -> JobCheckpoints | None:
    """The :class:`JobCheckpoints` of the enclosing :func:`checkpointing` block, if any."""
    return _ACTIVE.get()


def open_run(path: str | Path) -> RunDir:
    """Open an existing run directory for reading and querying (:class:`RunDir`)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no run directory at {path}")
    return RunDir(path)


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunDirError(f"{path} is not a readable Parquet table ({first}); delete it or rewrite the run") from None


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
