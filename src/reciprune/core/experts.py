"""Mixture-of-experts weights as Linear-like targets: one `ExpertSlice` per expert matrix.

transformers 5 keeps a layer's experts (Mixtral, Qwen3-MoE, ...) in fused 3-D parameters,
`experts.gate_up_proj` [E, 2I, H] and `experts.down_proj` [E, H, I]. Each expert's [out, in]
matrix is exposed as a child module `experts.slices.<e>.<gate_up_proj|down_proj>` whose
`weight` is a view into the fused parameter, so target resolution, the pruning and GPTQ solvers
and `set_weight_matrix` treat it like any Linear and write straight into the fused weight.

Inputs: while a slice is tracked, a forward pre-hook on the fused experts module reproduces the
routing (the tokens the router sent to expert e, from its `top_k_index` argument) and feeds
them through the slices, so each expert's statistics come from its own tokens only. An expert
that no calibration token reaches has no statistics: `is_unreached` says so and the modifiers
fall back to a data-free rule (magnitude pruning, round-to-nearest quantization).
"""

from __future__ import annotations

import torch
from torch import nn

#: The fused parameter names, in the order the experts apply them.
FUSED_EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")
SLICES_ATTRIBUTE = "slices"


class ExpertSlice(nn.Module):
    """Expert `expert`'s [out, in] matrix of a fused [E, out, in] parameter; holds no parameter
    of its own (the checkpoint is unchanged)."""

    def __init__(self, owner: nn.Module, parameter: str, expert: int) -> None:
        super().__init__()
        # A plain list keeps `owner` out of named_modules (it is our parent, not a child).
        self._owner = [owner]
        self.parameter = parameter
        self.expert = expert

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self._owner[0], self.parameter).data[self.expert]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"{self.parameter}[{self.expert}], shape={tuple(self.weight.shape)}"


def is_fused_experts(module: nn.Module) -> bool:
    """True for a transformers 5 experts module with 3-D gate_up_proj / down_proj parameters."""
    return all(
        isinstance(getattr(module, name, None), nn.Parameter) and getattr(module, name).dim() == 3
        for name in FUSED_EXPERT_PARAMETERS
    )


def attach_expert_slices(model: nn.Module) -> int:
    """Give every fused experts module its `slices` children (idempotent); the number attached."""
    attached = 0
    for module in list(model.modules()):
        if not is_fused_experts(module) or hasattr(module, SLICES_ATTRIBUTE):
            continue
        slices = nn.ModuleList()
        for expert in range(module.gate_up_proj.shape[0]):
            one = nn.Module()
            for name in FUSED_EXPERT_PARAMETERS:
                one.add_module(name, ExpertSlice(module, name, expert))
            slices.append(one)
        module.add_module(SLICES_ATTRIBUTE, slices)
        attached += 1
    return attached


def route_to_slices(experts: nn.Module, args: tuple) -> None:
    """Forward pre-hook on a fused experts module: run each expert's routed tokens through its
    slices (gate_up, the activation, down) so the slices' own input hooks see them."""
    hidden, top_k_index = args[0], args[1]
    flat = hidden.reshape(-1, hidden.shape[-1])
    chosen = top_k_index.reshape(flat.shape[0], -1)
    with torch.no_grad():
        for expert, one in enumerate(getattr(experts, SLICES_ATTRIBUTE)):
            tokens = (chosen == expert).any(dim=-1).nonzero().flatten()
            if tokens.numel() == 0:
                continue
            gate, up = one.gate_up_proj(flat[tokens]).chunk(2, dim=-1)
            one.down_proj(experts.act_fn(gate) * up)


def owners_of(slices: list[nn.Module]) -> list[nn.Module]:
    """The distinct fused experts modules the given expert slices belong to."""
    owners = {id(m._owner[0]): m._owner[0] for m in slices if isinstance(m, ExpertSlice)}
    return list(owners.values())
