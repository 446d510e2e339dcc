"""The jobs behind `oneshot`, `finetune` and `run`: a recipe plus option groups, as data.

A job is what the command line builds, what a manifest records (`options`), what a re-run reads
back and what the torchrun relaunch passes to its workers (a JSON file): one `dump_job` /
`load_job` pair serves all four, so a new option needs no code here.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from reciprune.recipe import Recipe, load_recipe
from reciprune.recipe.options import (
    CalibrationOptions,
    LaunchOptions,
    ModelOptions,
    Options,
    OutputOptions,
    PerplexityOptions,
    option,
)
from reciprune.recipe.schema import Stage
from reciprune.recipe.training import TrainingConfig


class RunOptions(Options):
    """Options of `reciprune run` that apply to its finetune stages."""

    distill_teacher: str | None = option(
        None,
        "Teacher for finetune stages that distill (PATH, self, base, or stage:NAME); overrides "
        "the stages' 'training: distill_teacher'.",
    )


class Job(BaseModel):
    """A recipe and the option groups named in `option_groups` (plus `output`)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    kind: ClassVar[str]
    #: The option groups a manifest records and a re-run repeats.
    option_groups: ClassVar[tuple[str, ...]]

    recipe: Recipe
    output: OutputOptions
    model: ModelOptions = Field(default_factory=ModelOptions)
    evaluation: PerplexityOptions = Field(default_factory=PerplexityOptions)

    def options(self) -> dict[str, dict[str, Any]]:
        """The explicitly given options of every recorded group, JSON data."""
        return {group: getattr(self, group).given() for group in self.option_groups}

    def with_output(self, **changes: Any) -> Job:
        """A copy writing elsewhere or otherwise (`output_dir`, `overwrite`, `resume`, ...)."""
        output = OutputOptions.model_validate({**self.output.given(), **changes})
        return self.model_copy(update={"output": output})


class OneshotJob(Job):
    """`reciprune oneshot`: every (oneshot) stage of the recipe, one checkpoint."""

    kind: ClassVar[str] = "oneshot"
    option_groups: ClassVar[tuple[str, ...]] = ("model", "calibration", "evaluation")

    calibration: CalibrationOptions = Field(default_factory=CalibrationOptions)

    def stage_calibration(self, stage: Stage) -> CalibrationOptions:
        """The stage's calibration: the job's given options over the recipe's `calibration:`."""
        return self.calibration.over(stage.calibration)


class FinetuneJob(Job):
    """`reciprune finetune`: the recipe's one finetune stage with its resolved training."""

    kind: ClassVar[str] = "finetune"
    option_groups: ClassVar[tuple[str, ...]] = ("model", "training", "evaluation")

    training: TrainingConfig

    @property
    def stage(self) -> Stage:
        return self.recipe.stages[0]


class RunJob(Job):
    """`reciprune run`: every stage in order, each into OUTPUT_DIR/<stage>/."""

    kind: ClassVar[str] = "run"
    option_groups: ClassVar[tuple[str, ...]] = (
        "model", "calibration", "evaluation", "run", "launch",
    )  # fmt: skip

    calibration: CalibrationOptions = Field(default_factory=CalibrationOptions)
    run: RunOptions = Field(default_factory=RunOptions)
    launch: LaunchOptions = Field(default_factory=LaunchOptions)


JOB_KINDS: dict[str, type[Job]] = {cls.kind: cls for cls in (OneshotJob, FinetuneJob, RunJob)}


def dump_job(job: Job) -> dict[str, Any]:
    """The job as JSON data: its kind, the recipe's explicit YAML, its output and options."""
    return {
        "kind": job.kind,
        "recipe": job.recipe.to_yaml(),
        "output": job.output.given(),
        "options": job.options(),
    }


def load_job(data: dict[str, Any], **overrides: Any) -> Job:
    """The job `dump_job` wrote (`overrides` replace whole fields, e.g. `output=`)."""
    cls = JOB_KINDS[data["kind"]]
    recipe = data["recipe"]
    fields: dict[str, Any] = {
        "recipe": recipe if isinstance(recipe, Recipe) else load_recipe(recipe),
        "output": data.get("output"),
        **data.get("options", {}),
        **overrides,
    }
    return cls.model_validate(fields)
