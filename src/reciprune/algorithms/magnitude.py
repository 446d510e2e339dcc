"""Magnitude pruning and the gradual (cubic) sparsity schedule."""

from __future__ import annotations

from torch import Tensor

from reciprune.algorithms.masks import _check_structure, nm_keep_mask, tensor_keep_mask


def magnitude_prune(W: Tensor, sparsity: float, *, n: int = 0, m: int = 0) -> tuple[Tensor, Tensor]:
    """Prune the smallest |W|; return (pruned W in W's dtype, keep mask).

    Han, Pool, Tran & Dally, "Learning both Weights and Connections for Efficient Neural
    Networks", 2015 (as in SparseML's magnitude pruning): one threshold over the whole tensor,
    pruning exactly int(numel · sparsity) weights of lowest |W_ij|. With N:M (keep convention:
    at most n non-zeros per m) the n largest |W_ij| of every m consecutive inputs are kept and
    `sparsity` is ignored.
    """
    _check_structure(n, m, W.shape[-1])
    scores = W.detach().abs()
    keep = nm_keep_mask(scores, n, m) if m else tensor_keep_mask(scores, sparsity)
    return W.masked_fill(~keep, 0), keep


def cubic_sparsity(
    step: int, start: int, end: int, init_sparsity: float, final_sparsity: float
) -> float:
    """Gradual pruning schedule of Zhu & Gupta, "To prune, or not to prune", 2017, eq. (1).

        s_t = s_f + (s_i − s_f) · (1 − (t − t₀) / (end − t₀))³     for t₀ ≤ t ≤ end,

    with s_t = s_i before `start` (t₀) and s_t = s_f from `end` on (also when start == end).
    """
    if end < start:
        raise ValueError(f"cubic sparsity schedule: end ({end}) is before start ({start})")
    if step >= end:
        return final_sparsity
    if step <= start:
        return init_sparsity
    progress = (step - start) / (end - start)
    return final_sparsity + (init_sparsity - final_sparsity) * (1.0 - progress) ** 3
