"""Oneshot on the CPU, paired against llm-compressor: wall time, oneshot time and peak RSS.

Builds (once, cached in WORK/) a seeded random Llama with 4 decoder layers, hidden 512, MLP
1376, 8 heads (8 KV heads), float32, with reciprune's embedded SmolLM2 tokenizer saved beside
it (vocabulary 49152, untied lm_head), and 64 rows × 512 random token ids saved with
`datasets.save_to_disk` (columns `input_ids` and an all-ones `attention_mask`): reciprune's
`--dataset FOLDER` and llm-compressor's `oneshot(dataset=...)` both take the rows as they are,
so both tools calibrate on the same 64×512 tokens. Nothing is downloaded.

Then, for SparseGPT 50% and Wanda 50% (unstructured, every Linear of the decoder layers), it
runs each tool in its own child process with the thread count pinned (OMP/MKL_NUM_THREADS and
torch.set_num_threads, default 2), alternating the tools within each repeat (reciprune,
llm-compressor, reciprune, llm-compressor, ...: paired, so slow drift of the machine hits both):

- reciprune: the plain CLI, `python -m reciprune oneshot --recipe recipes/quickstart/R --model M
  --dataset D --num-calibration-samples 64 --max-seq-length 512 --no-eval-ppl --no-progress
  --output-dir O --overwrite` (run through `reciprune.cli.main` in a `-c` child so that the
  child can print its VmHWM after the CLI returns); "oneshot s" is the stage's `total` timing
  from the manifest (the calibration pipeline: capture, statistics, solves; not loading or
  saving). For Wanda it also runs the same command with `--exact-layer-error`, to show what the
  exact per-module report error costs.
- llm-compressor: `llmcompressor.oneshot(model=..., tokenizer=..., dataset=..., recipe=...,
  max_seq_length=512, num_calibration_samples=64, output_dir=O)` in a child run with the
  Python given by `--llmc-python` (a separate virtualenv: llm-compressor is never imported
  here), the model loaded in float32 as reciprune does on the CPU; "oneshot s" is the time of
  `Oneshot.apply_recipe_modifiers` (its calibration pipeline, the counterpart of reciprune's
  stage total), and the JSON line also gives the whole `oneshot()` call (dataloader + save).

"wall s" is the child process's whole life (imports, load, calibration, save) for both tools.
Peak RSS is the child's VmHWM from /proc/self/status, read at its end (ru_maxrss would carry
the parent's peak across fork/exec). The time ratios are reciprune / llm-compressor of the
means over the repeats, the RSS ratio of the largest peaks; the per-repeat (paired) ratios are
printed under the table.

Issue targets: Wanda ≤ 0.9× and SparseGPT ≤ 0.95× of llm-compressor's time, RSS ≤ 0.7×.

    python benchmarks/oneshot_cpu_vs_llmcompressor.py --llmc-python /work/llmc-venv/bin/python
    python benchmarks/oneshot_cpu_vs_llmcompressor.py --repeats 3 --methods wanda
    python benchmarks/oneshot_cpu_vs_llmcompressor.py --layers 1 --samples 8 --seq-len 128 \\
        --repeats 1 --work /tmp/smoke                                  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PREPARED, is_prepared, save_prepared, thread_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"sparsegpt": "sparsegpt_50.yaml", "wanda": "wanda_50.yaml"}
DEFAULT_LLMC_PYTHON = "/work/llmc-venv/bin/python"

RECIPROUNE_CHILD = """
import re, sys
from pathlib import Path
import torch
torch.set_num_threads(int(sys.argv[1]))
from reciprune.cli import main
try:
    code = main(sys.argv[2:])
finally:
    print("VMHWM_KB", re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text())[1])
raise SystemExit(code)
"""

LLMC_CHILD = """
import re, sys, time
from pathlib import Path
import torch
threads, model_dir, data_dir, method, samples, seq_len, out = sys.argv[1:8]
torch.set_num_threads(int(threads))
from datasets import load_from_disk
from llmcompressor import oneshot
from llmcompressor.modifiers.obcq import SparseGPTModifier
from llmcompressor.modifiers.pruning import WandaPruningModifier
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
import llmcompressor
print("VERSIONS", llmcompressor.__version__, torch.__version__)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
# The folder's tokenizer_config names transformers 5's TokenizersBackend, which the 4.x that
# llm-compressor 0.10 pins cannot load: read the same tokenizer.json through the 4.x class.
tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(Path(model_dir) / "tokenizer.json"),
                                    bos_token="<|im_start|>", eos_token="<|im_end|>",
                                    unk_token="<|endoftext|>", pad_token="<|im_end|>")
if method == "sparsegpt":
    recipe = SparseGPTModifier(sparsity=0.5, mask_structure="0:0", block_size=128,
                               dampening_frac=0.01, targets=["Linear"], ignore=["lm_head"])
else:
    recipe = WandaPruningModifier(sparsity=0.5, mask_structure="0:0", targets=["Linear"],
                                  ignore=["lm_head"])
# Time the modifiers' calibration pass on its own (llm-compressor's counterpart of
# reciprune's stage total): oneshot() also builds the dataloader and saves the checkpoint.
from llmcompressor.entrypoints.oneshot import Oneshot
apply = Oneshot.apply_recipe_modifiers
def timed_apply(self, *a, **k):
    t0 = time.perf_counter()
    try:
        return apply(self, *a, **k)
    finally:
        print("PIPELINE_S", time.perf_counter() - t0)
Oneshot.apply_recipe_modifiers = timed_apply
started = time.perf_counter()
oneshot(model=model, tokenizer=tokenizer, dataset=load_from_disk(data_dir), recipe=recipe,
        max_seq_length=int(seq_len), num_calibration_samples=int(samples), output_dir=out)
print("ONESHOT_CALL_S", time.perf_counter() - started)
print("VMHWM_KB", re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text())[1])
"""


# --- inputs -------------------------------------------------------------------------------------
def build(args: argparse.Namespace) -> tuple[Path, Path]:
    """The random Llama with the embedded tokenizer, and the calibration rows (cached)."""
    shape = {k: getattr(args, k) for k in ("layers", "hidden", "intermediate", "heads",
                                           "samples", "seq_len")}  # fmt: skip
    tag = "-".join(str(v) for v in shape.values())
    model_dir, data_dir = args.work / f"model-{tag}", args.work / f"calibration-{tag}"
    if is_prepared(model_dir) and (data_dir / "dataset_info.json").is_file():
        return model_dir, data_dir
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    from reciprune.models import load_model

    print(f"building the model and calibration rows in {args.work} ...", flush=True)
    tokenizer = load_model(None)[1]
    vocab = len(tokenizer)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, vocab_size=vocab,
                         max_position_embeddings=max(2048, args.seq_len),
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    save_prepared(model, tokenizer, model_dir, {**shape, "vocab": vocab})
    generator = torch.Generator().manual_seed(1)
    # Ids above the special tokens (SmolLM2's are 0..16), so no row holds a stray eos or pad.
    rows = torch.randint(17, vocab, (args.samples, args.seq_len), generator=generator)
    Dataset.from_dict({"input_ids": rows.tolist(),
                       "attention_mask": torch.ones_like(rows).tolist()}).save_to_disk(
        str(data_dir))  # fmt: skip
    return model_dir, data_dir


# --- runs ---------------------------------------------------------------------------------------
def _number(pattern: str, text: str) -> float | None:
    found = re.search(pattern + r"\s+([0-9.]+)", text)
    return float(found[1]) if found else None


def _failure(row: dict, done: subprocess.CompletedProcess) -> dict:
    row["error"] = (done.stdout + done.stderr)[-4000:]
    return row


def run_reciprune(args, model_dir: Path, data_dir: Path, method: str, exact: bool) -> dict:
    tool = "reciprune --exact-layer-error" if exact else "reciprune"
    out = args.work / f"out-reciprune-{method}{'-exact' if exact else ''}"
    command = [
        sys.executable, "-c", RECIPROUNE_CHILD, str(args.threads), "oneshot",
        "--recipe", str(REPO / "recipes" / "quickstart" / RECIPES[method]),
        "--model", str(model_dir), "--dataset", str(data_dir),
        "--num-calibration-samples", str(args.samples), "--max-seq-length", str(args.seq_len),
        "--no-eval-ppl", "--no-progress", "--output-dir", str(out), "--overwrite",
        *(["--exact-layer-error"] if exact else []),
    ]  # fmt: skip
    row = {"method": method, "tool": tool}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=thread_env(args.threads))
    row["wall_s"] = time.perf_counter() - started
    if done.returncode != 0:
        return _failure(row, done)
    manifest = json.loads((out / "reciprune_manifest.json").read_text(encoding="utf-8"))
    stage = manifest["stages"][0]
    stage = stage if isinstance(stage, str) else stage.get("name", "")
    row["oneshot_s"] = manifest["timings"].get(f"{stage}.total")
    row["timings"] = {k: round(v, 2) for k, v in manifest["timings"].items()}
    row["rss_mb"] = (_number("VMHWM_KB", done.stdout) or 0) / 1024
    row["sparsity"] = manifest.get("metrics", {}).get("global_sparsity")
    return row


def run_llmcompressor(args, model_dir: Path, data_dir: Path, method: str) -> dict:
    out = args.work / f"out-llmc-{method}"
    command = [args.llmc_python, "-c", LLMC_CHILD, str(args.threads), str(model_dir),
               str(data_dir), method, str(args.samples), str(args.seq_len), str(out)]  # fmt: skip
    env = thread_env(args.threads)
    env.pop("PYTHONPATH", None)  # never reciprune's environment in llm-compressor's Python
    env.pop("VIRTUAL_ENV", None)
    row = {"method": method, "tool": "llm-compressor"}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    row["wall_s"] = time.perf_counter() - started
    if done.returncode != 0:
        return _failure(row, done)
    row["oneshot_s"] = _number("PIPELINE_S", done.stdout)
    row["oneshot_call_s"] = _number("ONESHOT_CALL_S", done.stdout)
    row["rss_mb"] = (_number("VMHWM_KB", done.stdout) or 0) / 1024
    versions = re.search(r"VERSIONS (\S+) (\S+)", done.stdout)
    row["versions"] = f"llmcompressor {versions[1]}, torch {versions[2]}" if versions else None
    return row


# --- the table ----------------------------------------------------------------------------------
def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def print_table(rows: list[dict], methods: list[str]) -> None:
    tools = ["reciprune", "reciprune --exact-layer-error", "llm-compressor"]
    print("\n| method | tool | wall s per repeat | oneshot s per repeat | peak RSS MB | "
          "wall ratio | oneshot ratio | RSS ratio |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    paired: list[str] = []
    for method in methods:
        groups = {t: [r for r in rows if r["method"] == method and r["tool"] == t] for t in tools}
        ok = {t: [r for r in g if "error" not in r] for t, g in groups.items()}
        ref = ok["llm-compressor"]
        ref_wall = _mean([r["wall_s"] for r in ref])
        ref_one = _mean([r["oneshot_s"] for r in ref])
        ref_rss = max((r["rss_mb"] for r in ref), default=None)
        for tool in tools:
            if not groups[tool]:
                continue
            good = ok[tool]
            failed = len(groups[tool]) - len(good)
            walls = " / ".join(f"{r['wall_s']:.1f}" for r in good) or "-"
            ones = " / ".join(_cell(r["oneshot_s"], ".1f") for r in good) or "-"
            rss = max((r["rss_mb"] for r in good), default=None)
            wall, one = _mean([r["wall_s"] for r in good]), _mean([r["oneshot_s"] for r in good])
            ratios = ["-", "-", "-"]
            if tool != "llm-compressor" and ref and good:
                ratios = [f"{wall / ref_wall:.2f}×", f"{one / ref_one:.2f}×" if one else "-",
                          f"{rss / ref_rss:.2f}×"]  # fmt: skip
            note = f" ({failed} failed)" if failed else ""
            print(f"| {method} | {tool}{note} | {walls} | {ones} | {_cell(rss, '.0f')} | "
                  f"{' | '.join(ratios)} |")  # fmt: skip
            if tool != "llm-compressor" and ref:
                by_repeat = {r["repeat"]: r for r in ref}
                pairs = [(a, by_repeat[a["repeat"]]) for a in good if a["repeat"] in by_repeat]
                walls = ", ".join(f"{a['wall_s'] / b['wall_s']:.2f}" for a, b in pairs)
                ones = ", ".join(f"{a['oneshot_s'] / b['oneshot_s']:.2f}" for a, b in pairs
                                 if a["oneshot_s"] and b["oneshot_s"])  # fmt: skip
                rsses = ", ".join(f"{a['rss_mb'] / b['rss_mb']:.2f}" for a, b in pairs)
                paired.append(f"{method}, {tool} / llm-compressor per pair: wall {walls}; "
                              f"oneshot {ones or '-'}; RSS {rsses}")  # fmt: skip
    if paired:
        print()
        print("\n".join(paired))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/reciprune-oneshot-cpu-vs-llmc"))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--methods", nargs="+", choices=sorted(RECIPES), default=sorted(RECIPES))
    parser.add_argument("--no-exact", action="store_true",
                        help="Skip the Wanda run with --exact-layer-error.")  # fmt: skip
    parser.add_argument("--llmc-python", default=DEFAULT_LLMC_PYTHON,
                        help="A Python with llm-compressor (its own virtualenv); skipped when "
                        f"absent (default: {DEFAULT_LLMC_PYTHON}).")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows here.")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.llmc_python and not Path(args.llmc_python).is_file():
        print(f"no llm-compressor Python at {args.llmc_python}: running reciprune only "
              "(pass --llmc-python PATH)", flush=True)  # fmt: skip
        args.llmc_python = None
    model_dir, data_dir = build(args)
    info = json.loads((model_dir / PREPARED).read_text(encoding="utf-8"))
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    print(f"{args.layers} layers, hidden {args.hidden}, MLP {args.intermediate}, {args.heads} "
          f"heads, vocab {info['vocab']}, float32; calibration {args.samples}×{args.seq_len}; "
          f"{args.threads} threads; {platform.processor() or platform.machine()}, "
          f"load average before: {load}", flush=True)  # fmt: skip
    rows: list[dict] = []
    for repeat in range(args.repeats):
        for method in args.methods:
            steps = [lambda m=method: run_reciprune(args, model_dir, data_dir, m, False)]
            if args.llmc_python:
                steps.append(lambda m=method: run_llmcompressor(args, model_dir, data_dir, m))
            if method == "wanda" and not args.no_exact:
                steps.append(lambda m=method: run_reciprune(args, model_dir, data_dir, m, True))
            for step in steps:
                row = step()
                row["repeat"] = repeat
                rows.append(row)
                shown = {k: v for k, v in row.items() if k != "error"}
                print(json.dumps(shown, default=str), flush=True)
                if "error" in row:
                    print(f"FAILED: {row['tool']} {row['method']}:\n{row['error']}", flush=True)
    versions = next((r["versions"] for r in rows if r.get("versions")), None)
    if versions:
        print(f"\nllm-compressor side: {versions}")
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    print(f"load average after: {load}")
    print_table(rows, args.methods)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str), encoding="utf-8")


if __name__ == "__main__":
    main()
