"""DSnoT against a naive per-row loop; the moment merge against torch over whole batches."""

from __future__ import annotations

import math

import pytest
import torch

from reciprune.algorithms.dsnot import dsnot_refine, merge_channel_moments
from reciprune.algorithms.masks import satisfies_nm
from reciprune.algorithms.wanda import wanda_prune


def naive_dsnot(
    W,
    keep,
    mean,
    var,
    x_sq_norm,
    *,
    n=0,
    m=0,
    max_cycle_time=50,
    update_threshold=0.1,
    pow_of_var_regrowing=1.0,
    without_same_sign=True,
):
    """One row at a time, one cycle at a time, with Python lists and floats."""
    rows, columns = W.shape
    out = keep.clone()
    mu, v, xsq = mean.tolist(), var.tolist(), x_sq_norm.tolist()
    sign_check = bool(m) or not without_same_sign
    for i in range(rows):
        w = W[i].tolist()
        c = [w[j] * mu[j] for j in range(columns)]
        g = [c[j] / v[j] ** pow_of_var_regrowing for j in range(columns)]
        wanda = [abs(w[j]) * math.sqrt(xsq[j]) for j in range(columns)]
        growable = {j for j in range(columns) if not keep[i, j]}
        prunable = {j for j in range(columns) if keep[i, j]}
        e = sum(c[j] for j in growable)
        e0_sign = sign(e)
        for _ in range(max_cycle_time):
            if abs(e) <= update_threshold:
                break
            s = 1 if e > 0 else -1
            grow = [j for j in growable if g[j] * s > 0]
            if m:
                grow = [j for j in grow if any(k in prunable for k in block(j, m))]
            if not grow:
                break
            r = max(grow, key=lambda j: g[j] * s)
            if m:
                prune = [k for k in block(r, m) if k in prunable]
            else:
                prune = [k for k in prunable if c[k] * s < 0]
            if not prune:
                break
            p = min(prune, key=lambda k: wanda[k])
            e_after = e + c[p] - c[r]
            if sign_check and sign(e_after) != e0_sign:
                break
            out[i, r], out[i, p] = True, False
            growable.remove(r)
            prunable.remove(p)
            e = e_after
    return out


def sign(x):
    return (x > 0) - (x < 0)


def block(j, m):
    """The columns of j's M-block."""
    return range(j - j % m, j - j % m + m)


def make_layer(rows, columns, seed, tokens=64):
    """Weights and inputs with a per-channel offset and scale, so means and variances differ."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, columns, generator=g)
    X = torch.randn(tokens, columns, generator=g) * (0.5 + torch.rand(columns, generator=g))
    X = X + torch.randn(columns, generator=g)
    return W, X


def stats(X):
    return X.mean(0), X.var(0, unbiased=False), X.square().sum(0)


def initial_keep(W, X, n, m, sparsity=0.5):
    _, keep = wanda_prune(W, stats(X)[2], sparsity, n=n, m=m)
    return keep


def objective(W, keep, mean):
    """DSnoT's objective Σ_i e_i², e_i = Σ_{j pruned} W_ij μ_j, in float64."""
    e = (W.double() * mean.double() * (~keep)).sum(1)
    return e.square().sum().item()


def true_error(W, keep, X):
    """‖W Xᵀ − (W ⊙ keep) Xᵀ‖² on the calibration tokens, in float64."""
    return (X.double() @ (W.double() * (~keep)).T).square().sum().item()


STRUCTURES = [(0, 0), (2, 4)]
CASES = [(8, 32), (16, 64)]


@pytest.mark.parametrize("n,m", STRUCTURES)
@pytest.mark.parametrize("rows,columns", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_naive_reference(rows, columns, n, m, seed):
    W, X = make_layer(rows, columns, seed)
    keep = initial_keep(W, X, n, m)
    refined = dsnot_refine(W, keep, *stats(X), n=n, m=m)
    assert torch.equal(refined, naive_dsnot(W, keep, *stats(X), n=n, m=m))
    assert not torch.equal(refined, keep)  # the cases do exercise swaps


@pytest.mark.parametrize("n,m,sparsity", [(0, 0, 0.3), (0, 0, 0.8), (1, 4, 0), (3, 8, 0)])
def test_other_sparsities_match_naive_reference(n, m, sparsity):
    W, X = make_layer(16, 64, seed=11)
    keep = initial_keep(W, X, n, m, sparsity)
    refined = dsnot_refine(W, keep, *stats(X), n=n, m=m)
    assert torch.equal(refined, naive_dsnot(W, keep, *stats(X), n=n, m=m))
    assert not torch.equal(refined, keep)


@pytest.mark.parametrize(
    "options",
    [
        {"without_same_sign": False},
        {"pow_of_var_regrowing": 0.0},
        {"pow_of_var_regrowing": 2.0, "update_threshold": 0.5},
        {"max_cycle_time": 3},
    ],
)
@pytest.mark.parametrize("n,m", STRUCTURES)
def test_options_match_naive_reference(n, m, options):
    W, X = make_layer(16, 64, seed=7)
    keep = initial_keep(W, X, n, m)
    refined = dsnot_refine(W, keep, *stats(X), n=n, m=m, **options)
    assert torch.equal(refined, naive_dsnot(W, keep, *stats(X), n=n, m=m, **options))


def test_swap_by_hand():
    # μ = 1 everywhere: e = Σ pruned W = 1.0 + 0.5 = 1.5 > 0. Grow the largest positive pruned
    # contribution (col 0, +1.0); prune the kept negative one with the lowest |W| (col 3, −0.2
    # beats col 2, −0.3): e = 1.5 − 1.0 − 0.2 = 0.3. Next cycle grows col 1 (+0.5) and prunes
    # col 2 (−0.3): e = −0.5. No pruned positive weight is left, so the row stops there.
    W = torch.tensor([[1.0, 0.5, -0.3, -0.2, 2.0, 3.0]])
    keep = torch.tensor([[False, False, True, True, True, True]])
    ones = torch.ones(6)
    refined = dsnot_refine(W, keep, ones, ones, ones, update_threshold=0.1)
    assert refined.tolist() == [[True, True, False, False, True, True]]
    # With the sign check the second swap (e: 0.3 → −0.5) is rejected.
    refined = dsnot_refine(W, keep, ones, ones, ones, without_same_sign=False)
    assert refined.tolist() == [[True, False, True, False, True, True]]


@pytest.mark.parametrize("n,m", STRUCTURES)
def test_counts_and_structure_are_preserved(n, m):
    for seed in range(10):
        W, X = make_layer(16, 64, seed)
        keep = initial_keep(W, X, n, m)
        refined = dsnot_refine(W, keep, *stats(X), n=n, m=m, update_threshold=0.0)
        assert torch.equal(refined.sum(1), keep.sum(1))
        if m:
            assert satisfies_nm(refined, n, m)
            assert torch.equal(refined.reshape(16, -1, m).sum(-1), keep.reshape(16, -1, m).sum(-1))


def test_sign_preserving_swaps_never_raise_the_objective():
    # Unstructured with the sign check: growing and pruning both move e_i towards 0 and e_i
    # keeps its sign, so |e_i| falls at every accepted swap, row by row.
    for seed in range(10):
        for rows, columns in CASES:
            W, X = make_layer(rows, columns, seed)
            keep = initial_keep(W, X, 0, 0)
            mean = stats(X)[0]
            refined = dsnot_refine(W, keep, *stats(X), without_same_sign=False)
            e_before = (W * mean * ~keep).sum(1).abs()
            e_after = (W * mean * ~refined).sum(1).abs()
            assert torch.all(e_after <= e_before + 1e-5)


def test_default_unstructured_lowers_the_layer_objective():
    # Observed on every seed, not a theorem: without the sign check a swap can overshoot 0, and
    # 16 of these 240 rows do end with a larger |e_i|; the layer's Σ e_i² still falls.
    for seed in range(10):
        for rows, columns in CASES:
            W, X = make_layer(rows, columns, seed)
            keep = initial_keep(W, X, 0, 0)
            mean = stats(X)[0]
            refined = dsnot_refine(W, keep, *stats(X))
            assert objective(W, refined, mean) <= objective(W, keep, mean)


def test_nm_partner_of_either_sign_can_raise_the_objective():
    # As in the reference, the N:M partner is the lowest Wanda score of the block whatever its
    # sign, so a swap can push |e_i| up (the sign check only keeps e_i's sign). It happens on
    # 4 of the 20 seeded N:M cases of the narrow layers; seed 0 is one.
    W, X = make_layer(8, 32, seed=0)
    keep = initial_keep(W, X, 2, 4)
    refined = dsnot_refine(W, keep, *stats(X), n=2, m=4)
    assert objective(W, refined, stats(X)[0]) > objective(W, keep, stats(X)[0])


def test_true_error_is_not_the_objective():
    # DSnoT sees only the channel means. On a narrow layer, where 50 cycles swap most of a
    # row's 16 pruned weights, the true error ‖W X − W' X‖² rises while Σ e_i² falls.
    W, X = make_layer(8, 32, seed=0)
    keep = initial_keep(W, X, 0, 0)
    refined = dsnot_refine(W, keep, *stats(X))
    assert objective(W, refined, stats(X)[0]) < objective(W, keep, stats(X)[0])
    assert true_error(W, refined, X) > true_error(W, keep, X)


@pytest.mark.parametrize("n,m", STRUCTURES)
def test_wide_layers_lower_objective_and_true_error(n, m):
    # With 512 inputs a row swaps a few percent of its pool: on every seed both the objective
    # and the true reconstruction error on the calibration tokens fall.
    for seed in range(10):
        W, X = make_layer(32, 512, seed, tokens=256)
        keep = initial_keep(W, X, n, m)
        refined = dsnot_refine(W, keep, *stats(X), n=n, m=m)
        assert objective(W, refined, stats(X)[0]) < objective(W, keep, stats(X)[0])
        assert true_error(W, refined, X) < true_error(W, keep, X)


def test_no_cycles_or_small_error_leave_the_mask():
    W, X = make_layer(8, 32, seed=3)
    keep = initial_keep(W, X, 0, 0)
    assert torch.equal(dsnot_refine(W, keep, *stats(X), max_cycle_time=0), keep)
    assert torch.equal(dsnot_refine(W, keep, *stats(X), update_threshold=1e9), keep)


def test_rejects_bad_inputs():
    W, X = make_layer(8, 32, seed=0)
    keep = initial_keep(W, X, 0, 0)
    with pytest.raises(ValueError, match="bool mask"):
        dsnot_refine(W, keep.float(), *stats(X))
    with pytest.raises(ValueError, match="one value per input channel"):
        dsnot_refine(W, keep, stats(X)[0][:-1], *stats(X)[1:])
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        dsnot_refine(W, keep | True, *stats(X), n=2, m=4)


def test_merge_channel_moments_matches_whole_data():
    g = torch.Generator().manual_seed(0)
    batches = [
        torch.randn(t, 5, generator=g, dtype=torch.float64) * 3 + 100 for t in (7, 1, 30, 12)
    ]
    count, mean, m2 = 0, torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    for X in batches:
        mean_b = X.mean(0)
        count, mean, m2 = merge_channel_moments(
            count, mean, m2, X.shape[0], mean_b, (X - mean_b).square().sum(0)
        )
    whole = torch.cat(batches)
    assert count == whole.shape[0]
    torch.testing.assert_close(mean, whole.mean(0))
    torch.testing.assert_close(m2 / count, whole.var(0, unbiased=False))


def test_merge_channel_moments_is_stable_in_float32():
    # A large offset ruins E[x²] − E[x]² in float32; the merged M2 stays close.
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(64, 3, generator=g) * 0.01 + 1e4 for _ in range(8)]
    count, mean, m2 = 0, torch.zeros(3), torch.zeros(3)
    for X in batches:
        mean_b = X.mean(0)
        count, mean, m2 = merge_channel_moments(
            count, mean, m2, 64, mean_b, (X - mean_b).square().sum(0)
        )
    exact = torch.cat(batches).double().var(0, unbiased=False).float()
    torch.testing.assert_close(m2 / count, exact, rtol=1e-2, atol=0)
