"""Dense vs pruned perplexity of the embedded SmolLM2-135M-Instruct, as a Markdown table.

Each row is a oneshot run with the CLI defaults: 64 x 512 calibration tokens of embedded BoolQ dev
passages (seed 42), perplexity on 16 x 512-token windows of BoolQ test passages not seen in
calibration. A run goes to OUT/<row>/ (a complete checkpoint with its manifest); a finished run
found there is reused, so the table can be built up over several sessions.

    python benchmarks/smollm2_table.py                      # the core rows (50%, 2:4)
    python benchmarks/smollm2_table.py --grid sweep         # + 60/70%, DSnoT, OWL
    python benchmarks/smollm2_table.py --rows wanda_70 wanda_dsnot_70
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from reciprune.pipelines.jobs import OneshotJob
from reciprune.pipelines.oneshot import run_oneshot_job
from reciprune.recipe import load_recipe
from reciprune.recipe.options import OutputOptions

SGPT, WANDA, MAG, DSNOT = "SparseGPTModifier", "WandaModifier", "MagnitudePruningModifier", "DSnoTModifier"
OWL = {"sparsity_profile": "owl", "owl_m": 5, "owl_lmbda": 0.08}


def _rows() -> dict[str, tuple[str, list[tuple[str, dict]]]]:
    rows: dict[str, tuple[str, list[tuple[str, dict]]]] = {}
    for percent in (50, 60, 70):
        s = percent / 100
        rows[f"magnitude_{percent}"] = (f"Magnitude {percent}%", [(MAG, {"sparsity": s})])
        rows[f"wanda_{percent}"] = (f"Wanda {percent}%", [(WANDA, {"sparsity": s})])
        rows[f"sparsegpt_{percent}"] = (f"SparseGPT {percent}%", [(SGPT, {"sparsity": s})])
        rows[f"wanda_dsnot_{percent}"] = (
            f"Wanda + DSnoT {percent}%", [(WANDA, {"sparsity": s}), (DSNOT, {"sparsity": s})]
        )
        rows[f"wanda_dsnot_reference_{percent}"] = (
            f"Wanda + DSnoT {percent}% (reference: keep_if_better off)",
            [(WANDA, {"sparsity": s}), (DSNOT, {"sparsity": s, "keep_if_better": False})],
        )
        rows[f"sparsegpt_dsnot_{percent}"] = (
            f"SparseGPT + DSnoT {percent}%", [(SGPT, {"sparsity": s}), (DSNOT, {"sparsity": s})]
        )
        rows[f"wanda_owl_{percent}"] = (f"Wanda + OWL {percent}%", [(WANDA, {"sparsity": s, **OWL})])
        rows[f"sparsegpt_owl_{percent}"] = (
            f"SparseGPT + OWL {percent}%", [(SGPT, {"sparsity": s, **OWL})]
        )
    for name, cls in (("magnitude", MAG), ("wanda", WANDA), ("sparsegpt", SGPT)):
        rows[f"{name}_2of4"] = (f"{cls.removesuffix('Modifier').replace('Pruning', '')} 2:4",
                                [(cls, {"mask_structure": "2:4"})])
    return rows


ROWS = _rows()
GRIDS = {
    "core": ["sparsegpt_50", "wanda_50", "magnitude_50", "sparsegpt_2of4"],
    "sweep": [
        "magnitude_50", "wanda_50", "sparsegpt_50", "magnitude_60", "wanda_60", "sparsegpt_60",
        "magnitude_70", "wanda_70", "sparsegpt_70", "magnitude_2of4", "wanda_2of4",
        "sparsegpt_2of4", "wanda_dsnot_reference_60", "wanda_dsnot_reference_70",
        "wanda_dsnot_60", "wanda_dsnot_70", "sparsegpt_dsnot_60",
        "sparsegpt_dsnot_70", "wanda_owl_70", "sparsegpt_owl_70",
    ],
}


def recipe_text(modifiers: list[tuple[str, dict]]) -> str:
    stage = {"pruning_stage": {"pruning_modifiers": {name: fields for name, fields in modifiers}}}
    return yaml.safe_dump(stage, sort_keys=False)


def manifest_of(out: Path, row: str) -> dict:
    path = out / row / "reciprune_manifest.json"
    if not path.exists():
        recipe = load_recipe(recipe_text(ROWS[row][1]))
        output = OutputOptions(output_dir=out / row, overwrite=True)
        run_oneshot_job(OneshotJob(recipe=recipe, output=output))
    return json.loads(path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out", help="Folder holding (or receiving) the runs.")
    parser.add_argument("--grid", choices=list(GRIDS), default="core", help="Which rows to run.")
    parser.add_argument("--rows", nargs="*", choices=list(ROWS), help="Run these rows instead.")
    parser.add_argument(
        "--existing", action="store_true", help="Only tabulate runs already in --out."
    )
    args = parser.parse_args()
    out = Path(args.out)
    rows = args.rows or GRIDS[args.grid]
    if args.existing:
        rows = [r for r in rows if (out / r / "reciprune_manifest.json").exists()]
    manifests = [(row, manifest_of(out, row)) for row in rows]
    print("| model | sparsity | perplexity |")
    print("| --- | --- | --- |")
    if manifests:
        print(f"| dense | 0% | {manifests[0][1]['metrics']['ppl_dense']:.2f} |")
    for row, manifest in manifests:
        metrics = manifest["metrics"]
        print(f"| {ROWS[row][0]} | {metrics['global_sparsity']:.1%} | "
              f"{metrics['ppl_compressed']:.2f} |")


if __name__ == "__main__":
    main()
