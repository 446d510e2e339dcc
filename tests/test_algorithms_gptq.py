"""GPTQ against a naive column-by-column OBS reference written from the paper."""

from __future__ import annotations

import pytest
import torch

from reciprune.algorithms.block_graph import BlockGraph
from reciprune.algorithms.gptq import gptq_quantize, gptq_quantize_stacked
from reciprune.algorithms.masks import nm_keep_mask, satisfies_nm


class RoundToNearest:
    """int4 round-to-nearest on the min-max range of each row (or of the whole tensor).

    Symmetric uses the grid −7 … 7 (scale = max|w| / 7): with compressed-tensors' −8 … 7 and
    scale = max|w| / 7.5 a negative extreme lands exactly on the tie −7.5, where float rounding
    noise (lazy batched updates against the naive sequential ones) flips it between −8 and −7.
    """

    q_max = 7

    def __init__(self, symmetric: bool = True, per_tensor: bool = False):
        self.symmetric = symmetric
        self.per_tensor = per_tensor

    def find_params(self, W):
        """Scale and integer zero point with 0 inside the range, as compressed-tensors does."""
        if self.per_tensor:
            lo, hi = W.min().clamp(max=0).reshape(1), W.max().clamp(min=0).reshape(1)
        else:
            lo, hi = W.amin(1, keepdim=True).clamp(max=0), W.amax(1, keepdim=True).clamp(min=0)
        if self.symmetric:
            scale = torch.maximum(-lo, hi) / self.q_max
            return scale, torch.zeros_like(scale)
        scale = (hi - lo) / (self.q_max - self.q_min)
        return scale, torch.round(self.q_min - lo / scale)

    @property
    def q_min(self):
        """Lowest integer on the grid."""
        return -self.q_max if self.symmetric else -self.q_max - 1

    def quantize(self, w, scale, zero_point):
        """s · (clamp(round(w / s + z)) − z)."""
        steps = torch.clamp(torch.round(w / scale + zero_point), self.q_min, self.q_max)
        return scale * (steps - zero_point)


QUANTIZERS = {
    "sym": RoundToNearest(symmetric=True),
    "asym": RoundToNearest(symmetric=False),
    "tensor": RoundToNearest(symmetric=True, per_tensor=True),
}


def make_layer(rows, columns, seed, dead=3, spread=0.0, dtype=torch.float64):
    """Random W and correlated inputs X = (Z @ A) · D, with `dead` input columns always zero.

    A = I + noise mixes the inputs so H is far from diagonal; D = exp(spread · noise) scales
    the inputs so diag H varies strongly when spread > 0.
    """
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, columns, generator=g, dtype=dtype)
    A = torch.randn(columns, columns, generator=g, dtype=dtype) / columns**0.5
    D = torch.exp(spread * torch.randn(columns, generator=g, dtype=dtype))
    X = torch.randn(4 * columns, columns, generator=g, dtype=dtype) @ (A + torch.eye(columns))
    X = X * D
    X[:, torch.randperm(columns, generator=g)[:dead]] = 0
    H = 2 / X.shape[0] * X.T @ X
    return W, H


def naive_gptq(
    W, H, quantizer, group_size=None, keep=None, actorder=False, percdamp=0.01, masked_update=False
):
    """Algorithm 1 in float64, column by column: explicit inverse, each column's update applied
    at once to every later column, grids from the current weights at a group's first column.

    `masked_update` multiplies the update by the mask instead (llm-compressor's preserve_zeros).
    """
    W = W.double().clone()
    H = H.double().clone()
    rows, columns = W.shape
    keep = torch.ones_like(W, dtype=torch.bool) if keep is None else keep
    W = W * keep
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    order = torch.argsort(torch.diag(H), descending=True) if actorder else torch.arange(columns)
    H = H[order][:, order]
    H += percdamp * torch.diag(H).mean() * torch.eye(columns, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    group_size = group_size or columns
    Q = torch.zeros_like(W)
    grids = {}
    for t, j in enumerate(order.tolist()):
        g = j // group_size
        if g not in grids:
            cols = slice(g * group_size, (g + 1) * group_size)
            grids[g] = quantizer.find_params(W[:, cols] * keep[:, cols])
        w = W[:, j].clone()
        q = quantizer.quantize(w[:, None], *grids[g])[:, 0] * keep[:, j]
        err = (w - q) / U[t, t]
        later = order[t + 1 :]
        update = torch.outer(err, U[t, t + 1 :])
        if masked_update:
            update = update * keep[:, later]
        W[:, later] -= update
        Q[:, j] = q
    scale = torch.cat([grids[g][0] for g in sorted(grids)], dim=-1)
    zero_point = torch.cat([grids[g][1] for g in sorted(grids)], dim=-1)
    return Q, scale, zero_point


def round_to_nearest(W, quantizer, group_size=None, keep=None):
    """RTN baseline: each group rounded onto the grid of its own range, no compensation."""
    group_size = group_size or W.shape[1]
    groups = W.split(group_size, dim=1)
    Q = torch.cat([quantizer.quantize(Wg, *quantizer.find_params(Wg)) for Wg in groups], dim=1)
    return Q if keep is None else Q * keep


def layer_error(Q, W, H):
    """tr(ΔW H ΔWᵀ) = 2/N ‖X ΔWᵀ‖²: the layer's reconstruction error."""
    dW = (Q - W).double()
    return torch.trace(dW @ H.double() @ dW.T).item()


CASES = [
    # rows, columns, blocksize, group_size, quantizer, actorder, n:m keep mask
    (16, 64, 16, None, "sym", False, False),
    (16, 64, 16, None, "asym", False, False),
    (16, 64, 24, None, "tensor", False, False),
    (32, 128, 32, 16, "sym", False, False),
    (32, 128, 24, 16, "asym", False, False),  # groups straddle block ends
    (32, 128, 20, None, "sym", True, False),
    (32, 128, 32, 32, "asym", True, False),
    (32, 128, 32, 16, "sym", False, True),
    (32, 128, 24, 32, "asym", True, True),
]


@pytest.mark.parametrize("rows,columns,blocksize,group_size,kind,actorder,masked", CASES)
def test_matches_naive_reference(rows, columns, blocksize, group_size, kind, actorder, masked):
    W, H = make_layer(rows, columns, seed=rows + columns + blocksize, spread=0.5 * actorder)
    keep = nm_keep_mask(W.abs(), 2, 4) if masked else None
    quantizer = QUANTIZERS[kind]
    Q, params = gptq_quantize(
        W,
        H,
        quantizer,
        blocksize=blocksize,
        group_size=group_size,
        actorder=actorder,
        keep_mask=keep,
    )
    ref_Q, ref_scale, ref_zero = naive_gptq(W, H, quantizer, group_size, keep, actorder)
    torch.testing.assert_close(Q, ref_Q, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(params.scale, ref_scale, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(params.zero_point, ref_zero)
    assert not torch.equal(Q, round_to_nearest(W, quantizer, group_size, keep))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    "group_size,kind", [(None, "sym"), (None, "asym"), (16, "sym"), (16, "asym")]
)
def test_beats_round_to_nearest(seed, group_size, kind):
    W, H = make_layer(32, 128, seed=10 + seed)
    Q, _ = gptq_quantize(W, H, QUANTIZERS[kind], blocksize=32, group_size=group_size)
    rtn = round_to_nearest(W * (torch.diag(H) != 0), QUANTIZERS[kind], group_size)
    assert layer_error(Q, W, H) < layer_error(rtn, W, H)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("group_size,kind", [(None, "sym"), (16, "asym")])
def test_two_four_sparsity_survives(seed, group_size, kind):
    W, H = make_layer(32, 128, seed=20 + seed)
    keep = nm_keep_mask(W.abs(), 2, 4)
    pruned = W * keep
    quantizer = QUANTIZERS[kind]
    Q, _ = gptq_quantize(pruned, H, quantizer, blocksize=32, group_size=group_size, keep_mask=keep)
    assert satisfies_nm(Q, 2, 4)
    assert torch.all(Q[~keep] == 0)
    # Weights outside the mask are dropped, so passing the dense W gives the same result.
    dense_Q, _ = gptq_quantize(W, H, quantizer, blocksize=32, group_size=group_size, keep_mask=keep)
    assert torch.equal(Q, dense_Q)

    rtn = round_to_nearest(pruned, quantizer, group_size, keep)
    masked_update, _, _ = naive_gptq(pruned, H, quantizer, group_size, keep, masked_update=True)
    assert satisfies_nm(rtn, 2, 4) and satisfies_nm(masked_update, 2, 4)
    assert layer_error(Q, pruned, H) < layer_error(rtn, pruned, H)
    assert layer_error(Q, pruned, H) < layer_error(masked_update, pruned, H)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("group_size,kind", [(None, "asym"), (16, "sym"), (32, "asym")])
def test_actorder_groups_stay_on_original_columns_and_error_drops(seed, group_size, kind):
    # Inputs scaled by exp(N(0, 1)): diag H spans orders of magnitude, where actorder matters.
    W, H = make_layer(32, 128, seed=30 + seed, spread=1.0)
    quantizer = QUANTIZERS[kind]
    Q, params = gptq_quantize(W, H, quantizer, blocksize=32, group_size=group_size, actorder=True)
    diag = torch.diag(H).clone()
    diag[diag == 0] = 1  # dead inputs, as the algorithm sets them
    assert torch.equal(params.perm, torch.argsort(diag, descending=True))
    # Group g is the original columns g·group_size …: every one of them sits on its grid.
    size = group_size or 128
    assert params.scale.shape == (32, 128 // size)
    for g in range(128 // size):
        cols = slice(g * size, (g + 1) * size)
        scale, zero = params.scale[:, g : g + 1], params.zero_point[:, g : g + 1]
        torch.testing.assert_close(
            quantizer.quantize(Q[:, cols], scale, zero), Q[:, cols], atol=1e-12, rtol=0
        )
    in_order, _ = gptq_quantize(W, H, quantizer, blocksize=32, group_size=group_size)
    assert layer_error(Q, W, H) < layer_error(in_order, W, H)


def test_dead_inputs_are_zeroed_and_do_not_matter():
    W, H = make_layer(16, 64, seed=40, dead=5)
    dead = torch.diag(H) == 0
    W_before, H_before = W.clone(), H.clone()
    Q, params = gptq_quantize(W, H, QUANTIZERS["asym"], blocksize=16, group_size=16)
    assert torch.all(Q[:, dead] == 0) and torch.isfinite(Q).all()
    assert torch.equal(W, W_before) and torch.equal(H, H_before)
    # Whatever the dead columns hold, neither the grids nor the other columns change.
    other = W.clone()
    other[:, dead] = 100.0
    other_Q, other_params = gptq_quantize(other, H, QUANTIZERS["asym"], blocksize=16, group_size=16)
    assert torch.equal(Q, other_Q) and torch.equal(params.scale, other_params.scale)


@pytest.mark.parametrize("masked", [False, True])
def test_loss_is_the_damped_layer_error(masked):
    # Each step's OBS increment is exact on the damped quadratic, so the sum is ½ tr(ΔW H' ΔWᵀ).
    W, H = make_layer(16, 64, seed=50, dead=0)
    keep = nm_keep_mask(W.abs(), 2, 4) if masked else torch.ones_like(W, dtype=torch.bool)
    Q, params = gptq_quantize(W, H, QUANTIZERS["sym"], blocksize=16, group_size=16, keep_mask=keep)
    damped = H + 0.01 * torch.diag(H).mean() * torch.eye(64, dtype=H.dtype)
    assert params.loss == pytest.approx(layer_error(Q, W * keep, damped) / 2, rel=1e-9)


def test_compressed_tensors_fake_quantization_plugs_in():
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=4, symmetric=False, strategy="group", group_size=16)
    # One column (or one group's columns) is quantized with one grid per row: channel strategy.
    column_args = args.model_copy(update={"strategy": "channel", "group_size": None})

    class CompressedTensorsQuantizer:
        def find_params(self, W):
            return calculate_qparams(W.amin(1, keepdim=True), W.amax(1, keepdim=True), column_args)

        def quantize(self, w, scale, zero_point):
            return fake_quantize(w, scale, zero_point, column_args)

    W, H = make_layer(32, 128, seed=60, dtype=torch.float32)
    keep = nm_keep_mask(W.abs(), 2, 4)
    Q, params = gptq_quantize(
        W,
        H,
        CompressedTensorsQuantizer(),
        blocksize=32,
        group_size=16,
        actorder=True,
        keep_mask=keep,
    )
    assert params.scale.shape == params.zero_point.shape == (32, 8)
    assert params.zero_point.dtype == args.zp_dtype
    # The returned grids are the group layout compressed-tensors packs: Q is already on them.
    assert torch.equal(fake_quantize(Q, params.scale, params.zero_point, args), Q)
    assert satisfies_nm(Q, 2, 4) and torch.all(Q[~keep] == 0)


def test_returns_weight_dtype_and_keeps_zeros_in_bfloat16():
    W, H = make_layer(8, 32, seed=70, dtype=torch.float32)
    keep = nm_keep_mask(W.abs(), 2, 4)
    Q, params = gptq_quantize(W.bfloat16(), H, QUANTIZERS["sym"], blocksize=16, keep_mask=keep)
    assert Q.dtype == torch.bfloat16 and params.scale.dtype == torch.float32
    assert torch.all(Q[~keep] == 0) and satisfies_nm(Q, 2, 4)


def test_rejects_bad_arguments():
    W, H = make_layer(8, 48, seed=80)
    with pytest.raises(ValueError, match="does not divide the 48 input columns"):
        gptq_quantize(W, H, QUANTIZERS["sym"], group_size=32)
    with pytest.raises(ValueError, match="keep_mask has shape"):
        gptq_quantize(W, H, QUANTIZERS["sym"], keep_mask=torch.ones(8, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match="not positive definite"):
        gptq_quantize(W, -torch.eye(48, dtype=W.dtype), QUANTIZERS["sym"])


def test_grid_comes_from_the_values_it_rounds():
    # A group's first column is rounded right after its grid is found: both must see the same
    # numbers, also for groups starting inside a block (pending lazy updates) and across blocks.
    seen = {}

    class Recording(RoundToNearest):
        def find_params(self, W):
            seen["group"] = W.clone()
            return super().find_params(W)

        def quantize(self, w, scale, zero_point):
            if "group" in seen:
                first = seen.pop("group")
                seen.setdefault("pairs", []).append((first, w.clone()))
            return super().quantize(w, scale, zero_point)

    W, H = make_layer(32, 128, seed=90, dtype=torch.float32)
    gptq_quantize(W, H, Recording(symmetric=False), blocksize=24, group_size=16, actorder=True)
    assert len(seen["pairs"]) == 128 // 16
    assert all(any(torch.equal(col, w[:, 0]) for col in group.T) for group, w in seen["pairs"])


# Modules that read one input (q/k/v, gate/up) share H and are solved as one stack of rows.
STACKS = [
    # blocksize, group_size, quantizer, actorder, n:m keep masks, dtype
    (32, None, "sym", False, False, torch.float64),
    (32, 16, "asym", False, False, torch.float32),
    (24, 16, "asym", False, True, torch.float32),  # groups straddle block ends
    (32, 32, "sym", True, False, torch.float64),
    (24, 16, "asym", True, True, torch.float32),  # grids fixed mid-block, some blocks only there
    (20, None, "asym", True, True, torch.float32),
]


@pytest.mark.parametrize("blocksize,group_size,kind,actorder,masked,dtype", STACKS)
def test_stacked_solve_equals_one_solve_per_matrix(blocksize, group_size, kind, actorder, masked, dtype):
    _, H = make_layer(4, 128, seed=blocksize + (group_size or 0), spread=0.5 * actorder, dtype=dtype)
    g = torch.Generator().manual_seed(7)
    Ws = [torch.randn(rows, 128, generator=g, dtype=dtype) for rows in (24, 8, 8)]
    keeps = [nm_keep_mask(W.abs(), 2, 4) for W in Ws] if masked else None
    settings = dict(blocksize=blocksize, group_size=group_size, actorder=actorder)
    stacked = gptq_quantize_stacked(Ws, H, QUANTIZERS[kind], keep_masks=keeps, **settings)
    for k, (W, (Q, params)) in enumerate(zip(Ws, stacked, strict=True)):
        keep = None if keeps is None else keeps[k]
        alone, alone_params = gptq_quantize(W, H, QUANTIZERS[kind], keep_mask=keep, **settings)
        # Same operations on the same shapes row segment by row segment: bit for bit.
        assert torch.equal(Q, alone)
        assert torch.equal(params.scale, alone_params.scale)
        assert torch.equal(params.zero_point, alone_params.zero_point)
        assert torch.equal(params.perm, alone_params.perm) and params.loss == alone_params.loss


def test_stacking_needs_one_grid_per_row():
    W, H = make_layer(16, 64, seed=100)
    # A per-tensor grid spans all rows of a matrix: stacking would share it between matrices.
    with pytest.raises(ValueError, match="one grid per row"):
        gptq_quantize_stacked([W[:8], W[8:]], H, QUANTIZERS["tensor"])
    gptq_quantize(W, H, QUANTIZERS["tensor"])  # alone it is fine
    with pytest.raises(ValueError, match="one input size and dtype"):
        gptq_quantize_stacked([W, W.float()], H, QUANTIZERS["sym"])
    with pytest.raises(ValueError, match="2 keep masks for 1 matrices"):
        gptq_quantize_stacked([W], H, QUANTIZERS["sym"], keep_masks=[W != 0, W != 0])


@pytest.mark.parametrize("group_size,actorder", [(32, False), (None, False), (16, True)])
def test_block_step_is_fit_for_a_cuda_graph(group_size, actorder, monkeypatch):
    # cuda_graph=True on CPU runs the graph discipline without a graph: static input buffers
    # reused across blocks, outputs rewritten by each "replay" (the step run again on them).
    # With actorder, blocks whose grids are fixed past their first column run eagerly.
    recorded = []
    record = BlockGraph._record
    monkeypatch.setattr(BlockGraph, "_record", lambda self, static: recorded.append(1) or record(self, static))
    W, H = make_layer(32, 256, seed=110, spread=0.5, dtype=torch.float32)
    keeps = [nm_keep_mask(W[:24].abs(), 2, 4), nm_keep_mask(W[24:].abs(), 2, 4)]
    settings = dict(blocksize=32, group_size=group_size, actorder=actorder, keep_masks=keeps)
    plain = gptq_quantize_stacked([W[:24], W[24:]], H, QUANTIZERS["asym"], **settings)
    graphed = gptq_quantize_stacked([W[:24], W[24:]], H, QUANTIZERS["asym"], cuda_graph=True, **settings)
    assert recorded == [1]
    for (a, params_a), (b, params_b) in zip(plain, graphed, strict=True):
        assert torch.equal(a, b) and torch.equal(params_a.scale, params_b.scale)
        assert params_a.loss == params_b.loss


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("group_size,actorder", [(64, False), (64, True)])
def test_cuda_graph_equals_eager_on_cuda(group_size, actorder):
    from compressed_tensors.quantization import QuantizationArgs

    from reciprune.algorithms.observers import ObserverColumnQuantizer

    args = QuantizationArgs(num_bits=4, symmetric=True, strategy="group", group_size=group_size)
    quantizer = ObserverColumnQuantizer(args, "minmax", torch.float32)
    W, H = make_layer(96, 512, seed=120, spread=0.5, dtype=torch.float32)
    Ws, H = [W[:64].cuda(), W[64:].cuda()], H.cuda()
    keeps = [nm_keep_mask(Wk.abs(), 2, 4) for Wk in Ws]
    settings = dict(blocksize=64, group_size=group_size, actorder=actorder, keep_masks=keeps)
    eager = gptq_quantize_stacked(Ws, H, quantizer, cuda_graph=False, **settings)
    graphed = gptq_quantize_stacked(Ws, H, quantizer, cuda_graph=True, **settings)
    for (a, params_a), (b, params_b) in zip(eager, graphed, strict=True):
        assert torch.equal(a, b) and torch.equal(params_a.scale, params_b.scale)
    for k, (Q, _) in enumerate(eager):
        alone, _ = gptq_quantize(Ws[k], H, quantizer, cuda_graph=False, keep_mask=keeps[k],
                                 blocksize=64, group_size=group_size, actorder=actorder)
        assert torch.equal(Q, alone)
