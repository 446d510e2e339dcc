"""Dense vs pruned perplexity of the embedded SmolLM2-135M-Instruct, as a Markdown table.

Runs each quick-start recipe with the CLI defaults (64 x 512 calibration tokens of embedded BoolQ
dev passages, seed 42, perplexity on 16 x 512-token windows of held-out BoolQ test passages) into
OUT/<recipe>/, or reuses a finished run found there, and prints the table from the manifests.

    python benchmarks/smollm2_table.py [--out out] [--recipes sparsegpt_50 wanda_50 ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from reciprune.pipelines.jobs import OneshotJob, run_oneshot_job
from reciprune.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = {
    "sparsegpt_50": "SparseGPT 50% unstructured",
    "wanda_50": "Wanda 50% unstructured",
    "magnitude_50": "Magnitude 50% unstructured",
    "sparsegpt_2of4": "SparseGPT 2:4",
}


def manifest_of(out: Path, name: str) -> dict:
    folder = out / name
    path = folder / "reciprune_manifest.json"
    if not path.exists():
        recipe = load_recipe(REPO / "recipes" / "quickstart" / f"{name}.yaml")
        run_oneshot_job(OneshotJob(recipe=recipe, output_dir=folder, overwrite=True))
    return json.loads(path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out", help="Folder holding (or receiving) the runs.")
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    args = parser.parse_args()
    rows = []
    for name in args.recipes:
        manifest = manifest_of(Path(args.out), name)
        rows.append((name, manifest))
    dense = rows[0][1]["metrics"]["ppl_dense"]
    print("| model | sparsity | perplexity | oneshot seconds |")
    print("| --- | --- | --- | --- |")
    print(f"| dense | 0% | {dense:.2f} | – |")
    for name, manifest in rows:
        metrics, timings = manifest["metrics"], manifest["timings"]
        seconds = sum(v for k, v in timings.items() if k.endswith(".total"))
        print(f"| {RECIPES[name]} | {metrics['global_sparsity']:.1%} | "
              f"{metrics['ppl_compressed']:.2f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
