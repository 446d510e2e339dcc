"""The validated recipe: an ordered list of stages, each an ordered list of modifiers."""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, model_validator

from reciprune.errors import RecipeError
from reciprune.modifiers.base import Modifier
from reciprune.recipe.options import CalibrationOptions, Options
from reciprune.recipe.training import TrainingConfig

RunType = Literal["oneshot", "finetune"]
RUN_TYPES: tuple[str, ...] = ("oneshot", "finetune")
#: A stage's settings: key → (options model, the run type it belongs to).
STAGE_SETTINGS: dict[str, tuple[type[Options], str]] = {
    "training": (TrainingConfig, "finetune"),
    "calibration": (CalibrationOptions, "oneshot"),
}


class Stage(BaseModel):
    """One stage: a run type (which pipeline runs it) and the modifiers it applies, in order."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="Stage name, unique within the recipe.")
    run_type: RunType = Field(description="'oneshot' (calibration, layer by layer) or 'finetune'.")
    modifiers: list[SerializeAsAny[Modifier]] = Field(
        default_factory=list,
        description="Modifiers applied in this stage, in order (a finetune stage may have none: "
        "dense fine-tuning).",
    )
    training: TrainingConfig | None = Field(
        None, description="Training arguments of a finetune stage (command-line flags override)."
    )
    calibration: CalibrationOptions | None = Field(
        None, description="Calibration options of a oneshot stage (command-line flags override)."
    )

    @model_validator(mode="after")
    def _check_run_types(self) -> Stage:
        if not self.modifiers and self.run_type != "finetune":
            raise ValueError(
                f"a {self.run_type} stage needs at least one modifier (only a finetune stage may "
                "have none: it fine-tunes the dense model)"
            )
        for modifier in self.modifiers:
            if self.run_type not in modifier.run_types:
                raise ValueError(
                    f"{modifier.type_name()} cannot run in a {self.run_type} stage "
                    f"(it supports: {', '.join(modifier.run_types)})"
                )
        for key, (_cls, run_type) in STAGE_SETTINGS.items():
            if getattr(self, key) is not None and self.run_type != run_type:
                raise ValueError(
                    f"'{key}' is only meaningful in a {run_type} stage, not {self.run_type}"
                )
        return self


class Recipe(BaseModel):
    """Stages in the order they run; never flattened, each stage's output feeds the next."""

    model_config = ConfigDict(extra="forbid")

    stages: list[Stage] = Field(min_length=1, description="The stages, in the order they run.")

    @model_validator(mode="after")
    def _check_unique_names(self) -> Recipe:
        names = [stage.name for stage in self.stages]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"stage names must be unique; repeated: {', '.join(duplicates)}")
        return self

    @property
    def stage_names(self) -> list[str]:
        """The stage names, in order."""
        return [stage.name for stage in self.stages]

    def stage(self, name: str) -> Stage:
        """The stage called `name`, or a RecipeError listing the stage names."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise RecipeError(
            f"the recipe has no stage named {name!r}; its stages are: "
            f"{', '.join(self.stage_names)}. Pass one of those names."
        )

    def select(self, stage_name: str | None) -> Recipe:
        """A recipe holding only `stage_name` (the whole recipe when None)."""
        if stage_name is None:
            return self
        return Recipe(stages=[self.stage(stage_name)])

    def to_dict(self) -> dict[str, Any]:
        """The explicit form as plain data: every field of every modifier, JSON-compatible."""
        return {
            "stages": [
                {
                    "name": stage.name,
                    "run_type": stage.run_type,
                    "modifiers": [dump_modifier(m) for m in stage.modifiers],
                    **{
                        key: getattr(stage, key).given()
                        for key in STAGE_SETTINGS
                        if getattr(stage, key) is not None
                    },
                }
                for stage in self.stages
            ]
        }

    def to_yaml(self) -> str:
        """The explicit form as YAML; `load_recipe` reads it back to an equal Recipe."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def dump_modifier(modifier: Modifier) -> dict[str, Any]:
    """`{type: Name, **fields}` with every field, so a saved recipe says exactly what was applied.

    A field left at its default is written too, unless writing it would change what the modifier
    means on reload (e.g. the default sparsity beside an N:M structure that implies another one).
    """
    cls = type(modifier)
    full = modifier.model_dump(mode="json")
    if _reloads_equal(cls, full, modifier):
        return {"type": cls.type_name(), **full}
    fields = modifier.model_dump(mode="json", exclude_unset=True)
    for name, value in full.items():
        if name not in fields and _reloads_equal(cls, {**fields, name: value}, modifier):
            fields[name] = value
    ordered = {name: fields[name] for name in full if name in fields}
    return {"type": cls.type_name(), **ordered}


def _reloads_equal(cls: type[Modifier], fields: dict[str, Any], modifier: Modifier) -> bool:
    try:
        return cls.model_validate(fields) == modifier
    except (ValueError, RecipeError):
        return False
