"""Seconds per decoder layer of the SparseGPT and GPTQ solves: one solve per module vs the modules
that share an input stacked into one solve, and on CUDA plain launches vs CUDA graphs.

A layer of Llama-2-7B's shapes by default (q/k/v/o 4096×4096, gate/up 11008×4096, down
4096×11008; --hidden / --intermediate shrink it, e.g. 1024 / 2816 for a CPU run of seconds;
GPTQ's groups of 128 need both to be multiples of 128).
Weights are random in --dtype, each input's Hessian H = 2/N XᵀX from N = 2·in random correlated
tokens. Solves: q/k/v share H (one stack), o alone, gate/up share H, down alone. Methods:
SparseGPT unstructured 50%, SparseGPT 2:4, GPTQ int4 symmetric groups of 128 (min-max).

Every variant's weights are compared with the per-module plain solve's: "same" says whether
all of them are equal bit for bit (stacking is exact by construction; a graph replays the same
kernels). Timings exclude a warm-up pass of every variant on a small layer (library set-up,
cuBLAS handles); each is the best of --repeats.

    python benchmarks/solve_bench.py --hidden 1024 --intermediate 2816 --device cpu --threads 2
    python benchmarks/solve_bench.py            # on a GPU: Llama-2-7B shapes, graphs too
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor

GPTQ_GROUP = 128


def layer_shapes(hidden: int, intermediate: int) -> list[list[tuple[str, int, int]]]:
    """Module (name, out, in) by shared input: q/k/v, o, gate/up, down."""
    return [
        [("q_proj", hidden, hidden), ("k_proj", hidden, hidden), ("v_proj", hidden, hidden)],
        [("o_proj", hidden, hidden)],
        [("gate_proj", intermediate, hidden), ("up_proj", intermediate, hidden)],
        [("down_proj", hidden, intermediate)],
    ]


def make_layer(hidden: int, intermediate: int, dtype: torch.dtype, device: str, seed: int = 0):
    """[(H, [W of each module])] per shared input, random and seeded."""
    g = torch.Generator(device=device).manual_seed(seed)
    layer = []
    for modules in layer_shapes(hidden, intermediate):
        columns = modules[0][2]
        X = torch.randn(2 * columns, columns, generator=g, device=device)
        X += 0.5 * torch.randn(2 * columns, 1, generator=g, device=device)  # correlated inputs
        H = 2 / X.shape[0] * (X.T @ X)
        del X
        Ws = [torch.randn(rows, cols, generator=g, device=device).to(dtype) for _, rows, cols in modules]
        layer.append((H, Ws))
    return layer


def solver(method: str, blocksize: int) -> Callable[[list[Tensor], Tensor, bool], list[Tensor]]:
    """solve(Ws, H, cuda_graph) -> the solved weights of the stack, for one method."""
    from reciprune.algorithms.gptq import gptq_quantize_stacked
    from reciprune.algorithms.sparsegpt import sparsegpt_prune_stacked

    if method.startswith("sparsegpt"):
        n, m = (2, 4) if method.endswith("2:4") else (0, 0)

        def prune(Ws: list[Tensor], H: Tensor, graph: bool) -> list[Tensor]:
            solved = sparsegpt_prune_stacked(
                Ws, H, [0.5] * len(Ws), n=n, m=m, blocksize=blocksize, cuda_graph=graph
            )
            return [W for W, _ in solved]

        return prune

    from compressed_tensors.quantization import QuantizationArgs

    from reciprune.algorithms.observers import ObserverColumnQuantizer

    args = QuantizationArgs(num_bits=4, symmetric=True, strategy="group", group_size=GPTQ_GROUP)

    def quantize(Ws: list[Tensor], H: Tensor, graph: bool) -> list[Tensor]:
        quantizer = ObserverColumnQuantizer(args, "minmax", Ws[0].dtype)
        solved = gptq_quantize_stacked(
            Ws, H, quantizer, blocksize=blocksize, group_size=GPTQ_GROUP, cuda_graph=graph
        )
        return [Q for Q, _ in solved]

    return quantize


def run_layer(layer, solve, stacked: bool, graph: bool) -> list[Tensor]:
    """Solve every module of the layer; the solved weights in module order."""
    out = []
    for H, Ws in layer:
        if stacked:
            out += solve(Ws, H, graph)
        else:
            for W in Ws:
                out += solve([W], H, graph)
    return out


def timed(fn: Callable[[], list[Tensor]], device: str, repeats: int) -> tuple[float, list[Tensor]]:
    """Best wall time of `repeats` calls, synchronised on CUDA, and the last result."""
    best, result = float("inf"), []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--blocksize", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--methods", default="sparsegpt-50%,sparsegpt-2:4,gptq-w4-g128",
        help="comma-separated subset of sparsegpt-50%%, sparsegpt-2:4, gptq-w4-g128",
    )
    opts = parser.parse_args(argv)
    if "gptq" in opts.methods and (opts.hidden % GPTQ_GROUP or opts.intermediate % GPTQ_GROUP):
        parser.error(f"GPTQ groups of {GPTQ_GROUP}: --hidden and --intermediate must be multiples of it")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    dtype = getattr(torch, opts.dtype)
    cuda = opts.device.startswith("cuda")
    variants = [("separate", False, False), ("stacked", True, False)]
    if cuda:
        variants += [("separate+graph", False, True), ("stacked+graph", True, True)]

    layer = make_layer(opts.hidden, opts.intermediate, dtype, opts.device)
    small = make_layer(256, 512, dtype, opts.device, seed=1)  # warm-up
    where = torch.cuda.get_device_name(opts.device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(
        f"solve_bench: hidden {opts.hidden}, intermediate {opts.intermediate}, {opts.dtype}, "
        f"blocksize {opts.blocksize}, {where}, torch {torch.__version__}; seconds per layer"
    )
    print("| method | " + " | ".join(name for name, _, _ in variants) + " | same |")
    print("|---" * (len(variants) + 2) + "|")
    for method in opts.methods.split(","):
        solve = solver(method.strip(), opts.blocksize)
        for _, stacked, graph in variants:
            run_layer(small, solve, stacked, graph)  # warm-up
        seconds, same, reference = [], True, None
        for _, stacked, graph in variants:
            t, result = timed(
                lambda f=solve, s=stacked, g=graph: run_layer(layer, f, s, g), opts.device, opts.repeats
            )
            seconds.append(t)
            if reference is None:
                reference = result
            else:
                same = same and all(torch.equal(a, b) for a, b in zip(reference, result, strict=True))
        cells = " | ".join(f"{t:.3f}" for t in seconds)
        print(f"| {method} | {cells} | {'yes' if same else 'NO'} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
