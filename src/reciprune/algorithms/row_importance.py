"""Row-sparse fine-tuning: which output rows of a weight matrix learn, and the row delta.

Li & Bhaskara, "An Efficient Sparse Fine-Tuning with Low Quantization Error via Neural Network
Pruning" (OpenReview w3b67v5EzD, arXiv 2502.11439). As in structural pruning, each output
neuron (row i of W ∈ R^{d_out×d_in}) gets an importance score; only the r most important rows
of every layer are fine-tuned, through a dense ΔW ∈ R^{r×d_in}:

    h = W x + S_R (ΔW x),        W' = W + S_R ΔW   (merge)

where R is the set of chosen rows and S_R scatters r values into rows R.

Row importance:

    taylor / zo_taylor:  I_i = Σ_j |W_ij g_ij|   (first-order Taylor, Molchanov et al. 2019)
    l2:                  I_i = ‖W_i‖₂
    magnitude:           I_i = Σ_j |W_ij|

For `zo_taylor`, g is the zeroth-order (SPSA / MeZO) estimate, from forward passes only:

    ĝ = (1/n) Σ_{k=1..n} p_k z_k,   p_k = (L(θ + ε z_k) − L(θ − ε z_k)) / 2ε,   z_k ~ N(0, I)

Each z_k is regenerated from a seed when needed (MeZO), so the estimate costs no memory for the
z's and ĝ can be rebuilt one weight at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

#: Seeds of z_k for different (k, weight) pairs are distinct while both are below this.
_SEED_STRIDE = 1_000_003


def perturbation_seed(seed: int, k: int, index: int) -> int:
    """The seed of z_k for the `index`-th perturbed weight (distinct for k, index < 10⁶)."""
    return ((seed * _SEED_STRIDE + k) * _SEED_STRIDE + index) % (2**63 - 1)


def perturbation(weight: Tensor, seed: int, k: int, index: int) -> Tensor:
    """z_k ~ N(0, I) in float32 for one weight, regenerated from its seed on the weight's device."""
    generator = torch.Generator(device=weight.device).manual_seed(perturbation_seed(seed, k, index))
    return torch.randn(weight.shape, generator=generator, device=weight.device, dtype=torch.float32)


@torch.no_grad()
def zo_projected_gradients(
    weights: Sequence[Tensor],
    loss: Callable[[], Tensor | float],
    *,
    n_estimate: int,
    eps: float = 1e-3,
    seed: int = 0,
) -> Tensor:
    """p_k = (L(θ + εz_k) − L(θ − εz_k)) / 2ε for k = 1..n, as a float64 [n] tensor.

    `weights` are perturbed in place and `loss()` evaluated under `torch.no_grad()` (forward
    only: no graph, no activations kept). θ is restored bit-exactly from a copy (on the CPU,
    sparing accelerator memory) before each perturbation and at the end, even when `loss`
    raises: subtracting εz again would not give θ back in floating point.
    """
    if n_estimate < 1:
        raise ValueError(f"n_estimate must be at least 1, got {n_estimate}")
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    backup = [w.detach().to("cpu", copy=True) for w in weights]

    def restore() -> None:
        for w, saved in zip(weights, backup, strict=True):
            w.copy_(saved)

    def perturb(k: int, scale: float) -> None:
        for i, w in enumerate(weights):
            # Summed in at least float32, so a bf16 weight rounds once, after the sum.
            dtype = torch.promote_types(w.dtype, torch.float32)
            z = perturbation(w, seed, k, i).to(dtype)
            w.copy_((w.to(dtype) + (scale * eps) * z).to(w.dtype))

    projected = torch.zeros(n_estimate, dtype=torch.float64)
    try:
        for k in range(n_estimate):
            perturb(k, +1.0)
            loss_plus = float(loss())
            restore()
            perturb(k, -1.0)
            loss_minus = float(loss())
            restore()
            projected[k] = (loss_plus - loss_minus) / (2 * eps)
    finally:
        restore()
    return projected


def zo_gradient(weight: Tensor, index: int, projected: Tensor, *, seed: int = 0) -> Tensor:
    """ĝ = (1/n) Σ_k p_k z_k for the `index`-th weight of `zo_projected_gradients` (float32)."""
    n = projected.numel()
    g = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    for k in range(n):
        g.add_(perturbation(weight, seed, k, index), alpha=float(projected[k]) / n)
    return g


def zo_taylor_gradient(
    weights: Sequence[Tensor],
    loss: Callable[[], Tensor | float],
    *,
    n_estimate: int,
    eps: float = 1e-3,
    seed: int = 0,
) -> list[Tensor]:
    """The zeroth-order gradient estimate ĝ of every weight (see the module docstring)."""
    projected = zo_projected_gradients(weights, loss, n_estimate=n_estimate, eps=eps, seed=seed)
    return [zo_gradient(w, i, projected, seed=seed) for i, w in enumerate(weights)]


def taylor_row_scores(W: Tensor, g: Tensor) -> Tensor:
    """I_i = Σ_j |W_ij g_ij| for W, g ∈ R^{d_out×d_in} (float32)."""
    return (W.detach().float() * g.detach().float()).abs().sum(dim=1)


def l2_row_scores(W: Tensor) -> Tensor:
    """I_i = ‖W_i‖₂ (float32)."""
    return W.detach().float().norm(dim=1)


def magnitude_row_scores(W: Tensor) -> Tensor:
    """I_i = Σ_j |W_ij| (float32)."""
    return W.detach().float().abs().sum(dim=1)


def rows_to_finetune(d_out: int, *, rank: int | None = None, ratio: float | None = None) -> int:
    """r: `rank` itself, or ⌊ratio·d_out⌋ (at least 1, as in the reference's ratio mode)."""
    if (rank is None) == (ratio is None):
        raise ValueError("give exactly one of rank and ratio")
    if rank is not None:
        return rank
    assert ratio is not None
    return max(1, min(d_out, math.floor(ratio * d_out)))


def top_rows(scores: Tensor, r: int) -> Tensor:
    """Indices R of the r highest scores, ascending (ties: the lower index wins)."""
    if not 0 < r <= scores.numel():
        raise ValueError(f"cannot choose {r} rows out of {scores.numel()}")
    order = torch.argsort(scores, descending=True, stable=True)
    return order[:r].sort().values


def add_row_delta(h: Tensor, x: Tensor, delta: Tensor, rows: Tensor) -> Tensor:
    """h + S_R(ΔW x): `h` [..., d_out] is W x, `x` [..., d_in], ΔW [r, d_in], R [r].

    ΔW x runs in ΔW's dtype and is added to h in h's dtype (out of place, so autograd sees it).
    """
    update = torch.nn.functional.linear(x.to(delta.dtype), delta)
    return h.index_add(h.dim() - 1, rows, update.to(h.dtype))


def merge_row_delta(W: Tensor, delta: Tensor, rows: Tensor) -> Tensor:
    """W' = W + S_R ΔW, summed in float32 and returned in W's dtype (a new tensor)."""
    merged = W.float().clone()
    merged[rows] += delta.float()
    return merged.to(W.dtype)


def base_zero_mask(W: Tensor, rows: Tensor) -> Tensor:
    """M = (W_R ≠ 0): ΔW ⊙ M keeps a sparse base's zeros zero through the merge."""
    return W[rows] != 0
