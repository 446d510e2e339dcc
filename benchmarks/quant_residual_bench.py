"""Row-sparse fine-tuning on a 4-bit base: held-out loss at step 0 and memory (issue 6, part 3).

Three real `reciprune finetune` runs of the SmolLM2 row-sparse recipe on the packaged ASDiv
problems (32 held out), each in its own subprocess, `--max-steps 1` (the figure of interest is
the held-out loss before any update, metrics.eval_loss_before in the run's manifest):

- dense: recipes/row_sparse/smollm2_asdiv.yaml as written (full-precision base, ΔW = 0);
- 4bit: the same with --load-in-4bit --bnb-4bit-use-double-quant (NF4 base, ΔW = 0);
- 4bit+residual: recipes/row_sparse/smollm2_asdiv_4bit_residual.yaml (NF4 base, double quant,
  ΔW from the quantization residual of the chosen rows, 5 iterations).

Memory: "base MB" is the storage of the decoder Linears (manifest base_quantization: dense bytes
vs packed NF4 codes and constants). "train peak MB" is the resident size's high-water mark during
`Trainer.train` (sampled every 10 ms from /proc/self/status VmRSS, Linux only), measured in the
child, which calls reciprune's CLI in-process; the whole-process peak (manifest) includes
loading the float32 model before it is quantized, so it cannot show the saving.

    nice -n 10 python benchmarks/quant_residual_bench.py [--threads 2] [--importance l2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DENSE = REPO / "recipes" / "row_sparse" / "smollm2_asdiv.yaml"
RESIDUAL = REPO / "recipes" / "row_sparse" / "smollm2_asdiv_4bit_residual.yaml"
CHILD_FLAG = "--measured-finetune"


def _rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _child(memory_file: str, argv: list[str]) -> int:
    """Run `reciprune finetune ARGV` here, sampling the resident size while it trains."""
    from reciprune.cli import main
    from reciprune.pipelines import finetune

    samples: dict[str, float] = {}
    original = finetune.Trainer.train

    def measured(self, *args, **kwargs):
        start = _rss_mb()
        samples["train_start_mb"] = start or 0.0
        peak = [start or 0.0]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.01):
                peak[0] = max(peak[0], _rss_mb() or 0.0)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            return original(self, *args, **kwargs)
        finally:
            done.set()
            thread.join()
            samples["train_peak_mb"] = peak[0]

    finetune.Trainer.train = measured
    code = main(["finetune", *argv])
    Path(memory_file).write_text(json.dumps(samples))
    return code


def _run(name: str, recipe: Path, extra: list[str], work: Path, threads: int) -> dict:
    out = work / name
    memory = work / f"{name}.memory.json"
    args = ["--recipe", str(recipe), "--output-dir", str(out), "--overwrite", "--max-steps", "1",
            "--no-eval-ppl", "--no-progress", *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, __file__, CHILD_FLAG, str(memory), *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    manifest = json.loads((out / "reciprune_manifest.json").read_text())
    base = manifest.get("base_quantization") or {}
    mem = json.loads(memory.read_text())
    dense_bytes = base.get("base_linear_bytes_dense")
    return {
        "run": name,
        "eval_loss_step0": manifest["metrics"]["eval_loss_before"],
        "eval_loss_step1": manifest["metrics"]["eval_loss"],
        "base_mb": (base.get("base_linear_bytes_nf4") or dense_bytes or 0) / 2**20 or None,
        "base_dense_mb": dense_bytes / 2**20 if dense_bytes else None,
        "train_start_mb": mem.get("train_start_mb"),
        "train_peak_mb": mem.get("train_peak_mb"),
        "process_peak_mb": manifest["metrics"]["peak_rss_mb_per_process"][0],
        "base_quantization": base.get("format", "none"),
    }


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == CHILD_FLAG:
        return _child(sys.argv[2], sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--importance", default=None,
                        help="override the recipes' row importance (e.g. l2, faster than zo_taylor)")
    parser.add_argument("--work", default=None, help="folder for the runs (default: a temp folder)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="quant_residual_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    override = []
    if args.importance:
        override = [f"--set=RowSparseFinetuneModifier.importance={args.importance}"]
    runs = [
        ("dense", DENSE, []),
        ("4bit", DENSE, ["--load-in-4bit", "--bnb-4bit-use-double-quant"]),
        ("4bit+residual", RESIDUAL, []),
    ]
    rows = []
    for name, recipe, extra in runs:
        rows.append(_run(name, recipe, extra + override, work, args.threads))
        print(json.dumps(rows[-1]), flush=True)
    dense_mb = next((r["base_dense_mb"] for r in rows if r["base_dense_mb"]), None)
    for r in rows:  # the full-precision run stores the same Linears unquantized
        if r["base_quantization"] == "none":
            r["base_mb"] = dense_mb
    print("\n| base | held-out loss, step 0 | after 1 step | decoder Linears MB | RSS at train "
          "start MB | train peak RSS MB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['run']} | {r['eval_loss_step0']:.4f} | {r['eval_loss_step1']:.4f} | "
              f"{(r['base_mb'] or 0):.1f} | {r['train_start_mb']:.0f} | {r['train_peak_mb']:.0f} |")
    (work / "quant_residual_bench.json").write_text(json.dumps(rows, indent=1))
    print(f"\nrows: {work / 'quant_residual_bench.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
