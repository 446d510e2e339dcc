"""Recipes: parse (safe YAML, three forms) → normalise → validated `Recipe[Stage[Modifier]]`."""

from reciprune.recipe.parse import apply_overrides, load_recipe
from reciprune.recipe.plan import describe_plan
from reciprune.recipe.schema import Recipe, Stage

__all__ = ["Recipe", "Stage", "apply_overrides", "describe_plan", "load_recipe"]
