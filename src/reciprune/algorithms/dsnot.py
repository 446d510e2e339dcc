"""DSnoT: training-free refinement of a sparse mask (Zhang et al., ICLR 2024)."""

from __future__ import annotations

import torch
from torch import Tensor

from reciprune.algorithms.masks import _check_structure, satisfies_nm


def dsnot_refine(
    W: Tensor,
    keep: Tensor,
    mean: Tensor,
    var: Tensor,
    x_sq_norm: Tensor,
    *,
    n: int = 0,
    m: int = 0,
    max_cycle_time: int = 50,
    update_threshold: float = 0.1,
    pow_of_var_regrowing: float = 1.0,
    pow_of_var_pruning: float = 0.0,
    without_same_sign: bool = True,
) -> Tensor:
    """Refine the keep mask of `W` [out, in] by DSnoT's prune-and-grow cycles; return the new mask.

    Zhang, Zhao, Lin, Yang, Xu, Lu, Ji & Ji, "Dynamic Sparse No Training: Training-Free
    Fine-tuning for Sparse LLMs", ICLR 2024 (Sec. 3; reference `prune_DSnoT` in zyxxmu/DSnoT).
    The weights are not changed: only which of them are kept.

    Per input channel j the caller gives, over the calibration tokens, the mean μ_j (`mean`),
    the variance Var_j (`var`) and ‖X_j‖₂² (`x_sq_norm`). Removing the pruned weights of row i
    changes its output by, in expectation, the reconstruction error

        e_i = Σ_{j pruned} W_ij μ_j.

    Every cycle, each row with |e_i| > `update_threshold` swaps one pruned weight for one kept:

        grow   r = argmax_{j pruned, sign(W_ij μ_j) = sign(e_i)}  |W_ij μ_j| / Var_j^γ
        prune  p = argmin_{j kept, sign(W_ij μ_j) = −sign(e_i)}  |W_ij| · ‖X_j‖₂ / Var_j^δ
        e_i ← e_i − W_ir μ_r + W_ip μ_p

    (γ = `pow_of_var_regrowing`, δ = `pow_of_var_pruning`), so both moves pull e_i towards 0.
    With N:M (keep convention: at most n kept per m consecutive inputs) the pruned partner p is
    the lowest Wanda score among the kept weights of r's M-block, of either sign, so every
    block keeps its count. A weight is swapped at most once: a regrown weight is never pruned
    again and a weight pruned by a cycle is never regrown, as in the reference's sorted lists.
    A row whose swap is rejected stops for good; the loop ends when every row has stopped or
    after `max_cycle_time` cycles. A swap is rejected when |e_i| ≤ `update_threshold`, when
    there is no candidate to grow or prune, or when the sign check is on and e_i after the swap
    would differ in sign from e_i before the first cycle. The check is on when
    `without_same_sign` is False, and always for N:M (the reference's N:M path ignores the flag).
    Only unstructured refinement with the sign check is sure to shrink every |e_i|: without it
    a swap can overshoot 0, and an N:M partner of e_i's sign pushes e_i away from 0.

    Differences from the reference, all deliberate:
    - Units: the reference accumulates Σ_t x_t / nsamples (seqlen · μ_j for sequences of seqlen
      tokens), so its e_i and `update_threshold` are seqlen times ours. The choices of r and p do
      not depend on this scale; to reproduce a reference threshold τ at seqlen L pass τ / L.
    - The reference walks pointers through lists sorted once; when a list is exhausted it walks
      into already-kept (or, for N:M, already-pruned) weights and changes a row's kept count.
      Here a row with no candidate stops, and N:M grows only in blocks that still have a weight
      to prune, so kept counts per row (and per block) never change.
    - `pow_of_var_pruning` is parsed but unused by the reference; the default 0 reproduces it.
    - N:M partners are chosen by Wanda score, the reference by its initial metric (the same when
      the initial mask comes from Wanda).
    - Var_j^γ is floored at the smallest normal float so constant channels do not divide by 0.
    """
    rows, columns = W.shape
    _check_structure(n, m, columns)
    if keep.shape != W.shape or keep.dtype != torch.bool:
        raise ValueError(
            f"DSnoT: keep must be a bool mask shaped like W {tuple(W.shape)}, "
            f"got {keep.dtype} {tuple(keep.shape)}"
        )
    for name, stat in (("mean", mean), ("var", var), ("x_sq_norm", x_sq_norm)):
        if stat.numel() != columns:
            raise ValueError(
                f"DSnoT: {name} needs one value per input channel ({columns}), got {stat.numel()}"
            )
    if max_cycle_time < 0 or update_threshold < 0:
        raise ValueError(
            "DSnoT: max_cycle_time and update_threshold must be non-negative, got "
            f"{max_cycle_time} and {update_threshold}"
        )
    if m and not satisfies_nm(keep, n, m):
        raise ValueError(f"DSnoT {n}:{m}: the initial keep mask is not {n}:{m} sparse")

    device = W.device
    W = W.detach().float()
    var = var.detach().to(device, torch.float32).reshape(1, -1)
    tiny = torch.finfo(torch.float32).tiny
    contribution = W * mean.detach().to(device, torch.float32).reshape(1, -1)  # W_ij μ_j
    growth = contribution
    if pow_of_var_regrowing:
        growth = contribution / var.pow(pow_of_var_regrowing).clamp_min(tiny)
    score = W.abs() * x_sq_norm.detach().to(device, torch.float32).sqrt().reshape(1, -1)
    if pow_of_var_pruning:
        score = score / var.pow(pow_of_var_pruning).clamp_min(tiny)
    sign_check = bool(m) or not without_same_sign

    keep = keep.to(device, copy=True)
    inf = torch.inf
    # Candidate keys: a weight leaves a pool when its key is set to ∓inf, so a regrown weight
    # is never pruned and a weight pruned by a cycle is never regrown.
    grow_up = growth.masked_fill(keep | (growth <= 0), -inf)  # e_i > 0: largest positive
    grow_down = (-growth).masked_fill(keep | (growth >= 0), -inf)  # e_i < 0: most negative
    if m:
        prune_key = score.masked_fill(~keep, inf)  # any sign, within the grown weight's block
        partners = keep.reshape(rows, -1, m).sum(dim=-1)
        no_partner = (partners == 0).repeat_interleave(m, dim=1)
        grow_up.masked_fill_(no_partner, -inf)
        grow_down.masked_fill_(no_partner, -inf)
        offsets = torch.arange(m, device=device)
    else:
        prune_up = score.masked_fill(~keep | (contribution >= 0), inf)  # e_i > 0: a negative
        prune_down = score.masked_fill(~keep | (contribution <= 0), inf)  # e_i < 0: a positive

    err = contribution.masked_fill(keep, 0).sum(dim=1)
    err_sign = err.sign()
    active = err.abs() > update_threshold

    for _ in range(max_cycle_time):
        i = active.nonzero().squeeze(1)  # only the rows still swapping are touched
        if not i.numel():
            break
        up = (err[i] > 0).unsqueeze(1)  # e_i ≠ 0 here since update_threshold ≥ 0
        grow_val, r = torch.where(up, grow_up[i], grow_down[i]).max(dim=1)
        if m:
            block = (r - r % m).unsqueeze(1) + offsets
            prune_val, q = prune_key[i.unsqueeze(1), block].min(dim=1)
            p = block.gather(1, q.unsqueeze(1)).squeeze(1)
        else:
            prune_val, p = torch.where(up, prune_up[i], prune_down[i]).min(dim=1)

        err_after = err[i] + contribution[i, p] - contribution[i, r]
        ok = (grow_val > -inf) & (prune_val < inf)
        if sign_check:
            ok &= err_after.sign() == err_sign[i]
        i, r, p, err_after = i[ok], r[ok], p[ok], err_after[ok]

        keep[i, r] = True
        keep[i, p] = False
        grow_up[i, r] = -inf
        grow_down[i, r] = -inf
        if m:
            prune_key[i, p] = inf
            partners[i, r // m] -= 1
            # A block with nothing left to prune can grow no more.
            done = partners[i, r // m] == 0
            block = (r[done] - r[done] % m).unsqueeze(1) + offsets
            grow_up[i[done].unsqueeze(1), block] = -inf
            grow_down[i[done].unsqueeze(1), block] = -inf
        else:
            prune_up[i, p] = inf
            prune_down[i, p] = inf
        err[i] = err_after
        active = torch.zeros_like(active)
        active[i] = err_after.abs() > update_threshold

    return keep


def merge_channel_moments(
    count_a: int, mean_a: Tensor, m2_a: Tensor, count_b: int, mean_b: Tensor, m2_b: Tensor
) -> tuple[int, Tensor, Tensor]:
    """Merge per-channel (count, mean, M2) of two token sets; var = M2 / count (population).

    Chan, Golub & LeVeque, "Updating Formulae and a Pairwise Algorithm for Computing Sample
    Variances", 1979. With δ = μ_b − μ_a and n = n_a + n_b:

        μ = μ_a + δ · n_b / n,    M2 = M2_a + M2_b + δ² · n_a · n_b / n

    where M2 = Σ_t (x_t − μ)² over the set's tokens. For a batch X [tokens, in] use
    (tokens, X.mean(0), ((X − X.mean(0))²).sum(0)); start from (0, zeros, zeros). Unlike a
    token-weighted average of batch variances (what the DSnoT reference accumulates), this
    counts the spread between batch means, and it avoids the cancellation of E[x²] − E[x]².
    """
    count = count_a + count_b
    if count_a == 0:
        return count_b, mean_b, m2_b
    if count_b == 0:
        return count_a, mean_a, m2_a
    delta = mean_b - mean_a
    mean = mean_a + delta * (count_b / count)
    m2 = m2_a + m2_b + delta.square() * (count_a * count_b / count)
    return count, mean, m2
