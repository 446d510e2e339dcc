"""Which modules a modifier acts on: class names, module names and `re:` regexes."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from reciprune.errors import RecipeError

#: Class name that matches every weight matrix a modifier can prune: nn.Linear and GPT-2's Conv1D.
LINEAR_ALIAS = "Linear"


def is_linear_like(module: nn.Module) -> bool:
    """True for nn.Linear, transformers' Conv1D (GPT-2, weight stored transposed) and one
    expert's matrix of fused mixture-of-experts weights (`core.experts.ExpertSlice`)."""
    return isinstance(module, nn.Linear) or type(module).__name__ in ("Conv1D", "ExpertSlice")


def stores_transposed(module: nn.Module) -> bool:
    """Whether the module stores its weight as [in_features, out_features] (GPT-2's Conv1D)."""
    return type(module).__name__ == "Conv1D"


def as_matrix(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor laid out like `module.weight` as [out, in] (GPT-2's Conv1D stores [in, out]);
    the transpose is its own inverse, so this also turns such a matrix back into the layout."""
    return tensor.t() if stores_transposed(module) else tensor


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The module's weight as a [out_features, in_features] view, whatever its storage layout."""
    return as_matrix(module, module.weight.data)


def set_weight_matrix(module: nn.Module, matrix: torch.Tensor) -> None:
    """Write a [out_features, in_features] matrix back into the module's weight, in place."""
    weight_matrix(module).copy_(matrix.to(module.weight.dtype))


def validate_target_syntax(patterns: Iterable[str]) -> None:
    """Compile every `re:` pattern so a bad regex fails while the recipe is validated."""
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise RecipeError(f"target {pattern!r} must be a non-empty string")
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise RecipeError(
                    f"target '{pattern}' is not a valid regular expression ({exc}). "
                    "Targets written as 're:<regex>' are matched with Python's re.match "
                    "against module names such as 'model.layers.0.self_attn.q_proj'."
                ) from exc


def _matches(pattern: str, name: str, module: nn.Module) -> bool:
    # SparseML recipes often name parameters ('re:.*q_proj.weight'): a module matches through
    # its weight's name too.
    if pattern.startswith("re:"):
        regex = pattern[3:]
        return re.match(regex, name) is not None or (
            hasattr(module, "weight") and re.match(regex, f"{name}.weight") is not None
        )
    if pattern in (name, f"{name}.weight"):
        return True
    if pattern == LINEAR_ALIAS:
        return is_linear_like(module)
    return type(module).__name__ == pattern


def resolve_targets(
    root: nn.Module,
    targets: Sequence[str],
    ignore: Sequence[str] = (),
    *,
    prefix: str = "",
) -> dict[str, nn.Module]:
    """Linear-like modules under `root` selected by `targets` and not by `ignore`.

    A target that names a container (a decoder layer, `re:model.layers.\\d+$`) selects every
    Linear-like module inside it, which is how SparseML recipes name "prune this layer".
    Names are full names in the model: `prefix` is the name of `root` within it.
    """
    named = [(f"{prefix}.{n}" if prefix and n else (prefix or n), m) for n, m in root.named_modules()]
    selected_roots = [name for name, module in named if any(_matches(p, name, module) for p in targets)]
    ignored_roots = [name for name, module in named if any(_matches(p, name, module) for p in ignore)]

    def under(name: str, roots: list[str]) -> bool:
        return any(name == r or name.startswith(r + ".") or r == "" for r in roots)

    return {
        name: module
        for name, module in named
        if is_linear_like(module)
        and under(name, selected_roots)
        and not under(name, ignored_roots)
        and not _inside_adapter(name)
    }


def _inside_adapter(name: str) -> bool:
    """True for the Linears PEFT injects (lora_A, lora_B, …): they are an adapter's own weights,
    not the model's weight matrices, so pruning or mask-keeping modifiers never target them."""
    return any(part.startswith("lora_") for part in name.split("."))


def unmatched_patterns(model: nn.Module, patterns: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Patterns that match no module of `model`, each with the closest module or class names."""
    names = [n for n, _ in model.named_modules() if n]
    pool = sorted({type(m).__name__ for m in model.modules()} | {LINEAR_ALIAS}) + names
    return [
        (pattern, difflib.get_close_matches(pattern.removeprefix("re:"), pool, n=3))
        for pattern in patterns
        if not any(_matches(pattern, n, m) for n, m in model.named_modules())
    ]
