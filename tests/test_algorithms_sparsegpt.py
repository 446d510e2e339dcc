"""SparseGPT against a naive column-by-column OBS reference written from the paper."""

from __future__ import annotations

import pytest
import torch

from reciprune.algorithms import magnitude_prune, satisfies_nm, sparsegpt_prune
from reciprune.algorithms.block_graph import BlockGraph
from reciprune.algorithms.sparsegpt import sparsegpt_prune_stacked


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


# Modules that read one input (q/k/v, gate/up) share H and are solved as one stack of rows.
STACKS = [
    # row counts, sparsities, n, m, blocksize, columns
    ((24, 8, 8), (0.5, 0.3, 0.7), 0, 0, 32, 128),
    ((16, 16), (0.5, 0.5), 0, 0, 40, 96),  # last block narrower
    ((24, 8, 8), (0.5, 0.5, 0.5), 2, 4, 32, 128),
    ((20, 12), (0.5, 0.5), 4, 8, 16, 64),
]


@pytest.mark.parametrize("rows,sparsities,n,m,blocksize,columns", STACKS)
def test_stacked_solve_equals_one_solve_per_matrix(rows, sparsities, n, m, blocksize, columns):
    g = torch.Generator().manual_seed(sum(rows) + columns + m)
    _, _, H = make_layer(4, columns, seed=columns + m)  # with dead inputs
    Ws = [torch.randn(r, columns, generator=g) for r in rows]
    stacked = sparsegpt_prune_stacked(Ws, H, sparsities, n=n, m=m, blocksize=blocksize)
    for W, sparsity, (pruned, keep) in zip(Ws, sparsities, stacked, strict=True):
        alone, alone_keep = sparsegpt_prune(W, H, sparsity, n=n, m=m, blocksize=blocksize)
        # Same operations on the same shapes row segment by row segment: bit for bit.
        assert torch.equal(keep, alone_keep) and torch.equal(pruned, alone)
    if not m:
        # Each matrix keeps its own threshold: its own share pruned in every block.
        for (_, keep), sparsity in zip(stacked, sparsities, strict=True):
            block = keep[:, :blocksize]
            assert (~block).sum().item() == int(block.numel() * sparsity)


def test_stacked_solve_returns_each_matrix_in_its_dtype():
    _, _, H = make_layer(4, 32, seed=11)
    Ws = [torch.randn(8, 32).bfloat16(), torch.randn(4, 32)]
    stacked = sparsegpt_prune_stacked(Ws, H, [0.5, 0.5], n=2, m=4, blocksize=16)
    assert [W.dtype for W, _ in stacked] == [torch.bfloat16, torch.float32]
    assert [tuple(W.shape) for W, _ in stacked] == [(8, 32), (4, 32)]


def test_stacked_solve_rejects_different_input_sizes():
    _, _, H = make_layer(4, 32, seed=12)
    with pytest.raises(ValueError, match="same input size"):
        sparsegpt_prune_stacked([torch.randn(4, 32), torch.randn(4, 16)], H, [0.5, 0.5])
    with pytest.raises(ValueError, match="one sparsity per matrix"):
        sparsegpt_prune_stacked([torch.randn(4, 32)], H, [0.5, 0.5])


@pytest.mark.parametrize("n,m", [(0, 0), (2, 4)])
def test_block_step_is_fit_for_a_cuda_graph(n, m, monkeypatch):
    # cuda_graph=True on CPU runs the graph discipline without a graph: static input buffers
    # reused across blocks, outputs rewritten by each "replay" (the step run again on them).
    recorded = []
    record = BlockGraph._record
    monkeypatch.setattr(BlockGraph, "_record", lambda self, static: recorded.append(1) or record(self, static))
    W, _, H = make_layer(24, 160, seed=13)
    plain = sparsegpt_prune_stacked([W[:16], W[16:]], H, [0.5, 0.6], n=n, m=m, blocksize=32)
    graphed = sparsegpt_prune_stacked(
        [W[:16], W[16:]], H, [0.5, 0.6], n=n, m=m, blocksize=32, cuda_graph=True
    )
    assert recorded == [1]  # warm-up on block 1, recorded at block 2, replayed for 2 … 5
    for (a, keep_a), (b, keep_b) in zip(plain, graphed, strict=True):
        assert torch.equal(keep_a, keep_b) and torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n,m", [(0, 0), (2, 4)])
def test_cuda_graph_equals_eager_on_cuda(n, m):
    W, _, H = make_layer(96, 512, seed=14)
    Ws = [W[:64].cuda(), W[64:].cuda()]
    eager = sparsegpt_prune_stacked(Ws, H.cuda(), [0.5, 0.6], n=n, m=m, blocksize=64, cuda_graph=False)
    graphed = sparsegpt_prune_stacked(Ws, H.cuda(), [0.5, 0.6], n=n, m=m, blocksize=64, cuda_graph=True)
    separate = [sparsegpt_prune(Wk, H.cuda(), s, n=n, m=m, blocksize=64) for Wk, s in zip(Ws, [0.5, 0.6], strict=True)]
    for (a, keep_a), (b, keep_b), (c, keep_c) in zip(eager, graphed, separate, strict=True):
        assert torch.equal(keep_a, keep_b) and torch.equal(a, b)  # same kernels, replayed
        assert torch.equal(keep_a, keep_c) and torch.equal(a, c)  # same shapes per segment
