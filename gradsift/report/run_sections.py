"""Report sections of one run directory (``gradsift train --run-dir`` or ``fit(run_dir=...)``):
configuration, accuracy/loss curves, m-coherence (whole model and per layer), per-example
scores, label issues, privacy spent. A section is left out when its data is absent."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from . import figures
from ..rundir import RunDir
from .html import Section, esc, figure, flatten, kv_table, table
from .sift import corrupted_ids, issues_section, read_scores, scores_section

# Names under which a DP run may record its privacy parameters (manifest, or its config).
PRIVACY_KEYS = ("epsilon", "target_epsilon", "delta", "sigma", "noise_multiplier", "clip_norm",
                "max_grad_norm", "sampling_rate", "sample_rate", "steps", "accountant")


def config_section(manifest: Mapping[str, Any], prefix: str = "") -> Section | None:
    """Configuration, run facts (seed, status, size) and library versions."""
    if not manifest:
        return None
    facts = {k: v for k, v in manifest.items() if k not in ("config", "versions", "privacy", "dp")}
    parts = []
    if manifest.get("config"):
        parts.append("<div><h3>Settings</h3>" + kv_table(flatten(manifest["config"]), table_id=f"{prefix}config-table") + "</div>")
    if facts:
        parts.append("<div><h3>Run</h3>" + kv_table(flatten(facts), table_id=f"{prefix}run-facts") + "</div>")
    if manifest.get("versions"):
        parts.append("<div><h3>Versions</h3>" + kv_table(manifest["versions"]) + "</div>")
    return Section(f"{prefix}config", "Configuration", f'<div class="columns">{"".join(parts)}</div>')


def training_section(metrics: pd.DataFrame | None, prefix: str = "") -> Section | None:
    """Accuracy and loss curves, and the last epoch's numbers."""
    if metrics is None or not len(metrics) or "epoch" not in metrics:
        return None
    plots = []
    for metric, title in (("acc", "accuracy"), ("loss", "loss")):
        if f"train_{metric}" in metrics or f"test_{metric}" in metrics:
            plots.append(figure(figures.metric_curves(metrics, metric, title), f"{prefix}{title}",
                                f"{title} per epoch (train set and test set)"))
    last = metrics.iloc[-1]
    summary = {k: last[k] for k in metrics.columns if k != "epoch"}
    body = (f'<div class="plots">{"".join(plots)}</div>'
            f"<h3>After epoch {int(last['epoch'])}</h3>" + kv_table({k: _py(v) for k, v in summary.items()}))
    return Section(f"{prefix}training", "Training curves", body)


def _py(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def coherence_section(metrics: pd.DataFrame | None, coh: pd.DataFrame | None, prefix: str = "") -> Section | None:
    """m-coherence of the probe batch over training, whole model and per layer."""
    whole = None
    if coh is not None and len(coh):
        whole = coh[coh["layer"] == "all"][["epoch", "m_coherence"]]
    elif metrics is not None and "m_coherence" in metrics:
        whole = metrics[["epoch", "m_coherence"]].dropna()
    if whole is None or not len(whole):
        return None
    plots = [figure(figures.coherence_curve(whole), f"{prefix}coherence",
                    "m-coherence = m·alpha of the per-example gradients of a fixed probe batch "
                    "(≈1: orthogonal, ≈m: all agree)")]
    if coh is not None and (coh["layer"] != "all").any():
        plots.append(figure(figures.coherence_layers(coh), f"{prefix}coherence-layers",
                            "m-coherence of each parameter tensor"))
    body = f'<div class="plots">{"".join(plots)}</div>'
    if coh is not None and len(coh):
        wide = coh.pivot_table(index="layer", columns="epoch", values="m_coherence", sort=False)
        body += "<h3>m-coherence by layer and epoch</h3>" + table(
            ["layer", *(f"ep {e}" for e in wide.columns)],
            ([layer, *map(float, row)] for layer, row in wide.iterrows()),
        )
    return Section(f"{prefix}coherence", "Gradient coherence", body)


def privacy_info(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Privacy parameters of a DP run from its manifest (``privacy``/``dp`` entry, top-level
    keys or config keys named in :data:`PRIVACY_KEYS`); empty for other runs."""
    for key in ("privacy", "dp"):
        if isinstance(manifest.get(key), Mapping) and manifest[key]:
            return dict(manifest[key])
    config = manifest.get("config") or {}
    found = {k: manifest[k] for k in PRIVACY_KEYS if k in manifest}
    found.update({k: config[k] for k in PRIVACY_KEYS if k in config and k not in found})
    return found if ("epsilon" in found or "sigma" in found or "noise_multiplier" in found) else {}


def privacy_headline(info: Mapping[str, Any]) -> str:
    """``ε = 3.05 spent at δ = 1e-05 (σ = 1.1, C = 1, q = 0.01, 500 steps)`` from what is known."""
    eps = info.get("epsilon")
    head = f"ε = {eps:.3g} spent" if isinstance(eps, (int, float)) else "ε not recorded"
    if info.get("delta") is not None:
        head += f" at δ = {info['delta']:g}"
    parts = []
    for label, keys in (("σ", ("noise_multiplier", "sigma")), ("C", ("max_norm", "clip_norm", "max_grad_norm")),
                        ("q", ("sample_rate", "sampling_rate"))):
        value = next((info[k] for k in keys if info.get(k) is not None), None)
        if value is not None:
            parts.append(f"{label} = {value:g}" if isinstance(value, (int, float)) else f"{label} = {value}")
    if info.get("steps") is not None:
        parts.append(f"{info['steps']} steps")
    return head + (f" ({', '.join(parts)})" if parts else "")


def privacy_section(manifest: Mapping[str, Any], metrics: pd.DataFrame | None, prefix: str = "") -> Section | None:
    """Epsilon spent, delta, noise multiplier, clip norm, sampling rate, steps; the epsilon
    curve when the metrics record it per epoch."""
    info = privacy_info(manifest)
    if not info:
        return None
    body = f'<p class="headline" id="{prefix}privacy-headline">{esc(privacy_headline(info))}</p>'
    body += ('<p class="note">Differentially private training (DP-SGD): (epsilon, delta) spent, as computed '
             "by the accountant from the noise multiplier, the sampling rate and the steps taken.</p>")
    body += kv_table(info, table_id=f"{prefix}privacy-table")
    if metrics is not None and "epsilon" in metrics and metrics["epsilon"].notna().any():
        target = info.get("target_epsilon")
        fig = figures.privacy_curve(metrics.dropna(subset=["epsilon"]),
                                    target=float(target) if target is not None else None)
        body += f'<div class="plots">{figure(fig, f"{prefix}privacy", "epsilon spent after each epoch")}</div>'
    return Section(f"{prefix}privacy", "Privacy spent", body)


def run_sections(run: Path, prefix: str = "", *, top_issues: int = 12) -> list[Section]:
    """All sections of the run directory ``run`` that have data."""
    rd = RunDir(run)
    manifest = rd.read_manifest()
    metrics = rd.read_table("metrics") if rd.has_table("metrics") else None
    coh = rd.read_table("coherence") if rd.has_table("coherence") else None
    config = manifest.get("config") or {}
    issues = None
    if (run / "issues.csv").exists():
        issues = pd.read_csv(run / "issues.csv")
    seed = int(manifest.get("seed", 0) or 0)
    scores = read_scores(run)
    corrupted = corrupted_ids(config, seed, scores)
    sections = [
        config_section(manifest, prefix),
        privacy_section(manifest, metrics, prefix),
        training_section(metrics, prefix),
        coherence_section(metrics, coh, prefix),
        scores_section(scores, prefix, corrupted=corrupted),
        issues_section(issues, dataset=config.get("dataset"), seed=seed, top=top_issues,
                       corrupted_ids=corrupted, prefix=prefix) if issues is not None else None,
    ]
    return [s for s in sections if s is not None]
