"""Fine-tuning at Llama-2-7B dimensions: a plain PyTorch loop against `reciprune finetune`.

Builds (once, in WORK/) a random Llama at Llama-2-7B dimensions with N decoder layers (hidden
4096, MLP 11008, 32 heads, vocabulary 32000; 4 layers = 1.07B parameters) saved in bfloat16,
and STEPS × BATCH random rows of SEQ token ids; nothing is downloaded. Then, each in its own
child process, on the same rows and batch (BATCH × SEQ tokens per optimizer step, one
micro-batch, learning rate 1e-5, no warm-up):

- plain: a PyTorch loop (float32 weights, bf16 autocast on CUDA, fused AdamW on CUDA);
- dense: `reciprune finetune` without a recipe, one process;
- dense_fsdp: the same with `--nproc-per-node 1` (FSDP2; NCCL on CUDA, gloo on the CPU);
- constant (and constant_fsdp): with a ConstantPruningModifier recipe;
- distill (and distill_fsdp): ConstantPruning + OutputDistillationModifier SquareHead from the
  dense model itself as teacher.

For each it prints the median step time (the first step left out), tokens/s over the whole run
and without the first step, the GPU peak and the process's peak RSS, then PASS/FAIL for the
issue's targets: dense step ≤ 1.05× plain; distillation step ≤ 1.35× the ConstantPruning step;
the teacher adds no more than its size in the compute dtype (bf16 on CUDA, float32 on the CPU) to
the GPU peak and to the RSS. `--src DIR` runs the
reciprune rows with another checkout's `src` (e.g. a worktree of an older commit) for a
before/after comparison; `--repeats` alternates the rows that many times.

    python benchmarks/finetune_gpu.py                          # on a GPU: the issue's table
    python benchmarks/finetune_gpu.py --device cpu --layers 2 --hidden 256 --intermediate 688 \\
        --heads 4 --vocab 2000 --seq-len 128 --batch 4 --steps 8   # a dry run on the CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

ROWS = ["plain", "dense", "dense_fsdp", "constant", "constant_fsdp", "distill", "distill_fsdp"]
RECIPES = {
    "constant": """\
sparse_finetune_stage:
  run_type: finetune
  constant_modifiers:
    ConstantPruningModifier:
      targets: ["Linear"]
""",
}
RECIPES["distill"] = (
    RECIPES["constant"]
    + """\
  distillation_modifiers:
    OutputDistillationModifier:
      comparison: square_head
"""
)
PLAIN_CHILD = """
import json, re, sys, time
from pathlib import Path
import torch
from datasets import load_from_disk
from transformers import AutoModelForCausalLM
model_dir, data_dir, device, batch, steps = sys.argv[1:6]
batch, steps, device = int(batch), int(steps), torch.device(device)
cuda = device.type == "cuda"
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
model.train()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
ids = torch.tensor(load_from_disk(data_dir)["input_ids"])
times = []
for step in range(steps):
    batch_ids = ids[step * batch:(step + 1) * batch].to(device)
    started = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        loss = model(input_ids=batch_ids, labels=batch_ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    times.append(time.perf_counter() - started)
rss = int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text())[1]) / 1024
gpu = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
tokens = batch * ids.shape[1]
print("RESULT", json.dumps({"seconds": times, "tokens": tokens, "gpu_mb": gpu, "rss_mb": rss}))
"""


# --- runs ---------------------------------------------------------------------------------------
def _summary(row: str, seconds: list[float], tokens: int, gpu_mb, rss_mb: float) -> dict:
    steady = seconds[1:] or seconds
    return {
        "row": row,
        "steps": len(seconds),
        "median_step_ms": 1000 * statistics.median(steady),
        "tokens_per_s": tokens * len(seconds) / sum(seconds),
        "tokens_per_s_steady": tokens * len(steady) / sum(steady),
        "first_step_s": seconds[0],
        "gpu_peak_mb": gpu_mb,
        "rss_mb": rss_mb,
    }


def run_plain(args, model_dir: Path, data_dir: Path) -> dict:
    cmd = [sys.executable, "-c", PLAIN_CHILD, str(model_dir), str(data_dir), args.device,
           str(args.batch), str(args.steps)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(args, None))
    if done.returncode != 0:
        return {"row": "plain", "error": done.stderr[-1500:]}
    result = json.loads(done.stdout.split("RESULT", 1)[1])
    return _summary("plain", result["seconds"], result["tokens"], result["gpu_mb"],
                    result["rss_mb"])  # fmt: skip


def run_reciprune(args, model_dir: Path, data_dir: Path, row: str) -> dict:
    kind, _, fsdp = row.partition("_")
    output = args.work / "runs" / row
    cmd = [
        sys.executable, "-m", "reciprune", "finetune", "--model", str(model_dir),
        "--dataset", str(data_dir), "--data-format", "pretokenized",
        "--max-seq-length", str(args.seq_len), "--per-device-train-batch-size", str(args.batch),
        "--gradient-accumulation-steps", "1", "--max-steps", str(args.steps),
        "--learning-rate", "1e-5", "--warmup-steps", "0",
        "--eval-samples", "0", "--no-eval-ppl", "--no-progress", "--overwrite",
        "--output-dir", str(output),
    ]  # fmt: skip
    if fsdp:
        cmd += ["--nproc-per-node", "1"]
    if kind in RECIPES:
        recipe = args.work / f"{kind}.yaml"
        recipe.write_text(RECIPES[kind], encoding="utf-8")
        cmd += ["--recipe", str(recipe)]
    if kind == "distill":
        cmd += ["--distill-teacher", str(model_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(args, args.src))
    if done.returncode != 0:
        return {"row": row, "error": (done.stdout + done.stderr)[-1500:]}
    manifest = common.read_manifest(output)
    metrics, curve = manifest["metrics"], manifest["loss_curve"]
    gpu = metrics.get("peak_cuda_mb_per_process")
    return _summary(row, [r["seconds"] for r in curve], curve[0]["tokens"],
                    gpu[0] if gpu else None, metrics["peak_rss_mb_per_process"][0])  # fmt: skip


def _env(args, src: Path | None) -> dict[str, str]:
    env = common.thread_env(args.threads) if args.threads else os.environ.copy()
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the reciprune rows pick CUDA whenever they see one
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        )
    return env


# --- report -------------------------------------------------------------------------------------
def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def print_table(rows: list[dict]) -> None:
    print(
        "| run | median step ms | tokens/s (all) | tokens/s (no 1st step) | first step s "
        "| GPU peak GiB | RSS GiB |\n| --- | --- | --- | --- | --- | --- | --- |"
    )
    for r in rows:
        if "error" in r:
            print(f"| {r['row']} | failed: {r['error'].strip().splitlines()[-1][:90]} |")
            continue
        gpu = None if r["gpu_peak_mb"] is None else r["gpu_peak_mb"] / 1024
        print(f"| {r['row']} | {r['median_step_ms']:.1f} | {r['tokens_per_s']:.0f} "
              f"| {r['tokens_per_s_steady']:.0f} | {r['first_step_s']:.2f} | {_cell(gpu, '.2f')} "
              f"| {r['rss_mb'] / 1024:.2f} |")  # fmt: skip


def medians(results: list[dict]) -> dict[str, dict]:
    """Each row's figures, the median over its successful repeats."""
    by_row: dict[str, list[dict]] = {}
    for r in results:
        if "error" not in r:
            by_row.setdefault(r["row"], []).append(r)
    combined = {}
    for row, runs in by_row.items():
        combined[row] = {"row": row}
        for key, value in runs[0].items():
            if key != "row":
                values = [run[key] for run in runs]
                combined[row][key] = None if value is None else statistics.median(values)
    return combined


def targets(rows: dict[str, dict], teacher_mb: float) -> list[str]:
    """PASS/FAIL lines for the issue's targets that the measured rows allow."""
    lines = []

    def check(name: str, value: float, limit: float, unit: str) -> None:
        verdict = "PASS" if value <= limit else "FAIL"
        lines.append(f"{verdict} {name}: {value:.2f}{unit} (limit {limit:.2f}{unit})")

    if "plain" in rows and "dense" in rows:
        check("dense step / plain step", rows["dense"]["median_step_ms"]
              / rows["plain"]["median_step_ms"], 1.05, "×")  # fmt: skip
    for suffix in ("", "_fsdp"):
        student, teacher = rows.get("constant" + suffix), rows.get("distill" + suffix)
        if not (student and teacher):
            continue
        check(f"distill{suffix} step / constant{suffix} step",
              teacher["median_step_ms"] / student["median_step_ms"], 1.35, "×")  # fmt: skip
        if student["gpu_peak_mb"] is not None:
            check(f"teacher's GPU memory{suffix}", teacher["gpu_peak_mb"]
                  - student["gpu_peak_mb"], teacher_mb, " MB")  # fmt: skip
        check(f"teacher's RSS{suffix}", teacher["rss_mb"] - student["rss_mb"], teacher_mb, " MB")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_llama_7b_shape(parser, Path("/tmp/reciprune-finetune-gpu"))
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8, help="Sequences per optimizer step.")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=ROWS)
    parser.add_argument("--repeats", type=int, default=1, help="Alternate the rows N times.")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per child.")
    parser.add_argument(
        "--src",
        type=Path,
        default=None,
        help="Run reciprune from this src folder (a before/after comparison).",
    )
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows here.")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir, data_dir = common.random_llama_with_rows(
        args.work, layers=args.layers, hidden=args.hidden, intermediate=args.intermediate,
        heads=args.heads, vocab=args.vocab, rows=args.batch * args.steps, seq_len=args.seq_len,
        device="cpu",
    )  # fmt: skip
    results = []
    for _ in range(args.repeats):
        for row in args.rows:
            if row == "plain":
                results.append(run_plain(args, model_dir, data_dir))
            else:
                results.append(run_reciprune(args, model_dir, data_dir, row))
            print(json.dumps(results[-1], default=str), flush=True)
    params = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    # The teacher runs in the compute dtype: bf16 on CUDA (the checkpoint's size), fp32 on the CPU.
    teacher_mb = params / 2**20 * (1 if args.device.startswith("cuda") else 2)
    print(f"\n{args.layers} layers at hidden {args.hidden} / MLP {args.intermediate}, "
          f"{args.batch}×{args.seq_len} tokens per step, {args.steps} steps, {args.device}; "
          f"bf16 checkpoint {params / 2**20:.0f} MB\n")  # fmt: skip
    print_table(results)
    measured = medians(results)
    if args.repeats > 1:
        print("\nmedians over the repeats:\n")
        print_table(list(measured.values()))
    print("\n".join([""] + targets(measured, teacher_mb)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
