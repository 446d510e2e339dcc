"""Keep masks: which weights survive pruning.

A keep mask is a bool tensor shaped like the weight, True = kept, False = pruned (zeroed).
"N:M" follows the NVIDIA convention: at most N non-zeros in every M consecutive weights along
the input dimension (the last dimension), i.e. M - N of every M are pruned.
"""

from __future__ import annotations

import torch
from torch import Tensor


def parse_mask_structure(structure: str) -> tuple[int, int]:
    """Parse "unstructured" to (0, 0) and "N:M" to (N, M) with 0 < N < M; else ValueError."""
    text = structure.strip()
    if text.lower() == "unstructured":
        return 0, 0
    parts = text.split(":")
    if len(parts) != 2:
        raise ValueError(
            f"mask structure {structure!r} is not understood; use 'unstructured' or 'N:M' "
            "such as '2:4' (keep at most N of every M consecutive weights)"
        )
    try:
        n, m = int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(
            f"mask structure {structure!r}: N and M must be integers, as in '2:4'"
        ) from None
    if n <= 0:
        raise ValueError(
            f"mask structure {structure!r}: N (weights kept per group) must be at least 1"
        )
    if n >= m:
        raise ValueError(
            f"mask structure {structure!r}: N must be smaller than M "
            "(N is how many of every M weights are kept), as in '2:4'"
        )
    return n, m


def nm_keep_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep the `n` highest scores in every group of `m` consecutive columns of each row."""
    in_features = scores.shape[-1]
    _check_structure(n, m, in_features)
    if not m:
        raise ValueError("nm_keep_mask needs an N:M structure, got n=0, m=0")
    groups = scores.reshape(*scores.shape[:-1], in_features // m, m)
    keep = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(scores.shape)


def row_keep_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Per output row, prune exactly int(in_features * sparsity) lowest scores (Wanda's group)."""
    k = int(scores.shape[-1] * sparsity)
    keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if k > 0:
        # topk without sorting is a selection, several times faster than a full sort.
        lowest = scores.topk(k, dim=-1, largest=False, sorted=False).indices
        # scatter_ of a constant, not keep[lowest] = False: that copies a host scalar to the
        # device, which a CUDA graph capture (SparseGPT's block) does not allow.
        keep.scatter_(-1, lowest, False)
    return keep


def tensor_keep_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Prune exactly int(numel * sparsity) lowest scores over the whole tensor."""
    return row_keep_mask(scores.flatten(), sparsity).reshape(scores.shape)


def mask_sparsity(mask: Tensor) -> float:
    """Fraction of pruned (False) entries in a keep mask."""
    return 1.0 - mask.count_nonzero().item() / mask.numel()


def satisfies_nm(weight_or_mask: Tensor, n: int, m: int) -> bool:
    """True when every group of `m` consecutive entries along the last dim has at most `n` non-zeros.

    Accepts a weight (non-zero = kept) or a keep mask; a last dim not divisible by `m` cannot
    satisfy the structure and gives False.
    """
    in_features = weight_or_mask.shape[-1]
    if in_features % m:
        return False
    nonzero = (weight_or_mask != 0).reshape(-1, in_features // m, m)
    return bool((nonzero.sum(dim=-1) <= n).all())


def _check_structure(n: int, m: int, in_features: int) -> None:
    """Raise ValueError unless (n, m) is unstructured (0, 0) or a valid N:M for `in_features`."""
    if (n, m) == (0, 0):
        return
    if not 0 < n < m:
        raise ValueError(f"N:M sparsity needs 0 < N < M, got n={n}, m={m}")
    if in_features % m:
        raise ValueError(
            f"{n}:{m} sparsity needs the input dimension to be a multiple of {m}, got {in_features}"
        )
