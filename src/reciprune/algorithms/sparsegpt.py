"""SparseGPT one-shot pruning (Frantar & Alistarh, 2023)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from itertools import accumulate

import torch
from torch import Tensor

from reciprune.algorithms.block_graph import BlockGraph
from reciprune.algorithms.hessian import dampened_inverse_cholesky, zero_dead_inputs
from reciprune.algorithms.masks import _check_structure, nm_keep_mask, tensor_keep_mask


def sparsegpt_prune(
    W: Tensor,
    H: Tensor,
    sparsity: float,
    *,
    n: int = 0,
    m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    cuda_graph: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Prune `W` [out, in] with SparseGPT; return (pruned W in W's dtype, keep mask).

    Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
    One-Shot", ICML 2023 (Algorithm 1; reference `fasterprune` in IST-DASLab/sparsegpt).

    `H = 2/N Σ XᵀX` is the layer Hessian [in, in], used as given. With dead inputs
    (H_jj = 0) set to H_jj = 1 and W[:, j] = 0, and dampening λ = percdamp · mean(diag H):

        Hinv = cholesky((H + λI)⁻¹, upper=True)          (rows of the OBS inverses, eq. 4)

    Columns are visited left to right in blocks of `blocksize`. The mask is chosen adaptively
    from the current (already updated) weights by the OBS saliency

        ε_ij = W_ij² / [Hinv]_jj²

    once per rows × block slice for unstructured sparsity (prune the int(numel · sparsity)
    lowest), or every `m` columns for N:M (keep the `n` highest of each group). Each pruned
    column i then compensates the weights to its right:

        q = w ⊙ mask,   err = (w − q) / [Hinv]_ii,   W[:, i:] −= err ⊗ Hinv[i, i:]

    applied within the block, and lazily to the columns after the block as
    W[:, i2:] −= Err @ Hinv[i1:i2, i2:].

    `n`, `m` use the keep convention (N:M = at most n non-zeros per m; the reference's
    `prunen` is m − n). With n = m = 0 the pruning is unstructured at `sparsity`; with N:M,
    `sparsity` is ignored. Unlike the reference (`tmp <= sorted[k]`, which prunes k + 1 and
    ties), each block prunes exactly k = int(numel · sparsity) weights.

    `cuda_graph`: replay each block's column loop as one CUDA graph (None: when W is on CUDA);
    the same kernels, launched once per block instead of a few per column.
    """
    [(pruned, keep)] = sparsegpt_prune_stacked(
        [W], H, [sparsity], n=n, m=m, blocksize=blocksize, percdamp=percdamp, cuda_graph=cuda_graph
    )
    return pruned, keep


def sparsegpt_prune_stacked(
    Ws: Sequence[Tensor],
    H: Tensor,
    sparsities: Sequence[float],
    *,
    n: int = 0,
    m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    cuda_graph: bool | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """SparseGPT on several matrices W_k [out_k, in] that read the same input (one Hessian H),
    as one solve; returns (pruned W_k in its dtype, keep mask) for each, as `sparsegpt_prune`
    would, each W_k at its own `sparsities[k]`.

    Every step of `sparsegpt_prune` acts on the rows independently once Hinv is known: the
    saliency ε_ij = W_ij² / [Hinv]_jj², the N:M choice within a row, the update
    W[r, i:] −= err_r · Hinv[i, i:] and the lazy W[r, i2:] −= Err[r, :] @ Hinv[i1:i2, i2:].
    So the rows of W = [W_1; …; W_K] are solved together with one dampened inverse Cholesky
    and one pass over the columns (q/k/v of an attention block, gate/up of an MLP). The one
    step that couples rows is the unstructured mask, int(numel · sparsity) lowest ε over a
    rows × block slice: it is taken over each W_k's own rows (segment) at its own sparsity.
    The lazy update and the mask are computed per segment (one matrix product, one selection
    each), the same operations on the same shapes as K separate solves, so the result equals
    them exactly; the column loop runs once for all rows.
    """
    if len(Ws) != len(sparsities) or not Ws:
        raise ValueError(
            f"SparseGPT: {len(Ws)} matrices and {len(sparsities)} sparsities; give one sparsity per matrix"
        )
    columns = Ws[0].shape[1]
    if any(W.shape[1] != columns for W in Ws):
        raise ValueError(
            "SparseGPT: matrices solved together share one Hessian and need the same input size, "
            f"got {[tuple(W.shape) for W in Ws]}"
        )
    _check_structure(n, m, columns)
    if m and blocksize % m:
        raise ValueError(f"SparseGPT {n}:{m}: blocksize ({blocksize}) must be a multiple of {m}")
    for sparsity in sparsities:
        if not m and not 0.0 <= sparsity <= 1.0:
            raise ValueError(f"SparseGPT: sparsity must be in [0, 1], got {sparsity}")

    W = torch.cat([W.detach().to(torch.float32) for W in Ws])
    H = H.detach().to(W.device, torch.float32, copy=True)
    bounds = [0, *accumulate(W.shape[0] for W in Ws)]
    segments = list(zip(bounds[:-1], bounds[1:], sparsities, strict=True))

    zero_dead_inputs(W, H)

    Hinv = dampened_inverse_cholesky(H, percdamp, "SparseGPT")

    block = BlockGraph(partial(_prune_block, n=n, m=m, segments=segments), cuda_graph, W.device)
    keep = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1, keep1, Err1 = block(W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2])
        W[:, i1:i2] = W1
        keep[:, i1:i2] = keep1
        for r1, r2, _ in segments:
            W[r1:r2, i2:].addmm_(Err1[r1:r2], Hinv[i1:i2, i2:], alpha=-1)

    return [
        (W[r1:r2].to(Wk.dtype), keep[r1:r2]) for (r1, r2, _), Wk in zip(segments, Ws, strict=True)
    ]


def _prune_block(
    W1: Tensor, Hinv1: Tensor, *, n: int, m: int, segments: list[tuple[int, int, float]]
) -> tuple[Tensor, Tensor, Tensor]:
    """One block of SparseGPT in place on W1 [rows, count]: choose the mask, prune column by
    column with compensation inside the block; returns (W1 pruned, keep1, Err1)."""
    count = W1.shape[1]
    d = torch.diag(Hinv1)
    keep1 = torch.ones_like(W1, dtype=torch.bool)
    Err1 = torch.zeros_like(W1)
    # err = (w − q)/d = w · prune/d; with scale1 = prune/d (1/d where pruned, else 0) the column
    # loop is two kernels per column.
    inv_d = 1 / d
    if not m:
        scores = W1**2 / d**2
        for r1, r2, sparsity in segments:
            keep1[r1:r2] = tensor_keep_mask(scores[r1:r2], sparsity)
        scale1 = torch.where(keep1, 0.0, inv_d)
    else:
        d2 = d**2
        zero = W1.new_zeros(())
        scale1 = torch.empty_like(W1)

    for i in range(count):
        if m and i % m == 0:
            keep1[:, i : i + m] = nm_keep_mask(W1[:, i : i + m] ** 2 / d2[i : i + m], n, m)
            torch.where(keep1[:, i : i + m], zero, inv_d[i : i + m], out=scale1[:, i : i + m])

        err1 = torch.mul(W1[:, i], scale1[:, i], out=Err1[:, i])
        # Column i itself ends at q (= w − err·d); it is set exactly from the mask below.
        W1[:, i + 1 :].addr_(err1, Hinv1[i, i + 1 :], alpha=-1)

    return W1.masked_fill_(~keep1, 0), keep1, Err1
