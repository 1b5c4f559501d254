"""Reopen a finished or interrupted run directory and query it.

    run = gs.open_run("runs/t")
    run.tables                                  # ['dynamics', 'metrics', 'scores', ...]
    run.sql("select epoch, avg(loss) from dynamics group by epoch order by epoch")
    run.scores()                                # DataFrame indexed by example_id

Every table of the run directory (``RUN/<name>.parquet`` and append-only
``RUN/<name>/part-*.parquet``, see :mod:`gradsift.store`) is a DuckDB view named after the
table, so SQL can join them. Views are rebuilt on each query, so parts written since the
run was opened (a run still training) are seen.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .store import RunDir


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class Run:
    """A run directory opened for reading (see :func:`open_run`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"no run directory at {self.path}")
        self._dir = RunDir.__new__(RunDir)
        self._dir.path = self.path

    @property
    def manifest(self) -> dict:
        """The run's ``manifest.json`` (``{}`` if there is none)."""
        p = self.path / "manifest.json"
        return json.loads(p.read_text()) if p.exists() else {}

    @property
    def tables(self) -> list[str]:
        """Names of the run's tables (each is a DuckDB view in :meth:`sql`)."""
        return self._dir.table_names()

    def table(self, name: str) -> pd.DataFrame:
        """One table as a DataFrame."""
        return self._dir.read_table(name)

    def sql(self, query: str) -> pd.DataFrame:
        """Run a DuckDB SQL query over the run's tables; returns a pandas DataFrame."""
        import duckdb

        con = duckdb.connect()
        try:
            for name in self.tables:
                files = [str(f) for f in self._dir.table_files(name)]
                listed = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
                con.execute(
                    f"create view {_quote_ident(name)} as select * from "
                    f"read_parquet([{listed}], union_by_name=true)"
                )
            return con.execute(query).df()
        finally:
            con.close()

    def scores(self) -> pd.DataFrame:
        """The per-example scores (``RUN/scores.parquet``), indexed by ``example_id``."""
        return self.table("scores").set_index("example_id").sort_index()

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, tables={self.tables})"


def open_run(path: str | Path) -> Run:
    """Open a run directory for reading and querying (:class:`Run`)."""
    return Run(path)
