"""Per-layer report of a oneshot output: sparsity, N:M conformance, reconstruction error."""

from __future__ import annotations

import json
import re
from pathlib import Path
from statistics import fmean
from typing import Any

from reciprune.errors import ReciPruneError

MANIFEST_NAME = "reciprune_manifest.json"
PLOT_NAME = "layer_report.png"


def read_manifest(output_dir: Path) -> dict[str, Any]:
    """The manifest of an output folder, or a clear error when there is none."""
    path = Path(output_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ReciPruneError(
            f"{output_dir} has no {MANIFEST_NAME}; pass a folder written by `reciprune oneshot`"
        )
    return json.loads(path.read_text())


def _layer_index(name: str) -> int:
    found = re.search(r"\.(\d+)\.", name)
    return int(found.group(1)) if found else -1


def report_table(manifest: dict[str, Any]) -> str:
    """A fixed-width table: one row per compressed module."""
    layers = manifest.get("layers", {})
    rows = sorted(layers.items(), key=lambda item: (_layer_index(item[0]), item[0]))
    width = max((len(name) for name, _ in rows), default=10)
    lines = [f"{'module':<{width}}  {'sparsity':>8}  {'N:M':>5}  {'rel. error':>10}"]
    for name, record in rows:
        error = record.get("reconstruction_error")
        error_text = f"{error:10.4f}" if error is not None else f"{'-':>10}"
        lines.append(
            f"{name:<{width}}  {record.get('sparsity', 0.0):8.2%}  {record.get('nm') or '-':>5}  "
            f"{error_text}"
        )
    metrics = manifest.get("metrics", {})
    if metrics:
        lines.append("")
        lines += [f"{key}: {value:.4f}" for key, value in metrics.items() if isinstance(value, float)]
    return "\n".join(lines)


def plot_report(manifest: dict[str, Any], path: Path) -> Path:
    """PNG of mean sparsity and mean reconstruction error per decoder layer."""
    from matplotlib.figure import Figure

    per_layer: dict[int, list[dict[str, Any]]] = {}
    for name, record in manifest.get("layers", {}).items():
        per_layer.setdefault(_layer_index(name), []).append(record)
    indices = sorted(i for i in per_layer if i >= 0)
    sparsity = [fmean(r.get("sparsity", 0) for r in per_layer[i]) for i in indices]
    errors = [fmean(r.get("reconstruction_error") or 0 for r in per_layer[i]) for i in indices]
    figure = Figure(figsize=(8, 5))  # not pyplot's: drawn off-screen, nothing to close
    top, bottom = figure.subplots(2, 1, sharex=True)
    top.bar(indices, sparsity, color="tab:blue")
    top.set_ylabel("sparsity")
    top.set_ylim(0, 1)
    bottom.plot(indices, errors, marker="o", color="tab:red")
    bottom.set_ylabel("rel. reconstruction error")
    bottom.set_xlabel("decoder layer")
    figure.suptitle("per-layer sparsity and ‖WX − W'X‖² / ‖WX‖² (mean over modules)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def loss_curve_png(history: list[dict[str, Any]], evals: list[dict[str, Any]]) -> bytes:
    """PNG of the training loss per optimizer step (and its parts, e.g. the distillation loss)
    with the held-out loss at the steps it was measured."""
    import io

    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4))
    axis = figure.subplots()
    steps = [h["step"] for h in history]
    parts = [k for k in (history[0] if history else {}) if k == "loss" or k.endswith("_loss")]
    for key in parts:
        axis.plot(steps, [h[key] for h in history], label=key, linewidth=1)
    points = [e for e in evals if e.get("eval_loss") is not None]
    if points:
        axis.plot(
            [e["step"] for e in points], [e["eval_loss"] for e in points], "o-", label="eval_loss"
        )
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
