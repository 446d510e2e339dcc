"""Models larger than memory: peak RSS of `reciprune oneshot --pipeline streaming` against the
size of the checkpoint it prunes.

Builds (once, in WORK/) a random Llama whose float32 safetensors checkpoint is about 5.9 GB
(24 layers, hidden 2048, MLP 5632, SmolLM2's 49152-token vocabulary, untied head), written
tensor by tensor so this script never holds it either, then prunes it in a child process with
the plain CLI and reads the child's peak resident memory (VmHWM). The goal from the issue:
peak RSS ≤ 35% of the checkpoint's size. `--compare-in-memory` also runs the in-memory
(layerwise) pipeline on the same model, which needs the whole model in RAM.

    python benchmarks/streaming_rss.py                    # Wanda 50%, 8×256 calibration tokens
    python benchmarks/streaming_rss.py --method sparsegpt --compare-in-memory
    python benchmarks/streaming_rss.py --layers 4 --hidden 512 --intermediate 1376   # quick
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

RECIPES = {
    "wanda": "recipes/quickstart/wanda_50.yaml",
    "sparsegpt": "recipes/quickstart/sparsegpt_50.yaml",
    "magnitude": "recipes/quickstart/magnitude_50.yaml",
}
REPO = Path(__file__).resolve().parents[1]
CHILD = """
import re, sys
from pathlib import Path
from reciprune.cli import main
code = main(sys.argv[1:])
print("VMHWM_KB", re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text())[1])
raise SystemExit(code)
"""


def build(folder: Path, layers: int, hidden: int, intermediate: int) -> None:
    """A random Llama checkpoint written tensor by tensor (never whole in memory)."""
    import torch
    from accelerate import init_empty_weights
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers import AutoModelForCausalLM, LlamaConfig

    from reciprune.core.shards import ShardWriter
    from reciprune.models import load_model

    tokenizer = load_model(None)[1]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=hidden // 64, vocab_size=len(tokenizer),
                         tie_word_embeddings=False, max_position_embeddings=2048)  # fmt: skip
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = model.state_dict()
    split = split_torch_state_dict_into_shards(
        state, filename_pattern="model{suffix}.safetensors", max_shard_size="2GB"
    )
    folder.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(folder, split.filename_to_tensors,
                         {n: (t.dtype, tuple(t.shape)) for n, t in state.items()})  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    for name, meta in state.items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(meta.shape)
        else:
            tensor = torch.randn(meta.shape, generator=generator) * 0.02
        writer.write(name, tensor)
    writer.close()
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / common.PREPARED).write_text(json.dumps({"layers": layers}) + "\n", encoding="utf-8")


def run(args: argparse.Namespace, model: Path, pipeline: str) -> dict:
    out = args.work / f"out-{args.method}-{pipeline}"
    command = [
        sys.executable, "-c", CHILD, "oneshot", "--recipe", str(REPO / RECIPES[args.method]),
        "--model", str(model), "--pipeline", pipeline, "--device", "cpu",
        "--num-calibration-samples", str(args.samples), "--max-seq-length", str(args.seq_len),
        "--no-eval-ppl", "--no-progress", "--overwrite", "--output-dir", str(out),
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, env=common.thread_env(args.threads), capture_output=True,
                          text=True)  # fmt: skip
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        sys.exit(done.returncode)
    manifest = json.loads((out / "reciprune_manifest.json").read_text(encoding="utf-8"))
    peak = int(re.search(r"VMHWM_KB (\d+)", done.stdout)[1]) * 1024
    return {"pipeline": pipeline, "seconds": time.perf_counter() - started, "peak_rss": peak,
            "sparsity": manifest["metrics"].get("global_sparsity")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/reciprune-streaming-bench"))
    parser.add_argument("--method", choices=sorted(RECIPES), default="wanda")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--samples", type=int, default=8, help="Calibration sequences.")
    parser.add_argument("--seq-len", type=int, default=256, help="Tokens per sequence.")
    parser.add_argument("--threads", type=int, default=common.usable_cores())
    parser.add_argument("--compare-in-memory", action="store_true",
                        help="Also run the in-memory (layerwise) pipeline.")  # fmt: skip
    args = parser.parse_args()
    model = args.work / f"llama-{args.layers}x{args.hidden}x{args.intermediate}"
    if not common.is_prepared(model):
        print(f"building {model} ...", flush=True)
        build(model, args.layers, args.hidden, args.intermediate)
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    rows = [run(args, model, "streaming")]
    if args.compare_in_memory:
        rows.append(run(args, model, "layerwise"))
    print(f"\ncheckpoint: {size / 1e9:.2f} GB float32 ({args.layers} layers, hidden "
          f"{args.hidden}, MLP {args.intermediate}); {args.method} 50%, "
          f"{args.samples}×{args.seq_len} calibration tokens, {args.threads} threads\n")  # fmt: skip
    print("| pipeline | wall s | peak RSS GB | RSS / checkpoint | sparsity |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['pipeline']} | {row['seconds']:.0f} | {row['peak_rss'] / 1e9:.2f} | "
              f"{row['peak_rss'] / size:.0%} | {row['sparsity']:.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
