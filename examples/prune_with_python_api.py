"""Prune the embedded SmolLM2 with the Python API instead of the CLI, then compare perplexity.

    python examples/prune_with_python_api.py [--samples 16] [--structure 2:4]

The same steps `reciprune oneshot` runs: load a model and calibration data, apply a recipe's
modifiers layer by layer, measure perplexity on held-out text.
"""

from __future__ import annotations

import argparse

from reciprune.data import embedded_heldout_texts, load_calibration
from reciprune.evaluation import perplexity
from reciprune.models import load_model
from reciprune.pipelines.oneshot import run_oneshot
from reciprune.recipe import load_recipe

RECIPE = """
pruning_stage:
  obcq_modifiers:
    SparseGPTModifier:
      mask_structure: "{structure}"
      sparsity: {sparsity}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16, help="Calibration sequences.")
    parser.add_argument("--seq-len", type=int, default=256, help="Tokens per sequence.")
    parser.add_argument("--structure", default="2:4", help="'unstructured' or 'N:M'.")
    args = parser.parse_args()

    sparsity = 0.5
    recipe = load_recipe(RECIPE.format(structure=args.structure, sparsity=sparsity))
    model, tokenizer, _ = load_model(None)  # None: the embedded SmolLM2-135M-Instruct
    data = load_calibration(None, tokenizer, num_samples=args.samples, max_seq_length=args.seq_len)
    heldout = embedded_heldout_texts()

    dense = perplexity(model, tokenizer, heldout, max_seq_length=args.seq_len, max_samples=8)
    result = run_oneshot(model, recipe.stages[0].modifiers, list(data.batches(8)))
    pruned = perplexity(model, tokenizer, heldout, max_seq_length=args.seq_len, max_samples=8)

    errors = [r["reconstruction_error"] for r in result.records.values()]
    print(f"dense perplexity  {dense.ppl:.2f}")
    print(f"pruned perplexity {pruned.ppl:.2f} ({args.structure}, {len(errors)} modules)")
    print(f"mean relative reconstruction error {sum(errors) / len(errors):.4f}")


if __name__ == "__main__":
    main()
