"""Modifier registry: explicit registration, entry-point plug-ins, helpful unknown-name errors."""

from __future__ import annotations

import pytest

import reciprune.modifiers.registry as registry
from reciprune.errors import RecipeError
from reciprune.modifiers import Modifier, SparseGPTModifier, get_modifier_class
from reciprune.recipe import load_recipe


class PluginModifier(Modifier):
    """A third-party modifier shipped by another package."""


class _EntryPoint:
    def __init__(self, target: type) -> None:
        self.target = target

    def load(self) -> type:
        return self.target


def test_builtin_modifiers_are_registered_by_class_name():
    assert get_modifier_class("SparseGPTModifier") is SparseGPTModifier


def test_unknown_modifier_names_the_closest_ones():
    with pytest.raises(RecipeError, match="SparseGPTModifier"):
        get_modifier_class("SparseGPTModifer")


def test_entry_point_plugins_are_usable_from_recipes(monkeypatch):
    seen_groups = []

    def fake_entry_points(group: str):
        seen_groups.append(group)
        return [_EntryPoint(PluginModifier)]

    monkeypatch.setattr(registry, "entry_points", fake_entry_points)
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    recipe = load_recipe("modifiers:\n  - type: PluginModifier\n    start: 0\n")
    assert seen_groups == ["reciprune.modifiers"]
    assert isinstance(recipe.stages[0].modifiers[0], PluginModifier)


def test_registering_a_different_class_under_a_taken_name_fails(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    class SparseGPTModifier(Modifier):  # noqa: N801 - the clash is the point
        """Clash."""

    with pytest.raises(ValueError, match="already registered"):
        registry.register_modifier(SparseGPTModifier)
    with pytest.raises(TypeError):
        registry.register_modifier(int)  # type: ignore[arg-type]
