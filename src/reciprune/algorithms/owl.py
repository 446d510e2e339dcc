"""OWL: outlier-weighed layerwise sparsity (Yin et al., ICML 2024)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def outlier_ratio(scores: Tensor, M: float) -> float:
    """Layerwise outlier distribution D_l: the share of `scores` strictly above M × their mean.

    Yin, Wu, Zhang, Hsieh, Wang, Jia, Pechenizkiy, Liang, Wang & Liu, "Outlier Weighed
    Layerwise Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs to High Sparsity",
    ICML 2024, Sec. 3 (LOD); reference `check_outlier_mean` in luuyin/OWL. `scores` are the Wanda
    scores |W_ij| · ‖X_j‖₂ of all Linear modules of one decoder layer, concatenated (any shape;
    they are flattened). Returns a fraction in [0, 1]; the reference returns a percentage,
    which `owl_layer_sparsities` cannot tell apart (its min–max step is scale-free).
    """
    scores = scores.detach().flatten().float()
    if scores.numel() == 0:
        raise ValueError("OWL: outlier_ratio needs at least one score")
    threshold = M * scores.mean(dtype=torch.float64).item()
    return (scores > threshold).count_nonzero().item() / scores.numel()


def owl_layer_sparsities(ratios: Sequence[float], target: float, lmbda: float) -> list[float]:
    """Per-layer sparsities S_l from outlier ratios D_l: more outliers, less pruning.

    Yin et al., ICML 2024, Sec. 3 ("S_l = 1 − D_l", constrained to S_l ∈ [S − λ, S + λ]);
    reference `prune_wanda_outlier` in luuyin/OWL. The ratios are min–max normalised to
    [0, 2λ], centred on their mean, and added to the target density:

        D̂_l = 2λ (D_l − min D) / (max D − min D),   1 − S_l = (1 − S) + D̂_l − mean(D̂)

    so S_l spans a range of width 2λ and the plain mean over layers of S_l is `target` (up to
    float rounding); decoder layers all have the same size, so this is also the parameter-
    weighted mean. Equal ratios give every layer `target` (the reference divides by zero).
    The reference silently sets S_l ≤ 0 to 0.01, which moves the mean; here any S_l outside
    [0, 1) raises ValueError instead, so lower λ or move the target.
    """
    if not ratios:
        raise ValueError("OWL: need the outlier ratio of at least one layer")
    if not 0.0 <= target < 1.0:
        raise ValueError(f"OWL: target sparsity must be in [0, 1), got {target}")
    if lmbda < 0:
        raise ValueError(f"OWL: lmbda must be non-negative, got {lmbda}")
    centred = _centred(ratios, 2 * lmbda)
    sparsities = [target - d for d in centred]
    outside = [(i, s) for i, s in enumerate(sparsities) if not 0.0 <= s < 1.0]
    if outside:
        i, s = outside[0]
        raise ValueError(
            f"OWL: target {target} with lmbda {lmbda} gives layer {i} sparsity {s:.4f}, outside "
            f"[0, 1) ({len(outside)} layer(s) in all); clipping would move the mean sparsity, "
            f"so lower lmbda (at most {min(target, 1 - target) / 2:.4f} is always safe)"
        )
    return sparsities


def owl_layer_nm(ratios: Sequence[float], n: int, m: int, lmbda: float) -> list[int]:
    """Per-layer N (kept weights of every M) from outlier ratios D_l: more outliers, larger N.

    Yin et al., ICML 2024, N:M results; reference `prune_wanda_outlier_structure` in
    luuyin/OWL (its README uses λ = 2 for N:M). With keep convention (n of every m kept):

        D̂_l = λ (D_l − min D) / (max D − min D),   N_l = n + round(D̂_l − mean(D̂))

    with round half to even, as numpy. Note the normalisation is to [0, λ], not [0, 2λ] as in
    the unstructured case, and the rounding means the mean of N_l is not n in general. Equal
    ratios give every layer n. An N_l outside [1, m − 1] raises ValueError (the reference would
    leave a layer dense or prune it entirely); lower λ.
    """
    if not ratios:
        raise ValueError("OWL: need the outlier ratio of at least one layer")
    if not 0 < n < m:
        raise ValueError(f"OWL N:M needs 0 < N < M, got n={n}, m={m}")
    if lmbda < 0:
        raise ValueError(f"OWL: lmbda must be non-negative, got {lmbda}")
    per_layer = [n + round(d) for d in _centred(ratios, lmbda)]
    outside = [(i, k) for i, k in enumerate(per_layer) if not 0 < k < m]
    if outside:
        i, k = outside[0]
        raise ValueError(
            f"OWL {n}:{m} with lmbda {lmbda} gives layer {i} N = {k}, outside [1, {m - 1}] "
            f"({len(outside)} layer(s) in all); lower lmbda"
        )
    return per_layer


def _centred(ratios: Sequence[float], width: float) -> list[float]:
    """Min–max normalise `ratios` to [0, width] and subtract their mean; all 0 if they are equal."""
    low, high = min(ratios), max(ratios)
    if high == low:
        return [0.0] * len(ratios)
    # Same operation order as the reference, so N_l rounds the same way at .5 boundaries.
    scaled = [(d - low) * (1 / (high - low) * width) for d in ratios]
    mean = sum(scaled) / len(scaled)
    return [d - mean for d in scaled]
