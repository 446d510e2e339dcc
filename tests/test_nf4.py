"""NF4 (QLoRA) block quantization: our torch implementation against a naive per-element
reference and against bitsandbytes, and the NF4Linear storage of a 4-bit base."""

from __future__ import annotations

import pytest
import torch

from reciprune.algorithms.nf4 import (
    NF4_LEVELS,
    NF4Weight,
    dequantize_nf4,
    dynamic_map,
    nf4_absmax,
    quantize_nf4,
    unpack_codes,
)
from reciprune.core.nf4_base import NF4Backend, NF4Linear, quantize_linear, select_backend
from reciprune.errors import ReciPruneError

SHAPES = [(64, 128), (33, 64), (48, 96), (7, 10), (300, 576)]


def _naive_nf4(W: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Per element: its block's absmax, then the nearest of the 16 levels (first on a tie)."""
    flat = W.reshape(-1).float().tolist()
    levels = list(NF4_LEVELS)
    codes, absmax = [], []
    for start in range(0, len(flat), blocksize):
        block = flat[start : start + blocksize]
        c = max(abs(v) for v in block)
        absmax.append(c)
        inv = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(max(c, 1e-38))
        for v in block:
            x = float(torch.tensor(v, dtype=torch.float32) * inv)
            x = min(max(x, -1.0), 1.0)
            distances = [abs(x - level) for level in levels]
            codes.append(distances.index(min(distances)))
    return torch.tensor(codes), torch.tensor(absmax, dtype=torch.float32)


@pytest.mark.parametrize("shape", SHAPES[:4])
def test_codes_and_values_equal_the_naive_nearest_level_reference(shape):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.02
    q = quantize_nf4(W)
    codes, absmax = _naive_nf4(W)
    assert torch.equal(unpack_codes(q), codes)
    assert torch.equal(q.absmax, absmax)
    expected = torch.tensor(NF4_LEVELS)[codes] * absmax.repeat_interleave(64)[: codes.numel()]
    assert torch.equal(dequantize_nf4(q), expected.reshape(shape))
    # The largest |w| of every block is reproduced exactly (level ±1).
    blocks = W.reshape(-1)[: (W.numel() // 64) * 64].reshape(-1, 64)
    back = dequantize_nf4(q).reshape(-1)[: blocks.numel()].reshape(-1, 64)
    top = blocks.abs().argmax(dim=1, keepdim=True)
    assert torch.equal(back.gather(1, top), blocks.gather(1, top))


def test_double_quant_constants_are_within_one_dynamic_level_of_the_block_absmax():
    W = torch.randn(300, 576, generator=torch.Generator().manual_seed(1)) * 0.02
    plain, double = quantize_nf4(W), quantize_nf4(W, double_quant=True)
    assert torch.equal(unpack_codes(plain), unpack_codes(double))  # only the constants change
    c, c_hat = plain.absmax, nf4_absmax(double)
    scale = double.absmax_scale.repeat_interleave(256)[: c.numel()]
    gaps = dynamic_map().diff().max()  # the map's coarsest spacing bounds the rounding
    assert ((c - c_hat).abs() <= gaps / 2 * scale + 1e-7).all()
    assert torch.isclose(double.absmax_offset, c.mean())
    assert double.nbytes() < plain.nbytes()


# --- against bitsandbytes -----------------------------------------------------------------------
bnb_functional = pytest.importorskip("bitsandbytes.functional")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_codes_and_constants_equal_bitsandbytes(shape, dtype):
    W = (torch.randn(*shape, generator=torch.Generator().manual_seed(2)) * 0.05).to(dtype)
    packed, state = bnb_functional.quantize_4bit(W, blocksize=64, quant_type="nf4")
    q = quantize_nf4(W)
    assert torch.equal(q.packed, packed.reshape(-1))
    assert torch.equal(q.absmax, state.absmax)
    # bitsandbytes' CPU dequantize kernel numbers blocks row by row, so compare where rows hold
    # whole blocks; our dequantization of its state must match it bit for bit there.
    if shape[-1] % 64 == 0:
        assert torch.equal(dequantize_nf4(q, dtype), bnb_functional.dequantize_4bit(packed, state))


@pytest.mark.parametrize("shape", [(64, 128), (300, 576), (40, 64)])
def test_double_quant_matches_bitsandbytes(shape):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(3)) * 0.05
    packed, state = bnb_functional.quantize_4bit(
        W, blocksize=64, compress_statistics=True, quant_type="nf4"
    )
    q = quantize_nf4(W, double_quant=True)
    assert torch.equal(q.packed, packed.reshape(-1))
    assert torch.equal(q.absmax_scale, state.state2.absmax)
    assert torch.equal(q.absmax_offset, state.offset)
    # The 8-bit codes of the constants agree except at near-ties, where bitsandbytes' CPU
    # binary search takes the farther of two neighbouring levels; ours is never farther.
    differ = q.absmax != state.absmax
    assert differ.float().mean() < 0.01
    assert ((q.absmax.int() - state.absmax.int()).abs() <= 1).all()
    code = dynamic_map()
    code[0] = -1.0
    scale = q.absmax_scale.repeat_interleave(256)[: q.absmax.numel()]
    v = (_absmax(W) - q.absmax_offset) / scale
    ours, theirs = (v - code[q.absmax.long()]).abs(), (v - code[state.absmax.long()]).abs()
    assert (ours <= theirs + 1e-7).all()
    # With bitsandbytes' own constants, our dequantization equals its own bit for bit.
    from_theirs = NF4Weight(q.packed, state.absmax, q.shape, 64, q.absmax_scale, q.absmax_offset)
    assert torch.equal(dequantize_nf4(from_theirs), bnb_functional.dequantize_4bit(packed, state))


def _absmax(W: torch.Tensor) -> torch.Tensor:
    return W.reshape(-1, 64).abs().amax(dim=1)


# --- the backends and the module ----------------------------------------------------------------
@pytest.mark.parametrize("double_quant", [False, True])
def test_both_backends_store_and_dequantize_the_same_weights(double_quant):
    W = torch.randn(96, 128, generator=torch.Generator().manual_seed(4)) * 0.05
    ours = NF4Backend("reciprune", double_quant)
    theirs = select_backend("bitsandbytes", torch.device("cpu"), double_quant)
    assert theirs.name == "bitsandbytes"
    a, b = ours.quantize(W), theirs.quantize(W)
    assert torch.equal(a.packed, b.packed)
    assert (a.absmax != b.absmax).float().mean() < 0.01
    assert torch.equal(theirs.dequantize(a), ours.dequantize(a))


def test_nf4_linear_computes_with_the_dequantized_weight_and_passes_gradients():
    torch.manual_seed(5)
    linear = torch.nn.Linear(128, 64, bias=True).requires_grad_(False)
    W = linear.weight.detach().clone()
    quantize_linear(linear, NF4Backend("reciprune"))
    assert isinstance(linear, NF4Linear) and "weight" not in dict(linear.named_parameters())
    assert torch.equal(linear.weight, dequantize_nf4(quantize_nf4(W)))
    x = torch.randn(3, 128, requires_grad=True)
    y = linear(x)
    reference = x.detach() @ linear.weight.T + linear.bias
    assert torch.allclose(y, reference, atol=1e-6)
    y.sum().backward()
    assert torch.allclose(x.grad, torch.ones(3, 64) @ linear.weight, atol=1e-6)
    state = linear.state_dict()
    assert state["weight_nf4"].dtype == torch.uint8 and state["weight_nf4"].numel() == 64 * 128 // 2


def test_backend_requested_but_unavailable_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name.startswith("bitsandbytes"):
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    with pytest.raises(ReciPruneError, match="4-bit base requested with no backend available"):
        select_backend("bitsandbytes", torch.device("cpu"))
    # auto falls back to ours, and says so in the log
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("reciprune.core.nf4_base").addHandler(handler)
    try:
        assert select_backend("auto", torch.device("cpu")).name == "reciprune"
    finally:
        logging.getLogger("reciprune.core.nf4_base").removeHandler(handler)
    assert any("reciprune's own NF4" in r.getMessage() for r in records)
