"""Wanda: pruning by weights and activations (Sun et al., 2023)."""

from __future__ import annotations

import torch
from torch import Tensor

from reciprune.algorithms.masks import _check_structure, nm_keep_mask, row_keep_mask


def wanda_scores(W: Tensor, x_sq_norm: Tensor) -> Tensor:
    """Wanda importance S_ij = |W_ij| · ‖X_j‖₂ in fp32, with `x_sq_norm` = ‖X_j‖₂² of shape [in].

    Sun, Liu, Bair & Kolter, "A Simple and Effective Pruning Approach for Large Language
    Models", 2023, eq. (1).
    """
    return W.detach().float().abs() * torch.sqrt(x_sq_norm.float()).reshape(1, -1)


def wanda_prune(
    W: Tensor, x_sq_norm: Tensor, sparsity: float, *, n: int = 0, m: int = 0
) -> tuple[Tensor, Tensor]:
    """Prune `W` [out, in] by Wanda; return (pruned W in W's dtype, keep mask).

    Sun, Liu, Bair & Kolter, "A Simple and Effective Pruning Approach for Large Language
    Models", 2023. Scores S_ij = |W_ij| · ‖X_j‖₂ (eq. 1) are compared per output row: each
    row prunes exactly int(in · sparsity) lowest scores (Sec. 3, "comparison group"). With
    N:M (keep convention: at most n non-zeros per m) the n highest of every m consecutive
    inputs are kept instead and `sparsity` is ignored. No weight update is made.
    """
    _check_structure(n, m, W.shape[-1])
    S = wanda_scores(W, x_sq_norm)
    keep = nm_keep_mask(S, n, m) if m else row_keep_mask(S, sparsity)
    return W.masked_fill(~keep, 0), keep
