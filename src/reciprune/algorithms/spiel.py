"""SpIEL: sparse fine-tuning by drop-and-grow of tuned indices (Ansell et al., 2024).

Ansell, Vulić, Sterz, Korhonen & Ponti, "Scaling Sparse Fine-Tuning to Large Language Models",
2024 (arXiv 2401.16405); reference implementation: the `sft` tuner of AlanAnsell/peft.

Each tuned weight matrix W keeps a flat array of `indices` η (positions in W's storage) and
their `values` φ (the deltas from the pretrained weights), and the model computes with

    W' = W + S(η, φ),        S(η, φ)_p = φ_i if p = η_i, else 0.

Training alternates (a) updating φ by the optimizer, (b) dropping the tuned indices whose
deltas have the smallest magnitude and (c) growing as many new ones: the untuned positions with
the largest gradient accumulated over a few steps (SpIEL-AG), whose deltas start at 0. The number
of tuned entries therefore never changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


def split_budget(
    sizes: Sequence[int],
    total_params: int,
    *,
    density: float | None = None,
    num_tunable_weights: int | None = None,
) -> list[int]:
    """The number of tunable entries k_m of each module, in proportion to its size n_m.

    The budget is K = ⌊d · N⌋ for a density d of the model's N = `total_params` parameters (as
    in the reference: a fraction of *all* parameters, placed in the targeted modules), or
    K = `num_tunable_weights`. Then k_m = ⌊K · n_m / Σ n⌋, and the K − Σ k_m entries that
    flooring leaves over go one each to the largest remainders (earlier modules first on
    ties), so Σ k_m = K exactly; the reference floors and drops them. Raises ValueError when
    K ≤ 0 or K > Σ n (more entries than the modules hold).
    """
    if (density is None) == (num_tunable_weights is None):
        raise ValueError("give exactly one of density and num_tunable_weights")
    budget = int(density * total_params) if density is not None else int(num_tunable_weights)
    capacity = sum(sizes)
    if budget <= 0:
        raise ValueError(f"the budget of tunable entries is {budget}; it must be positive")
    if budget > capacity:
        raise ValueError(
            f"the budget of {budget} tunable entries exceeds the {capacity} weights of the "
            "targeted modules"
        )
    shares = [budget * n / capacity for n in sizes]
    counts = [math.floor(s) for s in shares]
    order = sorted(range(len(sizes)), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in order[: budget - sum(counts)]:
        counts[i] += 1
    return counts


def drop_rate(step: int, total_steps: int, initial_rate: float) -> float:
    """The fraction ζ of tuned entries replaced at a reselection after `step` optimizer steps.

    ζ(t) = ζ₀ · (1 − t / T), decaying linearly from ζ₀ = `initial_rate` to 0 at the end of
    training T = `total_steps` (never negative). A reselection replaces ⌊ζ · k⌋ of k entries.
    """
    if total_steps <= 0:
        return 0.0
    return max(0.0, initial_rate * (1.0 - step / total_steps))


class DropGrow(NamedTuple):
    """What one drop-and-grow update changed.

    `indices`, `values`: the new η and φ (same length as before). `slots`: the positions in
    them that changed (their old entry was dropped; now hold a grown one with value 0), in
    order of increasing |old value|. `grown`: for each of `slots`, the position in the
    candidate arrays of the entry grown there (to seed its optimizer state).
    """

    indices: Tensor
    values: Tensor
    slots: Tensor
    grown: Tensor


def drop_and_grow(
    indices: Tensor, values: Tensor, candidates: Tensor, scores: Tensor, k: int
) -> DropGrow:
    """One SpIEL update of the tuned set: drop the k smallest |φ|, grow the k best candidates.

    drop  D = the k slots i with the smallest |φ_i|
    grow  G = the k candidates c ∉ η with the largest score s_c, where s_c = |Σ_t g_{t,c}| is
          the magnitude of c's gradient accumulated over the selection steps (SpIEL-AG)
    then  η_D ← G,  φ_D ← 0.

    `candidates` are flat positions (the few untuned entries whose gradient was accumulated:
    the dense gradient itself is never kept) and `scores` their s_c. A candidate already in η
    is never grown, including those being dropped by this update, so exactly k slots change;
    k shrinks to the number of eligible candidates when there are fewer. Ties go to the lower
    slot / the earlier candidate (stable sorts), so the result is deterministic.
    """
    eligible = torch.nonzero(~torch.isin(candidates, indices)).flatten()
    k = max(0, min(int(k), indices.numel(), eligible.numel()))
    by_magnitude = torch.sort(values.detach().abs(), stable=True).indices
    slots = by_magnitude[:k]
    best = torch.sort(scores[eligible], descending=True, stable=True).indices[:k]
    grown = eligible[best]
    new_indices = indices.clone()
    new_indices[slots] = candidates[grown].to(indices.dtype)
    new_values = values.detach().clone()
    new_values[slots] = 0
    return DropGrow(new_indices, new_values, slots, grown)


def top_candidates(
    grad: Tensor, indices: Tensor, n: int, excluded: Tensor | None = None
) -> Tensor:
    """The `n` untuned flat positions with the largest |gradient| (ascending positions).

    SpIEL-AG accumulates the gradient of a few candidates only: the reference takes them as the
    top-|g| entries of the first micro-batch's dense gradient `grad` of the selection phase.
    Tuned positions (`indices`) are excluded here, since they can never be grown, and so are the
    positions where `excluded` (bool, `grad`'s shape) is set, e.g. a sparse base's zeros.
    """
    scores = grad.detach().reshape(-1).abs().float()
    blocked = torch.zeros_like(scores, dtype=torch.bool)
    blocked[indices] = True
    if excluded is not None:
        blocked |= excluded.reshape(-1).to(blocked.device)
    scores[blocked] = -1.0  # below every |g|
    n = max(0, min(int(n), int((~blocked).sum())))
    return torch.sort(torch.topk(scores, n, sorted=False).indices).values


def sparse_delta(values: Tensor, indices: Tensor, shape: Sequence[int]) -> Tensor:
    """S(η, φ): a dense tensor of `shape` holding φ at the flat positions η, 0 elsewhere."""
    flat = values.new_zeros(math.prod(shape))
    return flat.index_add(0, indices, values).reshape(tuple(shape))


class _SparseDeltaProduct(torch.autograd.Function):
    """x · S(η, φ)ᵀ whose backward forms the dense gradient of W' only transiently."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        values: Tensor,
        indices: Tensor,
        shape: tuple[int, ...],
        transposed: bool,
        on_weight_grad: Callable[[Tensor], None] | None,
    ) -> Tensor:
        # S(η, φ) lives only for this product: autograd saves x and φ, not the dense delta.
        delta = sparse_delta(values.to(x.dtype), indices, shape)
        ctx.save_for_backward(x, values, indices)
        ctx.shape, ctx.transposed, ctx.on_weight_grad = shape, transposed, on_weight_grad
        return F.linear(x, delta.t() if transposed else delta)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, values, indices = ctx.saved_tensors
        grad_x = grad_values = None
        dtype = grad_out.dtype  # under autocast the output (and its gradient) may be bf16
        if ctx.needs_input_grad[0]:
            delta = sparse_delta(values.to(dtype), indices, ctx.shape)
            grad_x = (grad_out @ (delta.t() if ctx.transposed else delta)).to(x.dtype)
        if ctx.needs_input_grad[1] or ctx.on_weight_grad is not None:
            # ∂L/∂W' = Σ_tokens g_out xᵀ, in the weight's storage layout; dropped after use.
            rows = grad_out.reshape(-1, grad_out.shape[-1])
            grad_w = rows.t() @ x.reshape(-1, x.shape[-1]).to(dtype)
            if ctx.transposed:
                grad_w = grad_w.t()
            if ctx.on_weight_grad is not None:
                ctx.on_weight_grad(grad_w)
            if ctx.needs_input_grad[1]:
                grad_values = grad_w.reshape(-1)[indices].to(values.dtype)
        return grad_x, grad_values, None, None, None, None


def sparse_delta_product(
    x: Tensor,
    values: Tensor,
    indices: Tensor,
    shape: Sequence[int],
    *,
    transposed: bool = False,
    on_weight_grad: Callable[[Tensor], None] | None = None,
) -> Tensor:
    """The sparse delta's share of a linear layer's output: y' − y = x · S(η, φ)ᵀ.

    A Linear with weight W [out, in] computes y = x Wᵀ + b; with W' = W + S(η, φ) its output is
    y + x S(η, φ)ᵀ, so adding this to the layer's own output makes it compute with W'.
    `transposed`: W is stored [in, out] (GPT-2's Conv1D, y = x W + b) and η indexes that
    storage. Backward returns ∂L/∂φ_i = (∂L/∂W')_{η_i}, read off the dense ∂L/∂W' = Σ g xᵀ,
    which is formed for one layer at a time and freed at once; `on_weight_grad`, when given,
    receives it first (in W's storage layout) to reduce it to what it needs.
    """
    return _SparseDeltaProduct.apply(x, values, indices, tuple(shape), transposed, on_weight_grad)


def merge_sparse_delta(weight: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """W + S(η, φ) as a new tensor of W's dtype and shape (the sum taken in fp32)."""
    merged = weight.detach().float().reshape(-1).index_add(0, indices, values.detach().float())
    return merged.reshape(weight.shape).to(weight.dtype)
