"""Report sections of an experiment directory (one with ``summary.json``): its
configuration and findings, the memorization overview, pruning curves, label issues,
and every run directory the experiment trained, each collapsible."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from ..plotting import memorization_figure
from ..rundir import is_run_dir
from .html import Section, esc, figure, flatten, kv_table, slug, table
from .run_sections import run_sections
from .sift import corrupted_ids, issues_section, pruning_section, read_json, read_scores, scores_section


def is_experiment_dir(path: Path) -> bool:
    return (path / "summary.json").exists()


def experiment_kind(summary: Mapping[str, Any]) -> str:
    """``memorization``, ``pruning-curve``, ``issues`` or ``experiment``."""
    config = summary.get("config") or {}
    if summary.get("experiment") or config.get("experiment"):
        return str(summary.get("experiment") or config.get("experiment"))
    runs = summary.get("runs") or []
    if runs and all(isinstance(r, Mapping) and {"labels", "aggregator"} <= set(r) for r in runs):
        return "memorization"
    if any(k in summary for k in ("curves", "results", "pruning")):
        return "pruning-curve"
    return "experiment"


def config_section(summary: Mapping[str, Any]) -> Section | None:
    config = summary.get("config")
    if not config:
        return None
    return Section("config", "Configuration", kv_table(flatten(config), table_id="config-table"))


def findings_section(summary: Mapping[str, Any]) -> Section | None:
    findings = summary.get("findings")
    if not isinstance(findings, Mapping) or not findings:
        return None
    return Section("findings", "Findings", '<p class="note">The expected effects, checked on this '
                   "experiment's numbers.</p>" + kv_table(findings, table_id="findings-table"))


def memorization_section(summary: Mapping[str, Any]) -> Section | None:
    """Accuracy and m-coherence of every (labels, aggregator) run, and a results table."""
    runs = [r for r in summary.get("runs") or [] if {"labels", "aggregator", "train_acc_curve"} <= set(r)]
    if not runs:
        return None
    fig = memorization_figure({**summary, "runs": runs, "config": summary.get("config") or {"dataset": "?"}})
    rows = []
    for r in runs:
        c = r.get("coherence") or [float("nan")]
        rows.append([r["labels"], r.get("aggregator_spec", r["aggregator"]), r.get("train_acc"),
                     r.get("test_acc"), c[0], c[-1]])
    body = (
        '<p class="note">The same model trained on real and on random labels with each aggregator. '
        "Plain SGD fits random labels; robust aggregators suppress the weak directions that "
        "memorization needs. m-coherence is measured on a fixed probe batch at the start of each epoch.</p>"
        + f'<div class="plots">{figure(fig, "memorization", "accuracy and m-coherence of every run", dpi=80)}</div>'
        + table(["labels", "aggregator", "train acc", "test acc", "m-coh (init)", "m-coh (end)"], rows,
                table_id="memorization-table")
    )
    return Section("memorization", "Real vs random labels", body)


def run_dirs(exp: Path, summary: Mapping[str, Any]) -> list[tuple[str, Path]]:
    """``(name, path)`` of the run directories the experiment wrote (in summary order,
    then any others under ``runs/``)."""
    found: list[tuple[str, Path]] = []
    seen: set[Path] = set()
    for r in summary.get("runs") or []:
        if isinstance(r, Mapping) and r.get("run_dir"):
            p = (exp / r["run_dir"]).resolve()
            if is_run_dir(p) and p not in seen:
                found.append((Path(r["run_dir"]).name, p))
                seen.add(p)
    if (exp / "runs").is_dir():
        for p in sorted((exp / "runs").iterdir()):
            if p.is_dir() and is_run_dir(p) and p.resolve() not in seen:
                found.append((p.name, p.resolve()))
    return found


def runs_section(exp: Path, summary: Mapping[str, Any], *, top_issues: int) -> Section | None:
    """Every run directory, each in a collapsible block with its own sections."""
    runs = run_dirs(exp, summary)
    if not runs:
        return None
    blocks = []
    for name, path in runs:
        prefix = f"run-{slug(name)}-"
        inner = "".join(s.render(level=3) for s in run_sections(path, prefix, top_issues=top_issues))
        blocks.append(f'<details id="{prefix}details" data-run="{esc(name)}"><summary>{esc(name)}</summary>{inner}</details>')
    return Section("runs", "Runs", f'<p class="note">{len(runs)} run directories; open one for its '
                   "configuration, curves and per-layer coherence.</p>" + "".join(blocks))


def experiment_sections(exp: Path, *, top_issues: int = 12) -> tuple[str, list[Section]]:
    """``(kind, sections)`` of the experiment directory ``exp``."""
    summary = read_json(exp / "summary.json") or {}
    kind = experiment_kind(summary)
    config = summary.get("config") or {}
    issues = pd.read_csv(exp / "issues.csv") if (exp / "issues.csv").exists() else None
    seed = int(config.get("seed", 0) or 0)
    scores = read_scores(exp)
    sections = [
        config_section(summary),
        findings_section(summary),
        memorization_section(summary),
        pruning_section(summary),
        scores_section(scores, corrupted=corrupted_ids(config, seed, scores)),
        issues_section(issues, dataset=config.get("dataset"), seed=seed, top=top_issues,
                       corrupted_ids=corrupted_ids(config, seed))
        if issues is not None else None,
        runs_section(exp, summary, top_issues=top_issues),
    ]
    return kind, [s for s in sections if s is not None]
