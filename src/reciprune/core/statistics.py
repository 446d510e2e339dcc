"""Calibration statistics of module inputs, shared by modules that read the same tensor.

q/k/v projections (and gate/up) read one tensor: their XᵀX is accumulated once and shared,
which is most of the calibration cost saved over computing one Hessian per module.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from reciprune.algorithms.dsnot import merge_channel_moments
from reciprune.core.experts import owners_of, route_to_slices


@dataclass
class _InputGroup:
    """Running sums for every module that reads one input tensor."""

    members: list[nn.Module] = field(default_factory=list)
    want_hessian: bool = False
    want_moments: bool = False
    moments: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (count, mean, m2)
    xtx: torch.Tensor | None = None  # Σ xᵀx over tokens, fp32
    sq_norm: torch.Tensor | None = None  # Σ x_j² over tokens, fp32
    num_tokens: int = 0
    num_sequences: int = 0
    last_batch: int = -1


class InputStatistics:
    """Accumulates, per tracked module, Σ xᵀx (a Hessian) and/or Σ x² (column norms).

    Modifiers call `track` at LAYER_START; the session attaches hooks, the pipeline forwards the
    calibration batches, and at LAYER_CALIBRATED modifiers read `hessian` / `sq_norm`.
    """

    def __init__(self) -> None:
        self._requests: dict[nn.Module, bool] = {}
        self._moment_requests: set[nn.Module] = set()
        self._group_of: dict[nn.Module, _InputGroup] = {}
        self._groups: list[_InputGroup] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._batch = 0
        self._pending_keys: dict[tuple, tuple[weakref.ref, _InputGroup]] = {}

    def track(self, module: nn.Module, *, hessian: bool, moments: bool = False) -> None:
        """Ask for statistics of `module`'s input: ‖X_j‖², plus the full XᵀX with `hessian`,
        plus each channel's mean and variance (merged stably across batches) with `moments`."""
        self._requests[module] = self._requests.get(module, False) or hessian
        if moments:
            self._moment_requests.add(module)

    def require_hessians(self) -> None:
        """Upgrade every request to the full XᵀX (used to measure reconstruction errors)."""
        self._requests = dict.fromkeys(self._requests, True)

    def tracked_modules(self) -> list[nn.Module]:
        """Modules whose inputs were seen in the calibration forward."""
        return list(self._group_of)

    @property
    def tracking(self) -> bool:
        return bool(self._requests)

    def attach(self, layer: nn.Module) -> None:
        """Register the hooks: one on `layer` to count batches, one per tracked module."""
        if not self._requests:
            return
        self._handles.append(layer.register_forward_pre_hook(self._next_batch))
        for module in self._requests:
            self._handles.append(module.register_forward_pre_hook(self._accumulate))
        # Expert slices see no forward of their own: their experts module routes tokens to them.
        for experts in owners_of(list(self._requests)):
            self._handles.append(experts.register_forward_pre_hook(route_to_slices))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def clear(self) -> None:
        self.detach()
        self._requests.clear()
        self._moment_requests.clear()
        self._group_of.clear()
        self._groups.clear()
        self._pending_keys.clear()

    def _next_batch(self, _module: nn.Module, _args: tuple) -> None:
        self._batch += 1
        self._pending_keys.clear()

    @torch.no_grad()
    def _accumulate(self, module: nn.Module, args: tuple) -> None:
        x = args[0]
        group = self._group_of.get(module)
        if group is None:
            # First sight: modules fed the very same tensor in this batch join one group.
            # A live weak reference proves identity; a bare address could be a reused allocation.
            key = (x.data_ptr(), tuple(x.shape))
            seen = self._pending_keys.get(key)
            if seen is not None and seen[0]() is x:
                group = seen[1]
            else:
                group = _InputGroup()
                self._groups.append(group)
                self._pending_keys[key] = (weakref.ref(x), group)
            group.members.append(module)
            group.want_hessian = group.want_hessian or self._requests[module]
            group.want_moments = group.want_moments or module in self._moment_requests
            self._group_of[module] = group
        if group.last_batch == self._batch:
            return
        group.last_batch = self._batch
        flat = x.reshape(-1, x.shape[-1]).float()
        if group.want_hessian:
            if group.xtx is None:
                group.xtx = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float32, device=x.device)
            group.xtx.addmm_(flat.t(), flat)
        else:
            if group.sq_norm is None:
                group.sq_norm = torch.zeros(flat.shape[1], dtype=torch.float32, device=x.device)
            group.sq_norm.add_(flat.square().sum(0))
        if group.want_moments:
            batch_mean = flat.mean(0)
            batch = (flat.shape[0], batch_mean, (flat - batch_mean).square().sum(0))
            group.moments = batch if group.moments is None else merge_channel_moments(
                *group.moments, *batch
            )
        group.num_tokens += flat.shape[0]
        group.num_sequences += x.shape[0] if x.dim() > 2 else 1

    def _group(self, module: nn.Module) -> _InputGroup:
        try:
            return self._group_of[module]
        except KeyError:
            raise RuntimeError(
                "no calibration statistics for this module: it was not tracked at LAYER_START "
                "or the calibration forward never reached it"
            ) from None

    def reached(self, module: nn.Module) -> bool:
        """Whether the calibration forward fed `module` any input (an expert the router never
        chose has none)."""
        return module in self._group_of

    def has_hessian(self, module: nn.Module) -> bool:
        """Whether the full XᵀX of `module`'s input was accumulated."""
        return self._group(module).xtx is not None

    def hessian(self, module: nn.Module) -> torch.Tensor:
        """H = 2/n Σ xᵀx over the n calibration sequences (SparseGPT's scaling), fp32."""
        group = self._group(module)
        if group.xtx is None:
            raise RuntimeError("Hessian requested for a module tracked with hessian=False")
        return group.xtx * (2.0 / max(group.num_sequences, 1))

    def sq_norm(self, module: nn.Module) -> torch.Tensor:
        """‖X_j‖₂² per input column over all calibration tokens, fp32."""
        group = self._group(module)
        if group.sq_norm is not None:
            return group.sq_norm
        return torch.diagonal(group.xtx).clone()

    def channel_moments(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Per input channel mean μ_j and (population) variance over the calibration tokens."""
        group = self._group(module)
        if group.moments is None:
            raise RuntimeError("channel moments requested for a module tracked with moments=False")
        count, mean, m2 = group.moments
        return mean, m2 / max(count, 1)

    def tokens_per_sequence(self, module: nn.Module) -> float:
        group = self._group(module)
        return group.num_tokens / max(group.num_sequences, 1)

    def num_tokens(self, module: nn.Module) -> int:
        return self._group(module).num_tokens

    def shared_groups(self, modules: Iterable[nn.Module]) -> list[list[nn.Module]]:
        """`modules` split by the input they read: the modules of one list share one XᵀX (one
        Hessian), so a solve can take them together. Lists and members keep the given order."""
        groups: dict[int, list[nn.Module]] = {}
        for module in modules:
            groups.setdefault(id(self._group(module)), []).append(module)
        return list(groups.values())

    def sharing(self) -> list[list[nn.Module]]:
        """The groups of modules found to share one input (for reports and tests)."""
        return [list(g.members) for g in self._groups]
