"""TargetedModifier: the targets / ignore fields and their resolution inside the decoder layers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field, field_validator
from torch import nn

from reciprune.core.layers import find_decoder_layers
from reciprune.core.targets import resolve_targets, validate_target_syntax
from reciprune.errors import RecipeError
from reciprune.modifiers.base import Modifier

if TYPE_CHECKING:
    from reciprune.core.session import LifecycleSession


def as_list(value: Any) -> Any:
    """Field validator (before): a single pattern written as a string is a list of one."""
    return [value] if isinstance(value, str) else value


def checked_patterns(value: list[str] | None) -> list[str] | None:
    """Field validator: target patterns with their syntax checked (None passes)."""
    try:
        validate_target_syntax(value or [])
    except RecipeError as exc:
        raise ValueError(str(exc)) from None
    return value


class TargetedModifier(Modifier):
    """Base for modifiers that act on Linear modules inside the decoder layers."""

    targets: list[str] = Field(
        default_factory=lambda: ["Linear"],
        description="Modules to act on inside the decoder layers: class names ('Linear' also "
        "matches GPT-2's Conv1D), module names, or 're:' regexes. A container (e.g. "
        "'re:model.layers.\\d+$') selects every Linear inside it.",
    )
    ignore: list[str] = Field(
        default_factory=list,
        description="Modules to leave dense, in the same syntax as targets.",
    )
    _patterns_as_list = field_validator("targets", "ignore", mode="before")(as_list)
    _check_patterns = field_validator("targets", "ignore")(checked_patterns)

    def on_initialize(self, session: LifecycleSession) -> None:
        layers_name, layers = find_decoder_layers(session.model)
        self._num_layers = len(layers)
        self._targets = select_in_layers(layers_name, layers, self.targets, self.ignore)
        if not self._targets:
            raise RecipeError(
                f"{self.type_name()}: targets {self.targets} (ignore {self.ignore}) select no "
                f"Linear module inside the decoder layers '{layers_name}'. Use 'Linear', module "
                "names like 'model.layers.0.mlp.down_proj', or 're:' regexes."
            )

    def targeted_modules(self) -> dict[str, nn.Module]:
        """Every module this modifier acts on, by full name (after `on_initialize`)."""
        return {name: m for found in self._targets.values() for name, m in found.items()}

    def check_targets(self, modules: dict[str, nn.Module]) -> None:
        """Raise a RecipeError when the selected modules (full name → module) cannot take this
        modifier's settings, e.g. a shape they need; `reciprune recipe check` calls it on the
        model built from its config (meta tensors). Nothing to check by default."""


class DeltaModifier(TargetedModifier):
    """Base for modifiers that freeze every weight of the model and train deltas they add in
    `on_prepare` to the targeted modules (`self._modules`), merged into the weights at export."""

    run_types: ClassVar[tuple[str, ...]] = ("finetune",)
    #: Adds per-layer trainable parameters (ISTModifier can schedule them).
    adds_layer_parameters: ClassVar[bool] = True
    freezes_base: ClassVar[bool] = True

    def on_prepare(self, session: LifecycleSession) -> None:
        # Targets are resolved here, before FSDP wraps the layers; only the deltas added next train.
        super().on_initialize(session)
        session.model.requires_grad_(False)

    def on_initialize(self, session: LifecycleSession) -> None:
        if not hasattr(self, "_modules"):
            raise RuntimeError(f"{self.type_name()} adds parameters: call session.prepare() first")


def select_in_layers(
    layers_name: str, layers: Sequence[nn.Module], targets: list[str], ignore: list[str]
) -> dict[int, dict[str, nn.Module]]:
    """Decoder-layer index → the modules (by full name) `targets` select in it less `ignore`;
    layers where nothing is selected are left out."""
    selected = {}
    for index, layer in enumerate(layers):
        if found := resolve_targets(layer, targets, ignore, prefix=f"{layers_name}.{index}"):
            selected[index] = found
    return selected


def misfit_modules(bad: dict[str, int]) -> tuple[str, str]:
    """For modules whose input size (full name → in_features) a setting cannot take: a short
    listing of them, and the `ignore:` entry that leaves them alone."""
    listed = ", ".join(f"{name} (in {size})" for name, size in list(bad.items())[:6])
    more = f" and {len(bad) - 6} more" if len(bad) > 6 else ""
    leaves = sorted({name.rsplit(".", 1)[-1] for name in bad})
    return f"{listed}{more}", f"ignore: ['re:.*\\.({'|'.join(leaves)})$']"
