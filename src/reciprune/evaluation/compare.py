"""Side-by-side comparison of saved models: their manifests and their evaluation results.

Each argument is a model folder written by reciprune (`reciprune_manifest.json`, and
`eval_results.json` when `reciprune eval --save-results` ran on it) or a results JSON file
written by `reciprune eval --output`. Rows: where the model came from, the run, the recipe hash,
sparsity, every perplexity and loss metric of the manifest, the size of the weight files, then
one row per evaluated task metric. A missing value is "-".
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reciprune.errors import ReciPruneError
from reciprune.evaluation.harness import EVAL_RESULTS_NAME, metric_items
from reciprune.evaluation.report import MANIFEST_NAME

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ReciPruneError(f"cannot read {path}: {exc}. Is it a JSON file?") from exc
    if not isinstance(data, dict):
        raise ReciPruneError(f"{path} does not hold a JSON object.")
    return data


def collect(path: str | Path) -> dict[str, Any]:
    """{"name", "path", "manifest", "eval", "weight_bytes"} of a model folder or results file."""
    where = Path(path)
    if where.is_file():
        data = _read_json(where)
        if not isinstance(data.get("results"), dict):
            raise ReciPruneError(
                f"{where} is not an evaluation results file (no 'results' mapping). Pass a model "
                "folder, or a file written by `reciprune eval --output`."
            )
        return {"name": where.stem, "path": str(where), "manifest": None, "eval": data,
                "weight_bytes": None}  # fmt: skip
    if not where.is_dir():
        raise ReciPruneError(f"{where} does not exist. Pass model folders written by reciprune.")
    manifest = _read_json(where / MANIFEST_NAME) if (where / MANIFEST_NAME).is_file() else None
    results = where / EVAL_RESULTS_NAME
    evaluation = _read_json(results) if results.is_file() else None
    if manifest is None and evaluation is None:
        raise ReciPruneError(
            f"{where} has neither {MANIFEST_NAME} nor {EVAL_RESULTS_NAME}: nothing to compare. "
            "Pass folders written by reciprune oneshot/finetune/run, or evaluate the folder "
            "first with `reciprune eval --model DIR --tasks ... --save-results`."
        )
    weights = [f for f in where.iterdir() if f.is_file() and f.suffix in _WEIGHT_SUFFIXES]
    return {
        "name": where.name,
        "path": str(where),
        "manifest": manifest,
        "eval": evaluation,
        "weight_bytes": sum(f.stat().st_size for f in weights) if weights else None,
    }


def _format(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def _megabytes(size: int | None) -> str:
    return "-" if size is None else f"{size / 1e6:.1f} MB"


def comparison_rows(entries: Sequence[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """(row label, one cell per entry) for the comparison table."""
    manifests = [e["manifest"] or {} for e in entries]

    def row(label: str, values: list[Any]) -> tuple[str, list[str]]:
        return label, [v if isinstance(v, str) and v.endswith(" MB") else _format(v) for v in values]

    rows = [
        row("model source", [(m.get("model") or {}).get("spec") for m in manifests]),
        row("run type", [m.get("run_type") for m in manifests]),
        row("stages", [m.get("stages") for m in manifests]),
        row("recipe sha256", [(m.get("recipe_sha256") or "")[:12] or None for m in manifests]),
        row("seed", [m.get("seed") for m in manifests]),
        row("created (UTC)", [m.get("created_utc") for m in manifests]),
    ]
    sparsity = [(m.get("metrics") or {}).get("global_sparsity") for m in manifests]
    rows.append(row("sparsity", [f"{s:.2%}" if isinstance(s, float) else s for s in sparsity]))
    metric_names: list[str] = []
    for manifest in manifests:
        for key, value in (manifest.get("metrics") or {}).items():
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if key != "global_sparsity" and numeric and key not in metric_names:
                metric_names.append(key)
    for key in metric_names:
        rows.append(row(key, [(m.get("metrics") or {}).get(key) for m in manifests]))
    formats = [(m.get("checkpoint") or {}).get("format") for m in manifests]
    if any(formats):
        rows.append(row("checkpoint format", formats))
    rows.append(row("weight files", [_megabytes(e["weight_bytes"]) for e in entries]))

    task_metrics: list[tuple[str, str]] = []
    for entry in entries:
        for task, record in ((entry["eval"] or {}).get("results") or {}).items():
            for metric, _, _ in metric_items(record):
                if (task, metric) not in task_metrics:
                    task_metrics.append((task, metric))
    for task, metric in task_metrics:
        values = []
        for entry in entries:
            record = ((entry["eval"] or {}).get("results") or {}).get(task) or {}
            value = record.get(metric)
            if isinstance(value, (int, float)) and record.get("num_samples") is not None:
                value = f"{value:.4f} (n={record['num_samples']})"
            values.append(value)
        rows.append(row(f"{task} {metric}", values))
    return rows


def _names(entries: Sequence[dict[str, Any]]) -> list[str]:
    names = [e["name"] for e in entries]
    # Two folders of the same name (run/a/final, run/b/final): show their paths instead.
    return [e["path"] if names.count(e["name"]) > 1 else e["name"] for e in entries]


def compare_table(paths: Sequence[str | Path], markdown: bool = False) -> str:
    """The comparison of `paths` as a fixed-width text table, or a Markdown table."""
    if not paths:
        raise ReciPruneError("compare needs at least one model folder or results file.")
    entries = [collect(p) for p in paths]
    header = ["", *_names(entries)]
    body = [[label, *cells] for label, cells in comparison_rows(entries)]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(r[c]) for r in [header, *body]) for c in range(len(header))]
    return "\n".join(
        "  ".join(f"{cell:<{w}}" if c == 0 else f"{cell:>{w}}" for c, (cell, w) in
                  enumerate(zip(row, widths, strict=True))).rstrip()
        for row in [header, *body]
    )  # fmt: skip
