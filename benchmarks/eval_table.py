"""Dense, pruned, sparse-fine-tuned and quantized SmolLM2 on perplexity and task accuracy.

One table for the README: each row is a saved checkpoint of the embedded SmolLM2-135M-Instruct
(or the dense model itself), evaluated by `reciprune.evaluation.harness.evaluate_model` exactly
as `reciprune eval --tasks ... --ppl` would: held-out perplexity (16 x 512-token windows of BoolQ
test passages), zero-shot accuracy on the packaged PIQA, SIQA, OpenBookQA and BoolQ (the first
`--limit` questions of each), and the gold answer's NLL per token on the held-out ASDiv problems.

Missing checkpoints are made first, with the CLI defaults (64 x 512 calibration tokens of BoolQ
dev passages): the pruned rows by `benchmarks/smollm2_table.py`, the sparse fine-tuned row by
`reciprune finetune` of the SquareHead stage of `recipes/quickstart/sparsegpt_50_distill_finetune.yaml`
on the 50% SparseGPT row (`--finetune-steps` optimizer steps), the quantized row by
`recipes/quantization/w4a16_gptq.yaml`. Each row's evaluation is kept in OUT/<row>/eval_table.json and reused.

    python benchmarks/eval_table.py                     # every row, --limit 200
    python benchmarks/eval_table.py --rows dense sparsegpt_50 --limit 50
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from reciprune.cli import main as reciprune
from reciprune.evaluation.harness import evaluate_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2_table import manifest_of  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS = ["piqa", "siqa", "openbookqa", "boolq", "asdiv_nll"]
CHANCE = {"piqa": 0.5, "siqa": 1 / 3, "openbookqa": 0.25, "boolq": 0.5}
FINETUNE_RECIPE = REPO / "recipes/quickstart/sparsegpt_50_distill_finetune.yaml"
QUANT = REPO / "recipes/quantization"

#: row name → (table label, how to make its checkpoint from OUT and the settings)
ROWS: dict[str, str] = {
    "dense": "dense",
    "sparsegpt_50": "SparseGPT 50%",
    "wanda_50": "Wanda 50%",
    "sparsegpt_2of4": "SparseGPT 2:4",
    "sparsegpt_50_ft": "SparseGPT 50% + sparse fine-tuning (SquareHead)",
    "w4a16_g32_gptq": "W4A16 groups of 32, GPTQ (actorder)",
}


def _oneshot(recipe: Path, out: Path, *overrides: str) -> None:
    sets = [f"--set={o}" for o in overrides]
    code = reciprune(["oneshot", "--recipe", str(recipe), "--output-dir", str(out), "--overwrite",
                      "--no-progress", *sets])  # fmt: skip
    if code:
        raise SystemExit(f"oneshot {recipe} failed ({code})")


def checkpoint(row: str, out: Path, finetune_steps: int) -> Path | None:
    """The folder of `row` under `out`, made first if missing (None: the embedded dense model)."""
    if row == "dense":
        return None
    folder = out / row
    if (folder / "reciprune_manifest.json").exists():
        return folder
    if row in ("sparsegpt_50", "wanda_50", "sparsegpt_2of4"):
        manifest_of(out, row)
    elif row == "sparsegpt_50_ft":
        base = checkpoint("sparsegpt_50", out, finetune_steps)
        code = reciprune([
            "finetune", "--recipe", str(FINETUNE_RECIPE), "--stage", "sparse_finetune_stage",
            "--model", str(base), "--distill-teacher", "embedded:smollm2-135m-instruct",
            "--max-steps", str(finetune_steps), "--warmup-steps", str(max(finetune_steps // 10, 1)),
            "--output-dir", str(folder), "--overwrite", "--no-progress",
        ])  # fmt: skip
        if code:
            raise SystemExit(f"finetune failed ({code})")
    elif row == "w4a16_g32_gptq":
        _oneshot(QUANT / "w4a16_gptq.yaml", folder)
    return folder


def evaluation(row: str, out: Path, limit: int, finetune_steps: int) -> dict:
    """The row's evaluation report, computed once and kept beside its checkpoint."""
    folder = checkpoint(row, out, finetune_steps)
    cache = (folder or out / "dense") / "eval_table.json"
    if cache.exists():
        report = json.loads(cache.read_text())
        if report["settings"].get("limit") == limit:
            return report
    start = time.perf_counter()
    report = evaluate_model(folder, tasks=TASKS, limit=limit, ppl="embedded", progress=False)
    print(f"# {row}: evaluated in {time.perf_counter() - start:.0f} s", flush=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(report, indent=2))
    return report


def _metric(report: dict, task: str, key: str) -> float:
    return report["results"][task][key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out", help="Folder holding (or receiving) the runs.")
    parser.add_argument("--rows", nargs="*", choices=list(ROWS), default=list(ROWS),
                        help="Rows to evaluate (default: all).")  # fmt: skip
    parser.add_argument("--limit", type=int, default=200,
                        help="Questions per task (the first N of each packaged set).")  # fmt: skip
    parser.add_argument("--finetune-steps", type=int, default=40,
                        help="Optimizer steps of the sparse fine-tuning row.")  # fmt: skip
    args = parser.parse_args()
    out = Path(args.out)
    reports = {row: evaluation(row, out, args.limit, args.finetune_steps) for row in args.rows}

    header = ["model", "ppl ↓", "PIQA", "SIQA", "OBQA", "BoolQ", "ASDiv answer NLL ↓"]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for row, report in reports.items():
        cells = [ROWS[row], f"{_metric(report, 'perplexity', 'ppl'):.2f}"]
        cells += [f"{_metric(report, task, 'acc_norm'):.3f}" for task in CHANCE]
        cells.append(f"{_metric(report, 'asdiv_nll', 'answer_nll'):.3f}")
        print("| " + " | ".join(cells) + " |")
    chance = ", ".join(f"{task} {value:.3f}" for task, value in CHANCE.items())
    print(f"\nchance: {chance}; {args.limit} questions a task, 0-shot, acc_norm (argmax of the length-normalised log-likelihood)")


if __name__ == "__main__":
    main()
