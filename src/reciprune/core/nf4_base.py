"""A 4-bit (NF4) frozen base for fine-tuning (QLoRA style): storage, backends and export.

After a finetune stage's modifiers have prepared the model (adapters, deltas, frozen base),
every frozen `nn.Linear` inside the decoder layers is turned into an `NF4Linear` in place: its
weight is replaced by packed 4-bit codes and block constants (`weight_nf4`, `weight_absmax`,
with double quantization also `weight_absmax_scale` and `weight_absmax_offset`), about 0.56
bytes a weight instead of 4. The module object stays the same (its class is swapped), so the
hooks and references modifiers hold keep working, and `module.weight` still reads, as the
dequantized NF4 values. The forward dequantizes the weight, multiplies, and drops it again; the
backward dequantizes once more instead of keeping it (as bitsandbytes' `MatMul4Bit`), so
training holds only the packed base and one layer's dequantized weight at a time.

Backends (`quant_backend`): `bitsandbytes` quantizes and dequantizes with its kernels
(`quantize_4bit` / `dequantize_4bit`, GPU and CPU); `reciprune` with the torch implementation
in `reciprune.algorithms.nf4`, which gives the same codes and values (tested). `auto` takes
bitsandbytes when it imports and round-trips a test tensor on the device, and otherwise says so
in the log and uses ours. The saved checkpoint is the dequantized base with the trained deltas
merged (`dequantize_state`), a plain Hugging Face checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reciprune.algorithms.nf4 import BLOCKSIZE, NF4Weight, dequantize_nf4, quantize_nf4
from reciprune.core.layers import find_decoder_layers
from reciprune.errors import ReciPruneError

logger = logging.getLogger(__name__)

#: Buffer names of an NF4Linear's storage (state dict keys `<module>.<name>`).
CODES, ABSMAX, ABSMAX_SCALE, ABSMAX_OFFSET = (
    "weight_nf4", "weight_absmax", "weight_absmax_scale", "weight_absmax_offset",
)  # fmt: skip
BACKENDS = ("auto", "bitsandbytes", "reciprune")


@dataclass(frozen=True)
class NF4Backend:
    """Who computes NF4: `name` is 'bitsandbytes' or 'reciprune' (both give the same values)."""

    name: str
    double_quant: bool = False
    blocksize: int = BLOCKSIZE

    def quantize(self, W: Tensor) -> NF4Weight:
        """Packed NF4 of `W` (any float dtype, any device)."""
        if self.name == "reciprune":
            return quantize_nf4(W, self.blocksize, self.double_quant)
        from bitsandbytes.functional import quantize_4bit

        packed, state = quantize_4bit(
            W.detach().contiguous(), blocksize=self.blocksize,
            compress_statistics=self.double_quant, quant_type="nf4",
        )  # fmt: skip
        nested = (state.state2.absmax, state.offset.reshape(())) if state.nested else ()
        return NF4Weight(packed.reshape(-1), state.absmax, tuple(W.shape), self.blocksize, *nested)

    def dequantize(self, q: NF4Weight, dtype: torch.dtype = torch.float32) -> Tensor:
        """The NF4 values of `q` in `dtype`."""
        # bitsandbytes' CPU kernel numbers the blocks row by row: right only when rows hold
        # whole blocks (always in LLM Linears); other shapes use ours, which equals its quantizer.
        whole_rows = q.shape[-1] % q.blocksize == 0
        if self.name == "reciprune" or (q.packed.device.type == "cpu" and not whole_rows):
            return dequantize_nf4(q, dtype)
        from bitsandbytes.functional import QuantState, dequantize_4bit, get_4bit_type

        state2 = None
        if q.double_quant:
            from bitsandbytes.functional import create_dynamic_map

            state2 = QuantState(absmax=q.absmax_scale, code=create_dynamic_map().to(q.packed.device),
                                blocksize=256, dtype=torch.float32)  # fmt: skip
        state = QuantState(
            absmax=q.absmax, shape=torch.Size(q.shape), dtype=dtype, blocksize=q.blocksize,
            code=get_4bit_type("nf4", device=q.packed.device), quant_type="nf4",
            offset=q.absmax_offset, state2=state2,
        )  # fmt: skip
        return dequantize_4bit(q.packed.reshape(-1, 1), state)

    def describe(self) -> str:
        extra = ", double quant (8-bit constants, blocks of 256)" if self.double_quant else ""
        return f"nf4 (blocks of {self.blocksize}, absmax{extra}; {self.name})"


def _bitsandbytes_problem(device: torch.device) -> str | None:
    """Why bitsandbytes cannot quantize NF4 on `device` here, or None when it can."""
    try:
        from bitsandbytes.functional import dequantize_4bit, quantize_4bit
    except Exception as exc:  # an import can fail in many ways (missing CUDA libraries, …)
        return f"bitsandbytes does not import ({type(exc).__name__}: {exc})"
    try:
        probe = torch.linspace(-1, 1, 2 * BLOCKSIZE, device=device).reshape(2, BLOCKSIZE)
        packed, state = quantize_4bit(probe, blocksize=BLOCKSIZE, quant_type="nf4")
        back = dequantize_4bit(packed, state)
        expected = dequantize_nf4(quantize_nf4(probe.cpu())).to(device)
        if not torch.equal(back, expected):
            return f"bitsandbytes' NF4 on {device} differs from the reference NF4"
    except Exception as exc:
        return f"bitsandbytes cannot quantize NF4 on {device} ({type(exc).__name__}: {exc})"
    return None


def select_backend(requested: str, device: torch.device, double_quant: bool = False) -> NF4Backend:
    """The NF4 backend for `requested` (auto | bitsandbytes | reciprune) on `device`.

    `bitsandbytes` that cannot run is an error; `auto` then falls back to ours, with a warning.
    """
    if requested not in BACKENDS:
        raise ReciPruneError(f"quant_backend {requested!r}: choose one of {', '.join(BACKENDS)}")
    if requested == "reciprune":
        return NF4Backend("reciprune", double_quant)
    problem = _bitsandbytes_problem(device)
    if problem is None:
        return NF4Backend("bitsandbytes", double_quant)
    if requested == "bitsandbytes":
        raise ReciPruneError(
            f"4-bit base requested with no backend available: --quant-backend bitsandbytes, but "
            f"{problem}. Install a bitsandbytes build for this machine (pip install "
            "bitsandbytes), or pass --quant-backend reciprune (or auto) to use reciprune's own "
            "NF4, which computes the same values."
        )
    logger.warning(
        "4-bit base: %s; using reciprune's own NF4 (the same codes and values, computed with "
        "torch).", problem
    )
    return NF4Backend("reciprune", double_quant)


# --- the module ---------------------------------------------------------------------------------
class _NF4Matmul(torch.autograd.Function):
    """y = x Ŵᵀ with Ŵ dequantized in the forward and again in the backward (never saved)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, module: NF4Linear) -> Tensor:
        ctx.module = module
        return F.linear(x, module.dequantized(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad @ ctx.module.dequantized(grad.dtype), None


class NF4Linear(nn.Linear):
    """An nn.Linear whose frozen weight is stored as packed NF4 (made by `quantize_linear`)."""

    nf4_backend: NF4Backend
    nf4_dtype: torch.dtype

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        """The dequantized weight (a new tensor, no gradient: the base is frozen)."""
        return self.dequantized(self.nf4_dtype)

    def nf4(self, stored: Mapping[str, Tensor] | None = None) -> NF4Weight:
        """The stored NF4 tensor; with `stored` (this module's storage by buffer name, e.g. taken
        from a state dict), the one those tensors hold."""
        parts = self._buffers if stored is None else stored
        return NF4Weight(
            parts[CODES], parts[ABSMAX], (self.out_features, self.in_features),
            self.nf4_backend.blocksize, parts.get(ABSMAX_SCALE), parts.get(ABSMAX_OFFSET),
        )  # fmt: skip

    def dequantized(self, dtype: torch.dtype) -> Tensor:
        with torch.no_grad():
            return self.nf4_backend.dequantize(self.nf4(), dtype)

    def forward(self, x: Tensor) -> Tensor:
        y = _NF4Matmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def quantize_linear(module: nn.Linear, backend: NF4Backend, q: NF4Weight | None = None) -> None:
    """Store `module`'s weight as NF4 (`q`, or NF4 of its weight) and make it an NF4Linear."""
    weight = module.weight
    if q is None:
        q = backend.quantize(weight)
    del module._parameters["weight"]
    module.register_buffer(CODES, q.packed)
    module.register_buffer(ABSMAX, q.absmax)
    if q.double_quant:
        module.register_buffer(ABSMAX_SCALE, q.absmax_scale)
        module.register_buffer(ABSMAX_OFFSET, q.absmax_offset.reshape(()))
    module.__class__ = NF4Linear
    module.nf4_backend = backend
    module.nf4_dtype = weight.dtype


def quantize_base(model: nn.Module, backend: NF4Backend) -> dict[str, Any]:
    """NF4 for every frozen nn.Linear inside the decoder layers that is not NF4 yet (adapters
    and other trainable Linears stay as they are; embeddings and the LM head are outside the
    layers). Returns what the manifest records."""
    layers_name, layers = find_decoder_layers(model)
    dense_bytes = packed_bytes = 0
    names = []
    for index, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            if not isinstance(module, NF4Linear):
                if module.weight.requires_grad:
                    continue
                quantize_linear(module, backend)
            dense_bytes += module.in_features * module.out_features * module.nf4_dtype.itemsize
            packed_bytes += module.nf4().nbytes()
            names.append(f"{layers_name}.{index}.{name}")
    if not names:
        raise ReciPruneError(
            "--load-in-4bit found no frozen Linear inside the decoder layers to quantize. The "
            "4-bit base is for fine-tuning adapters or deltas on a frozen model: use it with "
            "LoRAModifier, RowSparseFinetuneModifier or SparseDeltaModifier."
        )
    return {
        "format": backend.describe(),
        "backend": backend.name,
        "blocksize": backend.blocksize,
        "double_quant": backend.double_quant,
        "modules": len(names),
        "base_linear_bytes_dense": dense_bytes,
        "base_linear_bytes_nf4": packed_bytes,
        "saved_weights": "the dequantized NF4 base with the trained deltas merged",
    }


def dequantize_state(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """A state dict with every NF4Linear's packed storage replaced by its dequantized
    `<module>.weight` (in the weight's original dtype); other entries unchanged."""
    modules = {name: m for name, m in model.named_modules() if isinstance(m, NF4Linear)}
    state = dict(state)
    for name, module in modules.items():
        keys = {part: f"{name}.{part}" for part in (CODES, ABSMAX, ABSMAX_SCALE, ABSMAX_OFFSET)}
        if keys[CODES] not in state:
            continue
        q = module.nf4({part: state.pop(key) for part, key in keys.items() if key in state})
        state[f"{name}.weight"] = module.nf4_backend.dequantize(q, module.nf4_dtype)
    return state
