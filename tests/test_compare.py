"""`reciprune compare`: manifests and eval results of several model folders side by side."""

from __future__ import annotations

import json

import pytest

from reciprune.cli import main
from reciprune.errors import ReciPruneError
from reciprune.evaluation.compare import compare_table
from reciprune.evaluation.harness import merge_into_model_dir, write_json


def _model_dir(root, name, *, sparsity, ppl, weights, results=None, run_type="oneshot"):
    folder = root / name
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * weights)
    metrics = {"ppl_dense": 18.18, "ppl_compressed": ppl}
    if sparsity is not None:
        metrics["global_sparsity"] = sparsity
    manifest = {
        "recipe_sha256": f"{name:a<64}"[:64].replace(" ", "a"),
        "model": {"spec": "embedded:smollm2-135m-instruct", "path": "/x", "fingerprint": "f"},
        "run_type": run_type,
        "stages": ["pruning_stage"],
        "seed": 42,
        "metrics": metrics,
        "created_utc": "2025-01-01T00:00:00+00:00",
    }
    (folder / "reciprune_manifest.json").write_text(json.dumps(manifest))
    if results is not None:
        merge_into_model_dir({"model": name, "results": results}, folder)
    return folder


def _cells(table: str, label: str) -> list[str]:
    line = next(row for row in table.splitlines() if row.startswith(label + "  ") or row == label)
    return line[len(label) :].split()


def test_compare_table_puts_manifests_and_eval_results_side_by_side(tmp_path):
    dense = _model_dir(tmp_path, "dense", sparsity=None, ppl=18.18, weights=3_000_000,
                       results={"piqa": {"acc": 0.6, "acc_stderr": 0.05, "acc_norm": 0.68,
                                         "num_samples": 100, "num_fewshot": 0, "seconds": 3.0}})  # fmt: skip
    sparse = _model_dir(tmp_path, "sgpt50", sparsity=0.5, ppl=34.3, weights=1_500_000,
                        results={"piqa": {"acc": 0.55, "acc_norm": 0.6, "num_samples": 100},
                                 "asdiv_nll": {"answer_nll": 2.85, "num_samples": 32}})  # fmt: skip
    table = compare_table([dense, sparse])
    header = table.splitlines()[0].split()
    assert header == ["dense", "sgpt50"]
    assert _cells(table, "sparsity") == ["-", "50.00%"]
    assert _cells(table, "ppl_compressed") == ["18.1800", "34.3000"]
    assert _cells(table, "weight files") == ["3.0", "MB", "1.5", "MB"]
    assert _cells(table, "piqa acc") == ["0.6000", "(n=100)", "0.5500", "(n=100)"]
    assert _cells(table, "piqa acc_norm")[::2] == ["0.6800", "0.6000"]
    assert _cells(table, "asdiv_nll answer_nll") == ["-", "2.8500", "(n=32)"]
    assert "acc_stderr" not in table and "seconds" not in table  # info, not metrics
    assert _cells(table, "recipe sha256") == ["denseaaaaaaa", "sgpt50aaaaaa"]

    markdown = compare_table([dense, sparse], markdown=True).splitlines()
    assert markdown[0] == "|  | dense | sgpt50 |" and markdown[1] == "|---|---|---|"
    assert "| sparsity | - | 50.00% |" in markdown


def test_compare_accepts_a_results_file_and_the_cli_prints_the_table(tmp_path, capsys):
    dense = _model_dir(tmp_path, "dense", sparsity=None, ppl=18.18, weights=10)
    results = write_json({"model": "x", "results": {"boolq": {"acc": 0.61, "num_samples": 200}}},
                         tmp_path / "other.json")  # fmt: skip
    assert main(["compare", str(dense), str(results)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["dense", "other"]
    assert _cells(table, "boolq acc") == ["-", "0.6100", "(n=200)"]
    assert _cells(table, "model source") == ["embedded:smollm2-135m-instruct", "-"]


def test_compare_errors_say_what_to_pass(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReciPruneError, match="nothing to compare.*--save-results"):
        compare_table([empty])
    assert main(["compare", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    not_results = tmp_path / "x.json"
    not_results.write_text("{}")
    with pytest.raises(ReciPruneError, match="not an evaluation results file"):
        compare_table([not_results])
