"""`reciprune run`: every stage of a recipe in order, each stage's output feeding the next.

Stage `S` writes `OUTPUT_DIR/S/`, a complete Hugging Face checkpoint with its own recipe.yaml and
manifest; the next stage loads it. Oneshot stages calibrate in this process; finetune stages
train in this process, or under torchrun when `nproc_per_node` is given. `run.json` in
OUTPUT_DIR lists the stages, their folders and metrics once all are done, and
OUTPUT_DIR/reciprune_manifest.json records the run itself (recipe, options, model and data
fingerprints, timings, every stage's metrics) so `reciprune run --from-manifest` can repeat it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

from reciprune.errors import ReciPruneError
from reciprune.evaluation.report import read_manifest
from reciprune.export.manifest import build_manifest
from reciprune.export.save import MANIFEST_FILE, RECIPE_FILE, check_output_dir
from reciprune.files import write_text_atomic
from reciprune.models import DEFAULT_MODEL, resolve_model
from reciprune.pipelines.finetune import checkpoint_root
from reciprune.pipelines.jobs import FinetuneJob, OneshotJob, RunJob
from reciprune.recipe.options import ModelOptions
from reciprune.recipe.schema import Stage
from reciprune.recipe.training import TrainingConfig

RUN_FILE = "run.json"
#: `distill_teacher: base`: the model the run (or the finetune command) started from.
BASE_TEACHER = "base"


def _check_output(job: RunJob) -> None:
    out = job.output.output_dir
    # The model folder and an unwritable path are refused as for a single stage; whether a
    # non-empty folder may be reused (--resume) is decided below.
    check_output_dir(out, overwrite=True, model=job.model.model)
    if out.is_dir() and any(out.iterdir()) and not (job.output.resume or job.output.overwrite):
        raise ReciPruneError(
            f"output folder {out} already exists and is not empty. Pass --resume to continue "
            "the run it holds (finished stages are skipped), --overwrite to redo every stage, "
            "or choose another --output-dir."
        )


def resolve_teacher(spec: str | None, job: RunJob, stage: Stage) -> str | None:
    """`stage:NAME` → that earlier stage's output folder; `base` → the model the run started
    from (`--model`); other values unchanged."""
    if spec == BASE_TEACHER:
        return DEFAULT_MODEL if job.model.model is None else job.model.model
    if spec is None or not spec.startswith("stage:"):
        return spec
    name = spec.removeprefix("stage:")
    earlier = job.recipe.stage_names[: job.recipe.stage_names.index(stage.name)]
    if name not in earlier:
        raise ReciPruneError(
            f"stage {stage.name!r}: teacher {spec!r} must name an earlier stage of the recipe "
            f"({', '.join(earlier) or 'there is none'}); its output folder is the teacher."
        )
    return str(job.output.output_dir / name)


def _training_for(job: RunJob, stage: Stage) -> TrainingConfig:
    values = stage.training.given() if stage.training else {}
    for name in ("dataset", "save_format"):  # the flags of `run` serve every stage
        if name in job.calibration.model_fields_set and name not in values:
            values[name] = getattr(job.calibration, name)
    if job.run.distill_teacher is not None:
        values["distill_teacher"] = job.run.distill_teacher
    values["distill_teacher"] = resolve_teacher(values.get("distill_teacher"), job, stage)
    return TrainingConfig.model_validate(values)


def _stage_job(job: RunJob, stage: Stage, model: str | None, training: TrainingConfig | None):
    """The oneshot or finetune job that runs `stage` of the run into OUTPUT_DIR/<stage>/."""
    folder = job.output.output_dir / stage.name
    resume = job.output.resume and stage.run_type == "finetune" and checkpoint_root(folder).is_dir()
    common = {
        "recipe": job.recipe.select(stage.name),
        "output": job.with_output(output_dir=folder, resume=resume).output,
        "model": ModelOptions(model=model, trust_remote_code=job.model.trust_remote_code),
        "evaluation": job.evaluation,
    }
    if stage.run_type == "oneshot":
        return OneshotJob(**common, calibration=job.calibration)
    return FinetuneJob(**common, training=training)


def run_stages(job: RunJob) -> Iterator[tuple[str, Path]]:
    """Run each stage; yields (stage name, output folder) as each finishes (or is skipped)."""
    from reciprune.pipelines.finetune_job import run_finetune_job
    from reciprune.pipelines.launch import run_under_torchrun
    from reciprune.pipelines.oneshot import check_oneshot_stage, run_oneshot_job

    output_dir = Path(job.output.output_dir).expanduser().absolute()
    job = job.with_output(output_dir=output_dir)
    _check_output(job)
    source = resolve_model(job.model.model)  # a bad --model fails here, before any stage starts
    started = time.perf_counter()
    # Teacher references, training arguments, devices and pipelines are checked before the
    # first stage starts (or anything is written).
    trainings = {
        s.name: _training_for(job, s) for s in job.recipe.stages if s.run_type == "finetune"
    }
    for stage in job.recipe.stages:
        if stage.run_type == "oneshot":
            check_oneshot_stage(stage, job.calibration.over(stage.calibration))
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / RECIPE_FILE).write_text(job.recipe.to_yaml(), encoding="utf-8")
    model = job.model.model
    summary: list[dict] = []
    timings: dict[str, float] = {}
    for stage in job.recipe.stages:
        folder = output_dir / stage.name
        stage_started = time.perf_counter()
        record: dict = {"stage": stage.name, "folder": str(folder)}
        summary.append(record)
        if job.output.resume and (folder / MANIFEST_FILE).is_file():  # finished before
            record["skipped"] = True
        else:
            stage_job = _stage_job(job, stage, model, trainings.get(stage.name))
            if stage.run_type == "oneshot":
                record["metrics"] = run_oneshot_job(stage_job)["metrics"]
            elif job.launch.nproc_per_node:
                code = run_under_torchrun(stage_job, job.launch.nproc_per_node)
                if code != 0:
                    raise ReciPruneError(
                        f"stage {stage.name!r} failed under torchrun (exit status {code}); its "
                        "messages are above. Fix the cause and rerun with --resume to skip the "
                        "finished stages."
                    )
                record["metrics"] = read_manifest(folder)["metrics"]
            else:
                record["metrics"] = run_finetune_job(stage_job)["metrics"]
            timings[stage.name] = time.perf_counter() - stage_started
        model = str(folder)
        yield stage.name, folder
    timings["total"] = time.perf_counter() - started
    _write_json(output_dir / RUN_FILE, {"stages": summary, "final": model})
    _write_json(output_dir / MANIFEST_FILE, _run_manifest(job, source, timings))


def _run_manifest(job: RunJob, source, timings: dict[str, float]) -> dict:
    """The run's own manifest: what `reciprune run` was asked to do, and each stage's record
    (read back from the stage folders, which stay the full per-stage manifests)."""
    keys = ("recipe_sha256", "model", "data_fingerprint", "seed")
    stages = {}
    for stage in job.recipe.stages:
        record = read_manifest(job.output.output_dir / stage.name)
        stages[stage.name] = {
            "folder": stage.name,
            "run_type": stage.run_type,
            **{key: record.get(key) for key in keys},
            "metrics": record.get("metrics", {}),
        }
    return build_manifest(
        recipe_yaml=job.recipe.to_yaml(),
        model_source=source,
        data_fingerprint={name: s["data_fingerprint"] for name, s in stages.items()},
        seed=job.calibration.seed,
        metrics={name: s["metrics"] for name, s in stages.items()},
        timings=timings,
        layers={},  # per-module records live in each stage folder's manifest
        extra={
            "run_type": "run",
            "stages": list(stages),
            "stage_records": stages,
            "final": job.recipe.stage_names[-1],
            "options": job.options(),
        },
    )


def _write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str))
