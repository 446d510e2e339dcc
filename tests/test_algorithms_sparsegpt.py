"""SparseGPT against a naive column-by-column OBS reference written from the paper."""

from __future__ import annotations

import pytest
import torch

from reciprune.algorithms import magnitude_prune, satisfies_nm, sparsegpt_prune


def make_layer(rows: int, columns: int, seed: int, dead: int = 3):
    """Random W and correlated inputs X = Z @ A, with `dead` input columns always zero."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, columns, generator=g)
    A = torch.randn(columns, columns, generator=g) / columns**0.5 + torch.eye(columns)
    X = torch.randn(4 * columns, columns, generator=g) @ A
    X[:, torch.randperm(columns, generator=g)[:dead]] = 0
    H = 2 / X.shape[0] * X.T @ X
    return W, X, H


def naive_sparsegpt(W, H, sparsity, n=0, m=0, blocksize=128, percdamp=0.01):
    """Paper equations, float64, explicit inverse, every update applied to all later columns."""
    W = W.double().clone()
    H = H.double().clone()
    columns = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.diag(H).mean() * torch.eye(columns, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    keep = torch.ones_like(W, dtype=torch.bool)
    for start in range(0, columns, blocksize):
        stop = min(start + blocksize, columns)
        if not m:
            saliency = (W[:, start:stop] ** 2 / torch.diag(U)[start:stop] ** 2).flatten()
            k = int(saliency.numel() * sparsity)
            block_keep = torch.ones_like(saliency, dtype=torch.bool)
            block_keep[saliency.argsort()[:k]] = False
            keep[:, start:stop] = block_keep.reshape(W.shape[0], -1)
        for i in range(start, stop):
            if m and (i - start) % m == 0:
                saliency = W[:, i : i + m] ** 2 / torch.diag(U)[i : i + m] ** 2
                for r in range(W.shape[0]):
                    order = saliency[r].argsort()
                    keep[r, i + order[: m - n]] = False
            q = W[:, i] * keep[:, i]
            err = (W[:, i] - q) / U[i, i]
            W[:, i:] -= torch.outer(err, U[i, i:])
            W[:, i] = q
    return W, keep


CASES = [
    # rows, columns, blocksize, sparsity, n, m
    (16, 64, 128, 0.5, 0, 0),
    (32, 128, 32, 0.5, 0, 0),
    (32, 128, 32, 0.7, 0, 0),
    (16, 64, 16, 0.5, 2, 4),
    (32, 128, 32, 0.5, 2, 4),
    (32, 128, 32, 0.5, 4, 8),
]


@pytest.mark.parametrize("rows,columns,blocksize,sparsity,n,m", CASES)
def test_matches_naive_reference(rows, columns, blocksize, sparsity, n, m):
    W, _, H = make_layer(rows, columns, seed=rows + columns + n)
    pruned, keep = sparsegpt_prune(W, H, sparsity, n=n, m=m, blocksize=blocksize)
    ref_W, ref_keep = naive_sparsegpt(W, H, sparsity, n, m, blocksize)
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(pruned, ref_W.float(), atol=1e-4, rtol=1e-4)
    assert torch.all(pruned[~keep] == 0)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_structure_holds_in_every_group(n, m):
    W, _, H = make_layer(24, 128, seed=m + n)
    pruned, keep = sparsegpt_prune(W, H, 0.0, n=n, m=m, blocksize=32)
    assert satisfies_nm(keep, n, m) and satisfies_nm(pruned, n, m)
    assert torch.all(keep.reshape(24, -1, m).sum(-1) == n)


def test_each_block_prunes_exactly_its_share():
    W, _, H = make_layer(20, 96, seed=7)
    _, keep = sparsegpt_prune(W, H, 0.55, blocksize=40)  # blocks of 40, 40, 16 columns
    for start in range(0, 96, 40):
        block = keep[:, start : start + 40]
        assert (~block).sum().item() == int(block.numel() * 0.55)


# Sparsities whose per-block share is a whole number, so both prune the same count.
@pytest.mark.parametrize("n,m,sparsity", [(0, 0, 0.5), (0, 0, 0.75), (2, 4, 0.5), (4, 8, 0.5)])
def test_beats_magnitude_on_reconstruction_error(n, m, sparsity):
    W, X, H = make_layer(32, 128, seed=100 + m + int(100 * sparsity))
    sgpt, _ = sparsegpt_prune(W, H, sparsity, n=n, m=m, blocksize=32)
    mag, _ = magnitude_prune(W, sparsity, n=n, m=m)
    assert (sgpt == 0).sum() == (mag == 0).sum() == int(W.numel() * sparsity)
    error_sgpt = ((X @ W.T - X @ sgpt.T) ** 2).sum()
    error_mag = ((X @ W.T - X @ mag.T) ** 2).sum()
    assert error_sgpt < error_mag


def test_zero_sparsity_keeps_weights_and_inputs_are_untouched():
    W, _, H = make_layer(8, 32, seed=3, dead=2)
    W_before, H_before = W.clone(), H.clone()
    pruned, keep = sparsegpt_prune(W, H, 0.0, blocksize=16)
    assert keep.all()
    dead = torch.diag(H) == 0
    assert torch.all(pruned[:, dead] == 0)
    torch.testing.assert_close(pruned[:, ~dead], W[:, ~dead])
    assert torch.equal(W, W_before) and torch.equal(H, H_before)


def test_returns_weight_dtype():
    W, _, H = make_layer(8, 32, seed=4)
    pruned, keep = sparsegpt_prune(W.bfloat16(), H, 0.5, n=2, m=4, blocksize=16)
    assert pruned.dtype == torch.bfloat16 and keep.dtype == torch.bool
    assert torch.all(pruned[~keep] == 0)


def test_rejects_bad_structure():
    W, _, H = make_layer(8, 30, seed=5)
    with pytest.raises(ValueError, match="multiple of 4"):
        sparsegpt_prune(W, H, 0.5, n=2, m=4)
    W, _, H = make_layer(8, 32, seed=5)
    with pytest.raises(ValueError, match="blocksize"):
        sparsegpt_prune(W, H, 0.5, n=2, m=4, blocksize=6)
