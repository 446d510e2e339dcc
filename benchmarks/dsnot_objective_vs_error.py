"""Does DSnoT's objective track the true reconstruction error? Layer 0 of the embedded SmolLM2.

For q/k/v of the first decoder layer (whose inputs need no earlier layer), on embedded calibration
text: the true relative output error ‖(W − W')X‖²/‖WX‖² and DSnoT's objective Σ_i e_i² (the
expected error through the channel means μ) after Wanda alone and after Wanda + DSnoT, with and
without the sign check.

    python benchmarks/dsnot_objective_vs_error.py [--sparsity 0.6] [--samples 16]
"""

from __future__ import annotations

import argparse

import torch

from reciprune.algorithms.dsnot import dsnot_refine
from reciprune.algorithms.wanda import wanda_prune
from reciprune.data import load_calibration
from reciprune.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.6, help="Wanda sparsity.")
    parser.add_argument("--samples", type=int, default=16, help="Calibration sequences of 512.")
    args = parser.parse_args()
    model, tokenizer, _ = load_model(None)
    data = load_calibration(None, tokenizer, num_samples=args.samples, max_seq_length=512)
    layer = model.model.layers[0]
    with torch.no_grad():
        hidden = layer.input_layernorm(model.model.embed_tokens(data.input_ids))
    X = hidden.reshape(-1, hidden.shape[-1]).double()
    mu, var, sq_norm = X.mean(0), X.var(0, unbiased=False), (X**2).sum(0)
    print(f"mean |μ_j| / σ_j over input channels: {(mu.abs() / var.sqrt()).mean():.3f}")
    print(f"{'module':<8}{'mask':<26}{'true rel. error':>16}{'Σ e_i²':>12}{'swaps':>8}")
    for name in ("q_proj", "k_proj", "v_proj"):
        W = getattr(layer.self_attn, name).weight.detach().double()
        _, keep = wanda_prune(W.float(), sq_norm.float(), args.sparsity)

        def report(
            label: str, mask: torch.Tensor, name: str = name, W: torch.Tensor = W,
            initial: torch.Tensor = keep,
        ) -> None:
            removed = W * ~mask
            true_error = ((removed @ X.T) ** 2).sum() / ((W @ X.T) ** 2).sum()
            objective = (removed @ (mu * 512)).pow(2).sum()
            swaps = int((mask != initial).sum()) // 2
            print(f"{name:<8}{label:<26}{true_error:>16.5f}{objective:>12.3f}{swaps:>8}")

        report("wanda", keep)
        for check_sign in (False, True):
            refined = dsnot_refine(W.float(), keep, (mu * 512).float(), var.float(),
                                   sq_norm.float(), without_same_sign=not check_sign)
            report(f"+dsnot (sign check {'on' if check_sign else 'off'})", refined)


if __name__ == "__main__":
    main()
