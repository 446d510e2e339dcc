"""Explicit modifier registry: a decorator for ours, the `reciprune.modifiers` entry points for others."""

from __future__ import annotations

import difflib
from importlib.metadata import entry_points

from reciprune.errors import RecipeError
from reciprune.modifiers.base import Modifier

ENTRY_POINT_GROUP = "reciprune.modifiers"

_REGISTRY: dict[str, type[Modifier]] = {}
_entry_points_loaded = False


def register_modifier(cls: type[Modifier]) -> type[Modifier]:
    """Class decorator: make `cls` available to recipes under its class name."""
    if not (isinstance(cls, type) and issubclass(cls, Modifier)):
        raise TypeError(f"{cls!r} is not a Modifier subclass")
    name = cls.type_name()
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls:
        raise ValueError(f"a modifier named {name!r} is already registered ({existing.__module__})")
    _REGISTRY[name] = cls
    return cls


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        cls = ep.load()
        if cls.type_name() not in _REGISTRY:
            register_modifier(cls)


def available_modifiers() -> dict[str, type[Modifier]]:
    """All registered modifiers, built-in and from entry points, by name."""
    import reciprune.modifiers  # noqa: F401  (registers the built-in modifiers)

    _load_entry_points()
    return dict(sorted(_REGISTRY.items()))


def get_modifier_class(name: str) -> type[Modifier]:
    """The modifier class registered under `name`, or a RecipeError naming the closest ones."""
    registry = available_modifiers()
    if name in registry:
        return registry[name]
    close = difflib.get_close_matches(name, list(registry), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise RecipeError(
        f"unknown modifier {name!r}.{hint} Run `reciprune modifiers` to list the available ones."
    )
