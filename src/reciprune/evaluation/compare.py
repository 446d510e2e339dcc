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
from reciprune.evaluation.harness import EVAL_RESULTS_NAME, fixed_width_table, metric_items
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
    if manifest is not None and manifest.get("run_type") == "run":
        manifest, weights_dir = _final_stage_view(where, manifest)
    else:
        weights_dir = where
    return {
        "name": where.name,
        "path": str(where),
        "manifest": manifest,
        "eval": evaluation,
        "weight_bytes": _weight_bytes(weights_dir),
    }


def _weight_bytes(folder: Path) -> int | None:
    weights = [f for f in folder.iterdir() if f.is_file() and f.suffix in _WEIGHT_SUFFIXES]
    return sum(f.stat().st_size for f in weights) if weights else None


def _final_stage_view(run_dir: Path, manifest: dict[str, Any]) -> tuple[dict[str, Any], Path]:
    """A `reciprune run` folder as its final model: the run's own record (source, recipe,
    stages), with the metrics and checkpoint of the last stage's manifest, whose folder holds
    the weights. The run-level metrics are nested by stage, so they cannot fill the rows."""
    final = run_dir / str(manifest.get("final") or (manifest.get("stages") or [""])[-1])
    if not (final / MANIFEST_NAME).is_file():
        raise ReciPruneError(
            f"{run_dir} is a `reciprune run` folder but its final stage {final.name!r} has no "
            f"{MANIFEST_NAME}: the run did not finish. Rerun it with --resume."
        )
    stage = _read_json(final / MANIFEST_NAME)
    view = {**manifest, "metrics": stage.get("metrics") or {}, "checkpoint": stage.get("checkpoint")}
    return view, final


#: The metrics `reciprune run` prints per stage and in its summary (the manifests hold more).
SUMMARY_METRICS = ("global_sparsity", "ppl_dense", "ppl_compressed", "ppl_before", "ppl_after",
                   "train_loss_last", "eval_loss")  # fmt: skip


def run_summary(manifest: dict[str, Any]) -> str:
    """One row per stage of a `reciprune run` manifest: its kind, sparsity, perplexity and
    loss metrics and time."""
    records = manifest.get("stage_records") or {}
    timings = manifest.get("timings") or {}
    keys = [k for k in SUMMARY_METRICS if any(k in (r.get("metrics") or {}) for r in records.values())]
    header = ["stage", "run type", *keys, "seconds"]
    body = [
        [name, str(record.get("run_type")),
         *[_summary_cell(k, (record.get("metrics") or {}).get(k)) for k in keys],
         _format(timings.get(name))]
        for name, record in records.items()
    ]  # fmt: skip
    return fixed_width_table([header, *body])


def _summary_cell(key: str, value: Any) -> str:
    return f"{value:.2%}" if key == "global_sparsity" and isinstance(value, float) else _format(value)


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
    metrics = [m.get("metrics") or {} for m in manifests]
    results = [(e["eval"] or {}).get("results") or {} for e in entries]

    def row(label: str, values: list[Any]) -> tuple[str, list[str]]:
        return label, [_format(v) for v in values]  # formatted cells (str) pass unchanged

    rows = [
        row("model source", [(m.get("model") or {}).get("spec") for m in manifests]),
        row("run type", [m.get("run_type") for m in manifests]),
        row("stages", [m.get("stages") for m in manifests]),
        row("recipe sha256", [(m.get("recipe_sha256") or "")[:12] or None for m in manifests]),
        row("seed", [m.get("seed") for m in manifests]),
        row("created (UTC)", [m.get("created_utc") for m in manifests]),
    ]
    sparsity = [m.get("global_sparsity") for m in metrics]
    rows.append(row("sparsity", [f"{s:.2%}" if isinstance(s, float) else s for s in sparsity]))
    numeric = dict.fromkeys(k for m in metrics for k, v in m.items() if k != "global_sparsity"
                            and isinstance(v, (int, float)) and not isinstance(v, bool))  # fmt: skip
    rows += [row(key, [m.get(key) for m in metrics]) for key in numeric]
    formats = [(m.get("checkpoint") or {}).get("format") for m in manifests]
    if any(formats):
        rows.append(row("checkpoint format", formats))
    rows.append(row("weight files", [_megabytes(e["weight_bytes"]) for e in entries]))

    task_metrics = dict.fromkeys((task, metric) for r in results for task, record in r.items()
                                 for metric, _, _ in metric_items(record))  # fmt: skip
    for task, metric in task_metrics:
        values = []
        for record in (r.get(task) or {} for r in results):
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
    return fixed_width_table([header, *body])
