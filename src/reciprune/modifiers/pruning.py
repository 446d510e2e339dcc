"""Fields and wiring shared by the modifiers that prune weight matrices."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from reciprune.algorithms.magnitude import magnitude_prune
from reciprune.algorithms.masks import parse_mask_structure
from reciprune.algorithms.owl import outlier_ratio, owl_layer_nm, owl_layer_sparsities
from reciprune.algorithms.wanda import wanda_scores
from reciprune.core.events import Event, EventType
from reciprune.core.targets import set_weight_matrix, validate_target_syntax, weight_matrix
from reciprune.errors import RecipeError, ReciPruneError
from reciprune.modifiers.targeted import TargetedModifier, misfit_modules

if TYPE_CHECKING:
    from reciprune.core.session import LifecycleSession

SparsitySpec = float | list[float] | dict[str, float]


class PruningModifier(TargetedModifier):
    """Base for layer-wise pruning modifiers: targets, sparsity, N:M, and the calibration wiring.

    Subclasses set `needs_hessian` / `needs_calibration` and implement `prune_module`.
    """

    sparsity: SparsitySpec = Field(
        0.5,
        description="Fraction of weights to prune: one float, a list with one value per decoder "
        "layer, or a mapping from layer index / 're:' module regex (and 'default') to a float.",
    )
    mask_structure: str = Field(
        "unstructured",
        description="'unstructured', or 'N:M' for at most N non-zeros in every M consecutive "
        "input weights (e.g. '2:4'); N:M implies sparsity 1 - N/M.",
    )
    sparsity_profile: str | None = Field(
        None,
        description="Layer-wise sparsity profile: 'owl' (Yin et al. 2024) prunes layers with more "
        "outlier Wanda scores less, keeping the layer-mean sparsity equal to `sparsity` (a dense "
        "statistics pass runs first); unset: the same sparsity everywhere.",
    )
    owl_m: float | None = Field(
        None, gt=0.0, description="OWL outlier threshold M: a score above M x the layer mean is an "
        "outlier (the paper uses 5); required with sparsity_profile 'owl'."
    )
    owl_lmbda: float | None = Field(
        None, ge=0.0, description="OWL spread λ: layer sparsities span target ± λ (the paper "
        "uses 0.08); required with sparsity_profile 'owl'."
    )

    needs_calibration: ClassVar[bool] = True
    needs_hessian: ClassVar[bool] = False
    produces: ClassVar[frozenset[str]] = frozenset({"sparsity"})
    legacy_fields: ClassVar[dict[str, str | None]] = {
        "sequential_update": None,
        "quantize": None,
        "final_sparsity": "sparsity",
    }

    # validation ------------------------------------------------------------------------------
    @model_validator(mode="before")
    @classmethod
    def _reject_quantize(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("quantize") not in (None, False):
            raise ValueError(
                "'quantize: true' asked SparseML's SparseGPT to quantize while pruning; reciprune "
                "does that with a separate QuantizationModifier after the pruning modifier in the "
                "same stage. Set 'quantize: false' or remove the field."
            )
        return data

    @field_validator("sparsity", mode="before")
    @classmethod
    def _layer_keys_as_strings(cls, value: Any) -> Any:
        # YAML reads `{0: 0.3}` with integer keys; layer indices are stored as strings.
        return {str(k): v for k, v in value.items()} if isinstance(value, dict) else value

    @field_validator("sparsity")
    @classmethod
    def _check_sparsity(cls, value: SparsitySpec) -> SparsitySpec:
        values = list(value.values()) if isinstance(value, dict) else value
        for s in values if isinstance(values, list) else [values]:
            if not 0.0 <= float(s) < 1.0:
                raise ValueError(f"sparsity {s} is outside [0, 1): 0.5 prunes half the weights")
        if isinstance(value, dict):
            for key in value:
                if key != "default" and not str(key).isdigit() and not str(key).startswith("re:"):
                    raise ValueError(
                        f"sparsity key {key!r} must be a decoder-layer index, a 're:' module "
                        "regex, or 'default'"
                    )
                if str(key).startswith("re:"):
                    validate_target_syntax([str(key)])
        return value

    @field_validator("mask_structure", mode="before")
    @classmethod
    def _legacy_unstructured(cls, value: object) -> object:
        # SparseML recipes write "0:0" for unstructured.
        return "unstructured" if isinstance(value, str) and value.strip() == "0:0" else value

    @field_validator("mask_structure")
    @classmethod
    def _check_structure(cls, value: str) -> str:
        parse_mask_structure(value)
        return value

    @field_validator("sparsity_profile")
    @classmethod
    def _check_profile(cls, value: str | None) -> str | None:
        if value is None or value.lower() in ("uniform", "none"):
            return None
        if value.lower() == "owl":
            return "owl"
        raise ValueError(
            f"unknown sparsity_profile {value!r}: use 'owl' (outlier-weighted layer-wise "
            "sparsity) or leave it unset for the same sparsity in every layer"
        )

    @model_validator(mode="after")
    def _check_owl_target(self) -> PruningModifier:
        if self.sparsity_profile == "owl" and (self.owl_m is None or self.owl_lmbda is None):
            raise ValueError(
                "sparsity_profile 'owl' needs owl_m (outlier threshold M; the paper uses 5) and "
                "owl_lmbda (sparsity spread λ; the paper uses 0.08)"
            )
        if self.sparsity_profile == "owl" and not isinstance(self.sparsity, float | int):
            raise ValueError(
                "sparsity_profile 'owl' spreads one target sparsity over the layers: give "
                "sparsity as a single number, not a per-layer list or mapping"
            )
        return self

    @model_validator(mode="after")
    def _check_nm_sparsity(self) -> PruningModifier:
        n, m = parse_mask_structure(self.mask_structure)
        if m and isinstance(self.sparsity, float | int) and "sparsity" in self.model_fields_set:
            if abs(float(self.sparsity) - (1 - n / m)) > 1e-9:
                raise ValueError(
                    f"mask_structure '{self.mask_structure}' keeps {n} of every {m} weights "
                    f"(sparsity {1 - n / m:g}) but sparsity is {self.sparsity}; remove sparsity "
                    "or make them agree"
                )
        return self

    def check_targets(self, modules: dict[str, nn.Module]) -> None:
        """Raise a RecipeError naming the modules whose input size is not a multiple of M under
        an N:M mask_structure, with the `ignore` entry that skips them."""
        _n, m = parse_mask_structure(self.mask_structure)
        if not m:
            return
        sizes = {name: weight_matrix(module).shape[1] for name, module in modules.items()}
        bad = {name: size for name, size in sizes.items() if size % m}
        if bad:
            listed, ignore = misfit_modules(bad)
            raise RecipeError(
                f"{self.type_name()}: mask_structure '{self.mask_structure}' needs an input size "
                f"that is a multiple of {m}, which {len(bad)} module(s) do not have: {listed}. "
                f"Leave them dense with {ignore} (or their names), or use unstructured sparsity."
            )

    @property
    def needs_profile(self) -> bool:
        return self.sparsity_profile == "owl"

    @property
    def mask_pattern(self) -> str | None:
        return self.mask_structure

    # wiring ----------------------------------------------------------------------------------
    def on_initialize(self, session: LifecycleSession) -> None:
        super().on_initialize(session)
        self.check_targets(self.targeted_modules())
        self._outlier_ratios: dict[int, float] = {}
        self._layer_sparsity: dict[int, float] = {}
        self._layer_n: dict[int, int] = {}
        if not self.needs_profile:
            first = min(self._targets)
            self.sparsity_for(first, next(iter(self._targets[first])))  # a bad mapping fails now

    def structure_for(self, layer_index: int) -> tuple[int, int]:
        """(n, m) of the layer's N:M structure, (0, 0) when unstructured; OWL may vary n."""
        n, m = parse_mask_structure(self.mask_structure)
        return (self._layer_n.get(layer_index, n), m) if m else (0, 0)

    def sparsity_for(self, layer_index: int, module_name: str) -> float:
        """The target sparsity of one module, from the float / list / mapping form or OWL."""
        n, m = self.structure_for(layer_index)
        if m:
            return 1 - n / m
        if self.needs_profile:
            return self._layer_sparsity[layer_index]
        spec = self.sparsity
        if isinstance(spec, list):
            if len(spec) != self._num_layers:
                raise RecipeError(
                    f"{self.type_name()}.sparsity lists {len(spec)} values but the model has "
                    f"{self._num_layers} decoder layers; give one value per layer"
                )
            return float(spec[layer_index])
        if isinstance(spec, dict):
            for key, value in spec.items():
                if str(key) == str(layer_index) or (
                    str(key).startswith("re:") and re.match(str(key)[3:], module_name)
                ):
                    return float(value)
            if "default" in spec:
                return float(spec["default"])
            raise RecipeError(
                f"{self.type_name()}.sparsity has no entry for {module_name} (layer "
                f"{layer_index}); add a 'default' key"
            )
        return float(spec)

    def _owl_profile(self) -> None:
        """OWL: layers with more outlier Wanda scores are pruned less; same mean sparsity."""
        indices = sorted(self._outlier_ratios)
        ratios = [self._outlier_ratios[i] for i in indices]
        n, m = parse_mask_structure(self.mask_structure)
        try:
            if m:
                self._layer_n = dict(zip(indices, owl_layer_nm(ratios, n, m, self.owl_lmbda), strict=True))
            else:
                profile = owl_layer_sparsities(ratios, float(self.sparsity), self.owl_lmbda)
                self._layer_sparsity = dict(zip(indices, profile, strict=True))
        except ValueError as exc:
            raise RecipeError(f"{self.type_name()} OWL profile: {exc}; lower owl_lmbda") from exc

    def on_event(self, session: LifecycleSession, event: Event) -> None:
        if event.type == EventType.PROFILE_END and self.needs_profile:
            self._owl_profile()
            return
        if event.layer_index is None or event.layer_index not in self._targets:
            return
        modules = self._targets[event.layer_index]
        if event.type == EventType.PROFILE_LAYER_START and self.needs_profile:
            for module in modules.values():
                session.statistics.track(module, hessian=False)
        elif event.type == EventType.PROFILE_LAYER_END and self.needs_profile:
            scores = [
                wanda_scores(weight_matrix(module), session.statistics.sq_norm(module)).flatten()
                for module in modules.values()
                if session.statistics.reached(module)  # an expert no token reached has none
            ]
            self._outlier_ratios[event.layer_index] = outlier_ratio(torch.cat(scores), self.owl_m)
        elif event.type == EventType.LAYER_START and self.needs_calibration:
            self.track_layer(session, modules)
        elif event.type == EventType.LAYER_CALIBRATED:
            n, m = self.structure_for(event.layer_index)
            with torch.no_grad():
                masks = self._prune_reached_and_unreached(session, event.layer_index, modules)
            for name, keep in masks.items():
                session.records[name].update(
                    method=self.type_name(),
                    target_sparsity=self.sparsity_for(event.layer_index, name),
                    sparsity=1.0 - keep.float().mean().item(),
                    mask_structure=f"{n}:{m}" if m else "unstructured",
                )
                if self.needs_profile:
                    session.records[name]["owl_outlier_ratio"] = self._outlier_ratios.get(
                        event.layer_index
                    )

    def _prune_reached_and_unreached(
        self, session: LifecycleSession, layer_index: int, modules: dict[str, nn.Module]
    ) -> dict[str, torch.Tensor]:
        """`prune_layer` on the modules calibration reached; an expert the router never chose
        for a calibration token has no statistics and is pruned by magnitude (recorded)."""
        unreached = {
            name: module
            for name, module in modules.items()
            if self.needs_calibration and not session.statistics.reached(module)
        }
        reached = {name: module for name, module in modules.items() if name not in unreached}
        masks: dict[str, torch.Tensor] = {}
        if reached:
            try:
                masks = self.prune_layer(session, layer_index, reached)
            except ValueError as exc:  # the algorithms' own message (e.g. a Hessian not invertible)
                raise ReciPruneError(
                    f"pruning {', '.join(reached)} (decoder layer {layer_index}) failed: {exc}."
                ) from None
        n, m = self.structure_for(layer_index)
        for name, module in unreached.items():
            pruned, masks[name] = magnitude_prune(
                weight_matrix(module), self.sparsity_for(layer_index, name), n=n, m=m
            )
            set_weight_matrix(module, pruned)
            session.records[name]["fallback"] = "magnitude: no calibration token reached it"
        return {name: masks[name] for name in modules}

    def track_layer(self, session: LifecycleSession, modules: dict[str, nn.Module]) -> None:
        """Ask for the input statistics `prune_module` reads."""
        for module in modules.values():
            session.statistics.track(module, hessian=self.needs_hessian)

    def prune_layer(
        self, session: LifecycleSession, layer_index: int, modules: dict[str, nn.Module]
    ) -> dict[str, torch.Tensor]:
        """Prune the targeted modules of one decoder layer in place; their keep masks, by name
        in the order of `modules`. By default one `prune_module` call per module."""
        n, m = self.structure_for(layer_index)
        return {
            name: self.prune_module(session, module, self.sparsity_for(layer_index, name), n, m)
            for name, module in modules.items()
        }

    def prune_module(
        self, session: LifecycleSession, module: nn.Module, sparsity: float, n: int, m: int
    ) -> torch.Tensor:
        """Prune one module in place and return its keep mask."""
        raise NotImplementedError

