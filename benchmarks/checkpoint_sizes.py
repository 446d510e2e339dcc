"""On-disk size and load time of the embedded SmolLM2-135M-Instruct per checkpoint format.

Rows: dense (the model saved as loaded), 50% unstructured and 2:4 magnitude pruning, 2:4 + W4A16
(RTN, int4 in groups of 32): each a data-free `reciprune oneshot` with --save-format auto, so the
pruned rows are stored dense (compressed-tensors 0.20 has no sparse formats any more; see
README "Sparse checkpoint formats") and the quantized row as pack-quantized. Load time is the
median of 3 plain `AutoModelForCausalLM.from_pretrained` calls, then with the first forward
(which unpacks a compressed-tensors model).

    python benchmarks/checkpoint_sizes.py [--work /tmp/checkpoint_sizes]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM

from reciprune.cli import main as reciprune
from reciprune.models import load_model

MODEL = "embedded:smollm2-135m-instruct"
MAG = "MagnitudePruningModifier"
W4A16_G32 = {"group_0": {"targets": ["Linear"], "weights": {
    "num_bits": 4, "type": "int", "strategy": "group", "group_size": 32, "symmetric": True}}}
ROWS: dict[str, tuple[str, list[dict]]] = {
    "dense": ("dense", []),
    "magnitude_50": ("50% unstructured", [{"type": MAG, "sparsity": 0.5}]),
    "magnitude_24": ("2:4", [{"type": MAG, "mask_structure": "2:4"}]),
    "magnitude_24_w4a16": ("2:4 + W4A16", [
        {"type": MAG, "mask_structure": "2:4"},
        {"type": "QuantizationModifier", "targets": ["Linear"], "config_groups": W4A16_G32},
    ]),
}  # fmt: skip


def _write(row: str, modifiers: list[dict], folder: Path) -> None:
    if not modifiers:
        model, tokenizer, _ = load_model(MODEL)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return
    recipe = folder.with_suffix(".yaml")
    recipe.write_text(yaml.safe_dump({"modifiers": modifiers}))
    code = reciprune(["oneshot", "--recipe", str(recipe), "--model", MODEL, "--output-dir",
                      str(folder), "--no-eval-ppl", "--no-progress", "--overwrite"])  # fmt: skip
    if code != 0:
        raise SystemExit(f"{row}: reciprune oneshot exited {code}")


def _load_seconds(folder: Path, forward: bool) -> float:
    times = []
    for _ in range(3):
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(folder)
        if forward:
            with torch.no_grad():
                model(torch.zeros(1, 1, dtype=torch.long))
        times.append(time.perf_counter() - started)
        del model
    return statistics.median(times)


def _format(folder: Path) -> str:
    manifest = folder / "reciprune_manifest.json"
    if not manifest.exists():
        return "dense"
    return json.loads(manifest.read_text())["checkpoint"]["format"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/checkpoint_sizes"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print("| model | format | weight files | load | load + first forward |")
    print("|---|---|---:|---:|---:|")
    for row, (label, modifiers) in ROWS.items():
        folder = args.work / row
        _write(row, modifiers, folder)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        print(f"| {label} | {_format(folder)} | {size / 1e6:.1f} MB | "
              f"{_load_seconds(folder, False):.2f} s | {_load_seconds(folder, True):.2f} s |",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
