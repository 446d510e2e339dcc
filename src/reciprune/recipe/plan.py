"""A readable plan of what a recipe will do, checked against a model built without weights."""

from __future__ import annotations

import itertools
import os
from typing import TYPE_CHECKING, Any

from reciprune.core.layers import find_decoder_layers
from reciprune.core.targets import is_linear_like, unmatched_patterns
from reciprune.errors import ModelLoadError, RecipeError
from reciprune.modifiers.base import Modifier
from reciprune.modifiers.pruning import PruningModifier
from reciprune.modifiers.targeted import TargetedModifier, select_in_layers
from reciprune.recipe.schema import Recipe, Stage

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig

_SEP = " › "


def describe_plan(recipe: Recipe, config: PretrainedConfig | None = None) -> str:
    """Each stage and modifier with the settings that differ from defaults; with `config`, also the
    modules each targeting modifier acts on and the share of the model's parameters they hold.

    The model is built from `config` on the meta device: no weights are loaded or allocated.
    Targets that match no module raise a RecipeError naming the closest module names.
    """
    model = _meta_model(config) if config is not None else None
    lines: list[str] = []
    if model is not None:
        layers_name, layers = find_decoder_layers(model)
        total = sum(p.numel() for p in model.parameters())
        lines.append(
            f"Model: {type(model).__name__}, {total:,} parameters, {len(layers)} decoder "
            f"layers in '{layers_name}' (built from its config, no weights)"
        )
    for number, stage in enumerate(recipe.stages, 1):
        lines.append(f"Stage {number}/{len(recipe.stages)} '{stage.name}' ({stage.run_type})")
        if stage.training is not None:
            written = stage.training.model_dump(exclude_unset=True)
            shown = ", ".join(f"{k}={_show(v)}" for k, v in written.items())
            lines.append(f"  training: {shown or 'defaults'}")
        if not stage.modifiers:
            lines.append("  no modifier: dense fine-tuning")
        for modifier in stage.modifiers:
            settings = _changed_settings(modifier)
            note = (
                " [uses calibration data]"
                if modifier.requires_data and stage.run_type == "oneshot"
                else ""
            )
            lines.append(f"  {modifier.type_name()}: {settings or 'defaults'}{note}")
            if model is not None and isinstance(modifier, TargetedModifier):
                lines.extend("    " + line for line in _target_lines(model, stage, modifier))
    return "\n".join(lines)


def _meta_model(config: PretrainedConfig) -> nn.Module:
    """The causal LM for `config` with every tensor on the meta device (shapes only)."""
    import torch
    from transformers import AutoModelForCausalLM

    from reciprune.core.experts import attach_expert_slices

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"cannot build a causal language model from the {getattr(config, 'model_type', '?')} "
            f"config ({exc}). reciprune supports decoder-only transformers models."
        ) from exc
    attach_expert_slices(model)  # the experts are targets as in a run
    return model


def _changed_settings(modifier: Modifier) -> str:
    """`field=value` for every field whose value differs from its default."""
    items = []
    for name, info in type(modifier).model_fields.items():
        value = getattr(modifier, name)
        if value != info.get_default(call_default_factory=True):
            items.append(f"{name}={_show(value)}")
    if isinstance(modifier, PruningModifier) and "sparsity" not in modifier.model_fields_set:
        if modifier.mask_structure == "unstructured":
            # The field has a default; a plan must still say how much will be pruned.
            items.insert(0, f"sparsity={_show(modifier.sparsity)} (default)")
    return ", ".join(items)


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _target_lines(model: nn.Module, stage: Stage, modifier: TargetedModifier) -> list[str]:
    """Which modules the modifier selects, compactly, and how many weights they hold."""
    where = _SEP.join([f"stage '{stage.name}'", modifier.type_name(), "targets"])
    layers_name, layers = find_decoder_layers(model)
    missing = unmatched_patterns(model, modifier.targets)
    example = _example_name(model, layers_name)
    if missing:
        pattern, close = missing[0]
        hint = f" Closest names: {', '.join(close)}." if close else ""
        raise RecipeError(
            f"{where}: {pattern!r} matches no module of {type(model).__name__}.{hint} Use "
            f"'Linear', module names such as '{example}', or 're:' regexes matched against module "
            "names (or their '.weight' parameter names)."
        )
    selected = select_in_layers(layers_name, layers, modifier.targets, modifier.ignore)
    if not selected:
        raise RecipeError(
            f"{where}: {modifier.targets} (ignore {modifier.ignore}) select no Linear module "
            f"inside the decoder layers '{layers_name}'. Use 'Linear', module names such as "
            f"'{example}', or 're:' regexes."
        )
    total = sum(p.numel() for p in model.parameters())
    try:
        modifier.check_targets({n: m for found in selected.values() for n, m in found.items()})
        estimate = ""
        if isinstance(modifier, PruningModifier):
            estimate = _pruned_estimate(modifier, selected, len(layers), total)
    except RecipeError as exc:
        raise RecipeError(f"stage '{stage.name}'{_SEP}{exc}") from None
    lines = _module_groups(selected, layers_name, len(layers))
    weights = sum(m.weight.numel() for found in selected.values() for m in found.values())
    line = f"{weights:,} weights, {100 * weights / total:.1f}% of the model's parameters"
    lines.append(line + estimate)
    for pattern, _ in unmatched_patterns(model, modifier.ignore):
        lines.append(f"note: ignore {pattern!r} matches no module")
    return lines


def _pruned_estimate(
    modifier: PruningModifier,
    selected: dict[int, dict[str, nn.Module]],
    num_layers: int,
    total: int,
) -> str:
    """'; about N set to zero (x% of the model)', using the modifier's own per-module sparsity."""
    probe = modifier.model_copy()
    probe._num_layers = num_layers  # what on_initialize would set; sparsity_for reads it
    probe._layer_n = {}  # no OWL profile on a model without weights: N:M as written
    zeros = sum(
        m.weight.numel() * probe.sparsity_for(index, name)
        for index, found in selected.items()
        for name, m in found.items()
    )
    return f"; about {round(zeros):,} set to zero ({100 * zeros / total:.1f}% of the model)"


def _module_groups(
    selected: dict[int, dict[str, nn.Module]], layers_name: str, num_layers: int
) -> list[str]:
    """'7 modules × 30 layers: self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj', one line per
    distinct set of modules."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for index, found in selected.items():
        prefix = f"{layers_name}.{index}."
        names = tuple(name.removeprefix(prefix) for name in found)
        groups.setdefault(names, []).append(index)
    lines = []
    for names, indices in groups.items():
        layers = f"{len(indices)} layer{'s' if len(indices) != 1 else ''}"
        if len(indices) != num_layers:
            layers += f" ({_ranges(indices)})"
        noun = "module" if len(names) == 1 else "modules"
        lines.append(f"{len(names)} {noun} × {layers}: {_compact(list(names))}")
    return lines


def _compact(names: list[str]) -> str:
    """Module names sharing a parent, written once with braces: 'mlp.{gate,up,down}_proj'."""
    by_parent: dict[str, list[str]] = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        by_parent.setdefault(parent, []).append(leaf)
    return ", ".join(
        (f"{parent}." if parent else "") + _brace(leaves) for parent, leaves in by_parent.items()
    )


def _brace(leaves: list[str]) -> str:
    if len(leaves) == 1:
        return leaves[0]
    prefix = os.path.commonprefix(leaves)
    prefix = prefix[: prefix.rfind("_") + 1]  # factor out whole words only
    suffix = os.path.commonprefix([leaf[::-1] for leaf in leaves])[::-1]
    suffix = suffix[suffix.find("_") :] if "_" in suffix else ""
    stems = [leaf[len(prefix) : len(leaf) - len(suffix)] for leaf in leaves]
    if not all(stems):
        prefix, suffix, stems = "", "", leaves
    return f"{prefix}{{{','.join(stems)}}}{suffix}"


def _ranges(indices: list[int]) -> str:
    """'0-3, 5, 7-8' for [0, 1, 2, 3, 5, 7, 8]."""
    # Within a run of consecutive indices, index minus position stays the same.
    runs = itertools.groupby(enumerate(indices), key=lambda item: item[1] - item[0])
    spans = [[index for _, index in run] for _, run in runs]
    return ", ".join(str(span[0]) if len(span) == 1 else f"{span[0]}-{span[-1]}" for span in spans)


def _example_name(model: nn.Module, layers_name: str) -> str:
    for name, module in model.named_modules():
        if name.startswith(f"{layers_name}.0.") and is_linear_like(module):
            return name
    return f"{layers_name}.0"
