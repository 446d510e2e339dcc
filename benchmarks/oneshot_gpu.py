"""Oneshot on a GPU at real dimensions: reciprune's plain CLI (and llm-compressor when given).

Builds (once, in WORK/) a random Llama at Llama-2-7B dimensions with N decoder layers (hidden
4096, MLP 11008, 32 heads, vocabulary 32000) in bfloat16 with a word-level tokenizer, and
pre-tokenized random calibration rows saved with `datasets.save_to_disk`; nothing is
downloaded. Then for each method (SparseGPT 50%, Wanda 50%) and reciprune pipeline it runs
`python -m reciprune oneshot ... --device cuda` in a child process and reads the compression
time (the stage's `total` in the manifest), the GPU peak (`peak_device_memory_mb`), the child's
peak RSS (VmHWM) and the wall time. With `--llmc-python PY` (a Python that has llm-compressor;
`--llmc-path DIR` is put on its PYTHONPATH) the same model and rows go through
`llmcompressor.oneshot` for the side-by-side row.

Targets from the issue (4 layers, 128×2048 tokens): ≤ 12 s oneshot time and ≤ 4 GiB GPU peak;
the full 32-layer shape ≤ 100 s.

    python benchmarks/oneshot_gpu.py                                 # 4 layers, 128×2048
    python benchmarks/oneshot_gpu.py --layers 32 --methods sparsegpt
    python benchmarks/oneshot_gpu.py --device cpu --hidden 256 --intermediate 688 --heads 4 \\
        --vocab 1000 --samples 8 --seq-len 128                         # a dry run on the CPU
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"sparsegpt": "sparsegpt_50.yaml", "wanda": "wanda_50.yaml"}
RECIPROUNE_CHILD = """
import re, sys
from pathlib import Path
from reciprune.cli import main
code = main(sys.argv[1:])
print("VMHWM_KB", re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text())[1])
raise SystemExit(code)
"""
LLMC_CHILD = """
import re, sys, time, torch
from pathlib import Path
from datasets import load_from_disk
from llmcompressor import oneshot
from llmcompressor.modifiers.obcq import SparseGPTModifier
from llmcompressor.modifiers.pruning import WandaPruningModifier
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, data_dir, method, samples, seq_len, out = sys.argv[1:7]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
tokenizer = AutoTokenizer.from_pretrained(model_dir)
cls = SparseGPTModifier if method == "sparsegpt" else WandaPruningModifier
recipe = cls(sparsity=0.5, mask_structure="0:0", targets=["Linear"], ignore=["lm_head"])
torch.cuda.reset_peak_memory_stats()
started = time.perf_counter()
oneshot(model=model, tokenizer=tokenizer, dataset=load_from_disk(data_dir), recipe=recipe,
        max_seq_length=int(seq_len), num_calibration_samples=int(samples), output_dir=out)
print("ONESHOT_S", time.perf_counter() - started)
print("GPU_PEAK_MB", torch.cuda.max_memory_allocated() / 2**20)
print("VMHWM_KB", re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text())[1])
"""


def build(work: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """The random bf16 Llama with its word-level tokenizer, and the calibration rows."""
    return common.random_llama_with_rows(
        work, layers=args.layers, hidden=args.hidden, intermediate=args.intermediate,
        heads=args.heads, vocab=args.vocab, rows=args.samples, seq_len=args.seq_len,
        device=args.device,
    )  # fmt: skip


def _number(pattern: str, text: str) -> float | None:
    found = re.search(pattern + r"\s+([0-9.]+)", text)
    return float(found[1]) if found else None


def run_reciprune(args, model_dir: Path, data_dir: Path, method: str, pipeline: str) -> dict:
    out = args.work / f"out-{method}-{pipeline}"
    command = [
        sys.executable, "-c", RECIPROUNE_CHILD, "oneshot",
        "--recipe", str(REPO / "recipes" / "quickstart" / RECIPES[method]),
        "--model", str(model_dir), "--dataset", str(data_dir), "--device", args.device,
        "--pipeline", pipeline, "--num-calibration-samples", str(args.samples),
        "--max-seq-length", str(args.seq_len), "--no-eval-ppl", "--no-progress", "--overwrite",
        "--output-dir", str(out),
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        return {"tool": f"reciprune {pipeline}", "method": method, "error": done.stderr[-1500:]}
    manifest = json.loads((out / "reciprune_manifest.json").read_text())
    stage = manifest["stages"][0]
    return {
        "tool": f"reciprune {pipeline}", "method": method, "wall_s": wall,
        "oneshot_s": manifest["timings"].get(f"{stage}.total"),
        "compress_s": manifest["timings"].get(f"{stage}.compress"),
        "gpu_peak_mb": manifest["metrics"].get("peak_device_memory_mb"),
        "rss_mb": (_number("VMHWM_KB", done.stdout) or 0) / 1024,
        "sparsity": manifest["metrics"].get("global_sparsity"),
    }  # fmt: skip


def run_llmcompressor(args, model_dir: Path, data_dir: Path, method: str) -> dict:
    import os

    env = dict(os.environ)
    if args.llmc_path:
        env["PYTHONPATH"] = f"{args.llmc_path}:{env.get('PYTHONPATH', '')}"
    out = args.work / f"llmc-{method}"
    command = [args.llmc_python, "-c", LLMC_CHILD, str(model_dir), str(data_dir), method,
               str(args.samples), str(args.seq_len), str(out)]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"tool": "llm-compressor", "method": method, "error": done.stderr[-1500:]}
    return {
        "tool": "llm-compressor", "method": method, "wall_s": time.perf_counter() - started,
        "oneshot_s": _number("ONESHOT_S", done.stdout), "compress_s": None,
        "gpu_peak_mb": _number("GPU_PEAK_MB", done.stdout),
        "rss_mb": (_number("VMHWM_KB", done.stdout) or 0) / 1024, "sparsity": None,
    }  # fmt: skip


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_llama_7b_shape(parser, Path("/tmp/reciprune-oneshot-gpu"))
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--methods", nargs="+", choices=sorted(RECIPES), default=sorted(RECIPES))
    parser.add_argument("--pipelines", nargs="+", default=["sequential"],
                        help="reciprune pipelines to time (sequential is the GPU default)")  # fmt: skip
    parser.add_argument("--llmc-python", default=None, help="A Python with llm-compressor.")
    parser.add_argument("--llmc-path", default=None, help="Extra PYTHONPATH for it.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows here.")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir, data_dir = build(args.work, args)
    rows = []
    for method in args.methods:
        for pipeline in args.pipelines:
            rows.append(run_reciprune(args, model_dir, data_dir, method, pipeline))
            print(json.dumps(rows[-1], default=str), flush=True)
        if args.llmc_python:
            rows.append(run_llmcompressor(args, model_dir, data_dir, method))
            print(json.dumps(rows[-1], default=str), flush=True)
    print(f"\n{args.layers} layers at hidden {args.hidden} / MLP {args.intermediate}, "
          f"{args.samples}×{args.seq_len} calibration tokens, bf16, {args.device}\n")  # fmt: skip
    print("| method | tool | oneshot s | compress s | wall s | GPU peak GiB | RSS GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | {r['tool']} | failed: {r['error'].splitlines()[-1][:80]} |")
            continue
        gpu = None if r["gpu_peak_mb"] is None else r["gpu_peak_mb"] / 1024
        print(f"| {r['method']} | {r['tool']} | {_cell(r['oneshot_s'], '.1f')} | "
              f"{_cell(r['compress_s'], '.1f')} | {r['wall_s']:.1f} | {_cell(gpu, '.2f')} | "
              f"{r['rss_mb'] / 1024:.2f} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
