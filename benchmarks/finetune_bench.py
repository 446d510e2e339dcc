"""Fine-tuning throughput and peak memory: dense vs sparse-distilled, 1 vs 2 processes (FSDP2).

Each row is one real `reciprune finetune` command in a subprocess; its figures come from the
run's reciprune_manifest.json. Modes: "dense" (no recipe: plain fine-tuning) and
"sparse_distilled" (a 50%-sparse student, ConstantPruningModifier keeping its zeros and
OutputDistillationModifier SquareHead distillation from the dense teacher). Models: "tiny" (Llama
config: hidden 256, 4 layers, MLP 688, 4 heads / 2 KV heads, vocab 49152, seeded random init) and
"smollm2" (the embedded SmolLM2-135M-Instruct). The students are magnitude-pruned (50% of each
Linear weight inside the decoder layers): the zeros' pattern does not change the work done, so
this is enough for speed. Data: the embedded Wikipedia passages, 256-token sequences, 2 sequences
per micro-batch; the global batch is 4 sequences everywhere (1 process accumulates 2 micro-batches,
2 processes take 1 each), so every optimizer step does the same work. Each process gets
cores // processes threads by default, so both process counts use the same cores.

tokens/s (steady) leaves out the first optimizer steps (warm-up: allocator, first FSDP gathers)
and is computed from the loss curve; tokens/s (all) is the manifest's figure over every step.
Both count training tokens over all processes and exclude model load, data and save. The rows also
go to OUT/finetune_bench.json; the dense and sparse checkpoints are built once in OUT/models/.

    python benchmarks/finetune_bench.py                          # full table (tiny + smollm2)
    python benchmarks/finetune_bench.py --quick                  # tiny model, few steps: smoke run
    python benchmarks/finetune_bench.py --models smollm2 --procs 2 --steps 12
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

MODELS = ["tiny", "smollm2"]
MODES = ["dense", "sparse_distilled"]
DEFAULT_STEPS = {"tiny": 20, "smollm2": 8}
QUICK_STEPS = 5
SPARSITY = 0.5
GLOBAL_BATCH = 4  # sequences per optimizer step over all processes
PER_DEVICE = 2
SEQ = 256

RECIPE = """\
sparse_finetune_stage:
  run_type: finetune
  constant_modifiers:
    ConstantPruningModifier:
      targets: ["Linear"]
  distillation_modifiers:
    OutputDistillationModifier:
      comparison: square_head
"""


# --- model folders (built in a child process so this one never holds torch or a model) --------
def _magnitude_prune(model, sparsity: float) -> None:
    """Zero exactly the smallest-magnitude `sparsity` of every Linear weight in the decoder."""
    import torch

    from reciprune.core.layers import find_decoder_layers

    _, layers = find_decoder_layers(model)
    with torch.no_grad():
        for module in layers.modules():
            if isinstance(module, torch.nn.Linear):
                flat = module.weight.view(-1)
                drop = flat.abs().argsort()[: int(flat.numel() * sparsity)]
                flat[drop] = 0.0


def prepare(name: str, dense_dir: Path, sparse_dir: Path) -> None:
    """Save the dense model and its 50%-sparse copy, each with the SmolLM2 tokenizer."""
    from reciprune.models import load_model

    smollm2, tokenizer, _ = load_model(None)
    model = smollm2 if name == "smollm2" else common.tiny_model()
    for folder, sparsity in ((dense_dir, 0.0), (sparse_dir, SPARSITY)):
        if sparsity:
            _magnitude_prune(model, sparsity)
        common.save_prepared(model, tokenizer, folder, {"model": name, "sparsity": sparsity})


def model_dirs(work: Path, name: str) -> tuple[Path, Path]:
    """The dense and sparse checkpoint folders of `name`, built on first use."""
    dense, sparse = work / "models" / f"{name}-dense", work / "models" / f"{name}-sparse50"
    if not (common.is_prepared(dense) and common.is_prepared(sparse)):
        print(f"building {dense} and {sparse} ...", flush=True)
        cmd = [sys.executable, __file__, "--prepare", name, str(dense), str(sparse)]
        common.run_checked(cmd, os.environ.copy())
    return dense, sparse


# --- runs ---------------------------------------------------------------------------------------
def finetune_command(
    model: Path, output: Path, steps: int, procs: int, recipe: Path | None, teacher: Path | None
) -> list[str]:
    cmd = [
        sys.executable, "-m", "reciprune", "finetune",
        "--model", str(model), "--output-dir", str(output), "--max-steps", str(steps),
        "--dataset", "embedded", "--max-seq-length", str(SEQ),
        "--per-device-train-batch-size", str(PER_DEVICE),
        "--gradient-accumulation-steps", str(GLOBAL_BATCH // (PER_DEVICE * procs)),
        "--eval-samples", "0",  # the held-out loss is not what is measured
        "--no-progress", "--no-eval-ppl", "--overwrite",
    ]
    if procs > 1:
        cmd += ["--nproc-per-node", str(procs)]
    if recipe is not None:
        cmd += ["--recipe", str(recipe), "--distill-teacher", str(teacher)]
    return cmd


def run_row(
    work: Path, name: str, mode: str, procs: int, steps: int, threads: int, warmup: int
) -> dict:
    dense, sparse = model_dirs(work, name)
    output = work / "runs" / f"{name}-{mode}-{procs}p"
    if mode == "dense":
        cmd = finetune_command(dense, output, steps, procs, None, None)
    else:
        recipe = work / "sparse_distilled.yaml"
        recipe.write_text(RECIPE, encoding="utf-8")
        cmd = finetune_command(sparse, output, steps, procs, recipe, dense)
    common.run_checked(cmd, common.thread_env(threads))
    manifest = common.read_manifest(output)
    metrics, curve = manifest["metrics"], manifest["loss_curve"]
    kept = common.steady_steps(curve, warmup)
    return {
        "model": name,
        "mode": mode,
        "processes": procs,
        "threads_per_process": threads,
        "steps": len(curve),
        "tokens_per_second_steady": common.tokens_per_second(kept),
        "tokens_per_second_all": metrics["tokens_per_second"],
        "peak_rss_mb_per_process": metrics["peak_rss_mb_per_process"],
        "warmup_steps_dropped": len(curve) - len(kept),
        "loss_first": curve[0]["loss"] if curve else None,
        "loss_last": curve[-1]["loss"] if curve else None,
    }


def table_row(row: dict) -> str:
    rss = " / ".join(f"{v:.0f}" for v in row["peak_rss_mb_per_process"])
    return (
        f"| {row['model']} | {row['mode']} | {row['processes']} | {row['steps']} "
        f"| {row['tokens_per_second_steady']:.0f} | {row['tokens_per_second_all']:.0f} | {rss} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--procs", nargs="+", type=int, default=[1, 2], choices=[1, 2])
    parser.add_argument("--steps", type=int, default=None,
                        help=f"Optimizer steps per run (default: {DEFAULT_STEPS}).")
    parser.add_argument("--warmup", type=int, default=2,
                        help="First steps left out of the steady tokens/s (default 2).")
    parser.add_argument("--threads", type=int, default=None,
                        help="Threads per process (default: cores // processes).")
    parser.add_argument("--quick", action="store_true",
                        help=f"Smoke run: tiny model only, {QUICK_STEPS} steps.")
    parser.add_argument("--work-dir", type=Path, default=Path("out/finetune_bench"))
    parser.add_argument("--prepare", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare:
        name, dense, sparse = args.prepare
        prepare(name, Path(dense), Path(sparse))
        return

    models = ["tiny"] if args.quick else args.models
    cores = common.usable_cores()
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"embedded Wikipedia, {SEQ}-token sequences, global batch {GLOBAL_BATCH} "
          f"({PER_DEVICE} per micro-batch), {cores} cores, CPU float32; "
          f"steady tokens/s leaves out the first {args.warmup} step(s)", flush=True)
    rows: list[dict] = []
    header = ("| model | mode | processes | steps | tokens/s (steady) | tokens/s (all) "
              "| peak RSS MB per process |\n|---|---|---|---|---|---|---|")
    for name in models:
        steps = args.steps or (QUICK_STEPS if args.quick else DEFAULT_STEPS[name])
        for mode in args.modes:
            for procs in args.procs:
                threads = args.threads or max(1, cores // procs)
                row = run_row(work, name, mode, procs, steps, threads, args.warmup)
                rows.append(row)
                print(table_row(row), flush=True)  # progress while the rest runs
    (work / "finetune_bench.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    print()
    print(header)
    print("\n".join(table_row(row) for row in rows))
    print(f"\nrows: {work / 'finetune_bench.json'}")


if __name__ == "__main__":
    main()
