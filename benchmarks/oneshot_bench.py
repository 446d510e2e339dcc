"""Oneshot pruning speed and memory against the floor of the work it cannot avoid.

Model: Llama config (hidden 512, 8 layers, MLP 1376, 8 heads, vocab 32000), random init;
calibration 128 x 512 random tokens. For SparseGPT 50%, SparseGPT 2:4 and Wanda 50% (and, on
request, Wanda + DSnoT), at 1 thread and at all threads, each in a fresh subprocess, it prints
wall seconds of the oneshot pipeline and the process's peak RSS, against the floor measured by
its own subprocess on the same model and data: two plain forwards of the decoder layers over the
calibration set plus the XᵀX products of the distinct layer inputs.

    python benchmarks/oneshot_bench.py                       # full table
    python benchmarks/oneshot_bench.py --quick               # 2 layers, 32 x 512: smoke run
    python benchmarks/oneshot_bench.py --methods wanda_50 wanda_dsnot_50   # DSnoT's overhead
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

METHODS = {
    "sparsegpt_50": [("SparseGPTModifier", {"sparsity": 0.5})],
    "sparsegpt_2of4": [("SparseGPTModifier", {"mask_structure": "2:4"})],
    "wanda_50": [("WandaModifier", {"sparsity": 0.5})],
    "wanda_dsnot_50": [("WandaModifier", {"sparsity": 0.5}), ("DSnoTModifier", {"sparsity": 0.5})],
}
DEFAULT_METHODS = ["sparsegpt_50", "sparsegpt_2of4", "wanda_50"]


def _build(layers: int, samples: int, seq: int, batch: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=seq,
    )
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (samples, seq))
    batches = [
        {"input_ids": ids[i : i + batch], "attention_mask": torch.ones_like(ids[i : i + batch])}
        for i in range(0, samples, batch)
    ]
    return model, batches


def _floor(model, batches) -> dict[str, float]:
    """Two plain forwards of every decoder layer + XᵀX of each distinct input, in seconds."""
    import torch

    from reciprune.core.layers import find_decoder_layers
    from reciprune.pipelines.calibration import capture_layer_inputs

    _, layers = find_decoder_layers(model)
    inputs = capture_layer_inputs(model, layers[0], batches)
    forward = xtx = 0.0
    with torch.no_grad():
        for layer in layers:
            linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
            sums: dict[int, torch.Tensor] = {}
            for item in inputs:
                t0 = time.perf_counter()
                layer(item.hidden, **item.kwargs)
                forward += time.perf_counter() - t0
                # An untimed third forward collects the distinct inputs; only XᵀX is timed.
                distinct: dict[int, torch.Tensor] = {}
                def collect(_module, args, distinct=distinct):
                    distinct.setdefault(id(args[0]), args[0])

                handles = [m.register_forward_pre_hook(collect) for m in linears]
                layer(item.hidden, **item.kwargs)
                for handle in handles:
                    handle.remove()
                order = list(distinct.values())
                t0 = time.perf_counter()
                for k, x in enumerate(order):
                    flat = x.reshape(-1, x.shape[-1])
                    if k not in sums:
                        sums[k] = torch.zeros(flat.shape[1], flat.shape[1])
                    sums[k].addmm_(flat.t(), flat)
                xtx += time.perf_counter() - t0
            for item in inputs:
                t0 = time.perf_counter()
                out = layer(item.hidden, **item.kwargs)
                forward += time.perf_counter() - t0
                item.hidden = out[0] if isinstance(out, tuple) else out
    return {"forward": forward, "xtx": xtx, "floor": forward + xtx}


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from reciprune.modifiers import get_modifier_class
    from reciprune.pipelines.oneshot import run_oneshot

    model, batches = _build(args.layers, args.samples, args.seq, args.batch)
    if args.method == "floor":
        print(json.dumps(_floor(model, batches)))
        return
    modifiers = [get_modifier_class(name)(**fields) for name, fields in METHODS[args.method]]
    t0 = time.perf_counter()
    result = run_oneshot(model, modifiers, batches, progress=False)
    wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"wall": wall, "peak_rss_mb": peak_mb, "timings": result.timings}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Small smoke run (2 layers, 32 seqs).")
    parser.add_argument("--methods", nargs="*", default=DEFAULT_METHODS, choices=list(METHODS))
    parser.add_argument("--threads", nargs="*", type=int, default=None, help="Default: 1 and all.")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)  # a METHODS key or floor
    parser.add_argument("--layers", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, default=128, help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, default=512, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--thread-count", dest="threads_one", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.threads = args.threads_one
        child(args)
        return
    layers, samples = (2, 32) if args.quick else (8, 128)
    thread_counts = args.threads or sorted({1, os.cpu_count() or 1})
    print(f"Llama hidden 512, {layers} layers, MLP 1376, calibration {samples}x512, batch 8")
    def run_child(method: str, threads: int) -> dict:
        cmd = [sys.executable, __file__, "--child", "--method", method, "--thread-count",
               str(threads), "--layers", str(layers), "--samples", str(samples)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    floors = {threads: run_child("floor", threads) for threads in thread_counts}
    for threads, floor in floors.items():
        print(f"floor at {threads} thread(s): {floor['floor']:.2f} s = two decoder forwards "
              f"{floor['forward']:.2f} s + distinct-input XᵀX {floor['xtx']:.2f} s")
    print(f"{'method':<16}{'threads':>8}{'wall s':>9}{'floor s':>9}{'ratio':>7}"
          f"{'peak RSS MB':>13}")
    for method in args.methods:
        for threads in thread_counts:
            r, floor = run_child(method, threads), floors[threads]["floor"]
            print(f"{method:<16}{threads:>8}{r['wall']:>9.2f}{floor:>9.2f}"
                  f"{r['wall'] / floor:>7.2f}{r['peak_rss_mb']:>13.0f}", flush=True)


if __name__ == "__main__":
    main()
