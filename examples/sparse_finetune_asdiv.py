"""The seed tutorial "Sparse Fine-Tuning Llama2 7B on GSM8k", scaled to SmolLM2 and ASDiv.

    python examples/sparse_finetune_asdiv.py                 # about 30 minutes on 2 CPU cores
    python examples/sparse_finetune_asdiv.py --quick         # a few steps: checks it runs

Runs every stage of recipes/sparse_llama2_7b_gsm8k/smollm2_asdiv.yaml as `reciprune run` does:
dense fine-tuning on the packaged ASDiv math problems → one-shot 50% SparseGPT calibrated on them
→ sparse fine-tuning that keeps the zeros, with SquareHead distillation from the dense fine-tuned
model. Then it scores the starting model and each stage's output on the held-out ASDiv problems
(−log p(gold answer | question): a 135M model solves none by generation, so this is the metric
that moves) and prints that beside held-out Wikipedia perplexity from the manifests. Finished
stages in the output folder are reused (delete it to start over).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from reciprune.data.embedded import asdiv_problems
from reciprune.evaluation import answer_loss
from reciprune.models import load_model
from reciprune.pipelines.jobs import RunJob
from reciprune.pipelines.multistage import run_stages
from reciprune.recipe import load_recipe
from reciprune.recipe.options import (
    CalibrationOptions,
    ModelOptions,
    OutputOptions,
    PerplexityOptions,
)

RECIPE = Path(__file__).resolve().parents[1] / "recipes/sparse_llama2_7b_gsm8k/smollm2_asdiv.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="out/smollm2_asdiv", help="One folder per stage.")
    parser.add_argument("--model", default=None, help="Starting model (default: embedded SmolLM2).")
    parser.add_argument("--max-steps", type=int, default=None, help="Steps per finetune stage.")
    parser.add_argument("--heldout", type=int, default=231, help="Held-out problems scored.")
    parser.add_argument("--quick", action="store_true", help="4 steps, little data: a smoke run.")
    args = parser.parse_args()

    steps = 4 if args.quick and args.max_steps is None else args.max_steps
    overrides = []
    if steps is not None:
        overrides += [f"{s}.training.max_steps={steps}"
                      for s in ("dense_finetune_stage", "sparse_finetune_stage")]  # fmt: skip
    heldout = asdiv_problems("heldout")[: 32 if args.quick else args.heldout]
    job = RunJob(
        recipe=load_recipe(RECIPE, overrides),
        output=OutputOptions(output_dir=Path(args.output_dir), resume=True),
        model=ModelOptions(model=args.model),
        calibration=CalibrationOptions(
            dataset="asdiv", num_calibration_samples=16 if args.quick else 128, max_seq_length=256
        ),
        evaluation=PerplexityOptions(ppl_samples=4 if args.quick else 16),
    )
    folders = dict(run_stages(job))

    rows = []
    first = _manifest(next(iter(folders.values())))["metrics"]
    rows.append(("start (dense)", args.model, first.get("ppl_before")))
    for stage, folder in folders.items():
        metrics = _manifest(folder)["metrics"]
        ppl = metrics.get("ppl_after", metrics.get("ppl_compressed"))
        rows.append((stage, str(folder), ppl))
    print(f"\n| model | sparsity | held-out ppl | ASDiv answer NLL/token ({len(heldout)} held-out) |")
    print("| --- | --- | --- | --- |")
    for label, spec, ppl in rows:
        model, tokenizer, _ = load_model(spec)
        loss = answer_loss(model, tokenizer, heldout, progress=True)
        sparsity = _manifest(Path(spec))["metrics"].get("global_sparsity", 0.0) if spec else 0.0
        ppl_text = f"{ppl:.2f}" if ppl else "-"
        print(f"| {label} | {sparsity:.1%} | {ppl_text} | {loss.nll_per_token:.4f} |")


def _manifest(folder: Path) -> dict:
    return json.loads((Path(folder) / "reciprune_manifest.json").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
