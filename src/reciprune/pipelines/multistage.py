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
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from reciprune.data.calibration import DEFAULT_DATASET
from reciprune.errors import ReciPruneError
from reciprune.export.manifest import build_manifest, job_invocation
from reciprune.export.save import MANIFEST_FILE
from reciprune.files import write_text_atomic
from reciprune.models import DEFAULT_MODEL, resolve_model
from reciprune.recipe import Recipe
from reciprune.recipe.schema import Stage
from reciprune.recipe.training import TrainingConfig

RUN_FILE = "run.json"
#: `distill_teacher: base`: the model the run (or the finetune command) started from.
BASE_TEACHER = "base"
RECIPE_COPY = "recipe.yaml"


@dataclass
class RunJob:
    """Options of `reciprune run`."""

    recipe: Recipe
    output_dir: Path
    model: str | None = None
    dataset: str | None = None
    num_calibration_samples: int = 64
    calibration_seq_length: int = 512
    calibration_batch_size: int = 8
    seed: int = 42
    distill_teacher: str | None = None
    nproc_per_node: int | None = None
    resume: bool = False
    overwrite: bool = False
    eval_ppl: bool = True
    ppl_file: str | None = None
    ppl_samples: int = 16
    trust_remote_code: bool = False
    progress: bool = True


def _complete(folder: Path) -> bool:
    return (folder / MANIFEST_FILE).is_file()


def _check_output(job: RunJob) -> None:
    out = job.output_dir
    if out.exists() and not out.is_dir():
        raise ReciPruneError(f"output path {out} is a file. Choose another --output-dir.")
    if out.is_dir() and any(out.iterdir()) and not (job.resume or job.overwrite):
        raise ReciPruneError(
            f"output folder {out} already exists and is not empty. Pass --resume to continue "
            "the run it holds (finished stages are skipped), --overwrite to redo every stage, "
            "or choose another --output-dir."
        )


def resolve_teacher(
    spec: str | None, recipe: Recipe, stage: Stage, output_dir: Path, model: str | None = None
) -> str | None:
    """`stage:NAME` → that earlier stage's output folder; `base` → the model the run started
    from (`--model`); other values unchanged."""
    if spec == BASE_TEACHER:
        return DEFAULT_MODEL if model is None else model
    if spec is None or not spec.startswith("stage:"):
        return spec
    name = spec.removeprefix("stage:")
    earlier = recipe.stage_names[: recipe.stage_names.index(stage.name)]
    if name not in earlier:
        raise ReciPruneError(
            f"stage {stage.name!r}: teacher {spec!r} must name an earlier stage of the recipe "
            f"({', '.join(earlier) or 'there is none'}); its output folder is the teacher."
        )
    return str(output_dir / name)


def _training_for(job: RunJob, stage: Stage) -> TrainingConfig:
    values = stage.training.model_dump(exclude_unset=True) if stage.training else {}
    if job.dataset is not None and "dataset" not in values:
        values["dataset"] = job.dataset
    if job.distill_teacher is not None:
        values["distill_teacher"] = job.distill_teacher
    values["distill_teacher"] = resolve_teacher(
        values.get("distill_teacher"), job.recipe, stage, job.output_dir, job.model
    )
    return TrainingConfig.model_validate(values)


def run_stages(job: RunJob) -> Iterator[tuple[str, Path]]:
    """Run each stage; yields (stage name, output folder) as each finishes (or is skipped)."""
    from reciprune.pipelines.jobs import FinetuneJob, OneshotJob, run_finetune_job, run_oneshot_job

    job.output_dir = Path(job.output_dir).expanduser().absolute()
    _check_output(job)
    source = resolve_model(job.model)  # a bad --model fails here, before any stage starts
    started = time.perf_counter()
    # Teacher references and training arguments are checked before the first stage starts.
    trainings = {
        s.name: _training_for(job, s) for s in job.recipe.stages if s.run_type == "finetune"
    }
    job.output_dir.mkdir(parents=True, exist_ok=True)
    (job.output_dir / RECIPE_COPY).write_text(job.recipe.to_yaml(), encoding="utf-8")
    model = job.model
    summary: list[dict] = []
    timings: dict[str, float] = {}
    for stage in job.recipe.stages:
        folder = job.output_dir / stage.name
        stage_started = time.perf_counter()
        if job.resume and _complete(folder):
            summary.append({"stage": stage.name, "folder": str(folder), "skipped": True})
            model = str(folder)
            yield stage.name, folder
            continue
        if stage.run_type == "oneshot":
            result = run_oneshot_job(
                OneshotJob(
                    recipe=job.recipe.select(stage.name),
                    output_dir=folder,
                    model=model,
                    dataset=job.dataset or DEFAULT_DATASET,
                    num_calibration_samples=job.num_calibration_samples,
                    max_seq_length=job.calibration_seq_length,
                    calibration_batch_size=job.calibration_batch_size,
                    seed=job.seed,
                    eval_ppl=job.eval_ppl,
                    ppl_file=job.ppl_file,
                    ppl_samples=job.ppl_samples,
                    overwrite=job.overwrite,
                    trust_remote_code=job.trust_remote_code,
                    progress=job.progress,
                )
            )
            metrics = result["metrics"]
        elif job.nproc_per_node:
            _finetune_under_torchrun(job, stage, trainings[stage.name], model, folder)
            metrics = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))["metrics"]
        else:
            result = run_finetune_job(
                FinetuneJob(
                    stage=stage,
                    recipe_yaml=job.recipe.select(stage.name).to_yaml(),
                    training=trainings[stage.name],
                    output_dir=folder,
                    model=model,
                    resume=job.resume and folder.with_name(folder.name + ".checkpoints").is_dir(),
                    overwrite=job.overwrite,
                    eval_ppl=job.eval_ppl,
                    ppl_file=job.ppl_file,
                    ppl_samples=job.ppl_samples,
                    trust_remote_code=job.trust_remote_code,
                    progress=job.progress,
                )
            )
            metrics = result["metrics"]
        summary.append({"stage": stage.name, "folder": str(folder), "metrics": metrics})
        timings[stage.name] = time.perf_counter() - stage_started
        model = str(folder)
        yield stage.name, folder
    timings["total"] = time.perf_counter() - started
    _write_json(job.output_dir / RUN_FILE, {"stages": summary, "final": model})
    _write_json(job.output_dir / MANIFEST_FILE, _run_manifest(job, source, timings))


def _run_manifest(job: RunJob, source, timings: dict[str, float]) -> dict:
    """The run's own manifest: what `reciprune run` was asked to do, and each stage's record
    (read back from the stage folders, which stay the full per-stage manifests)."""
    stages = {}
    for stage in job.recipe.stages:
        record = json.loads((job.output_dir / stage.name / MANIFEST_FILE).read_text("utf-8"))
        stages[stage.name] = {
            "folder": stage.name,
            "run_type": stage.run_type,
            "recipe_sha256": record.get("recipe_sha256"),
            "model": record.get("model"),
            "data_fingerprint": record.get("data_fingerprint"),
            "seed": record.get("seed"),
            "metrics": record.get("metrics", {}),
        }
    return build_manifest(
        recipe_yaml=job.recipe.to_yaml(),
        model_source=source,
        data_fingerprint={name: s["data_fingerprint"] for name, s in stages.items()},
        seed=job.seed,
        metrics={name: s["metrics"] for name, s in stages.items()},
        timings=timings,
        layers={},  # per-module records live in each stage folder's manifest
        extra={
            "run_type": "run",
            "stages": list(stages),
            "stage_records": stages,
            "final": job.recipe.stage_names[-1],
            "invocation": job_invocation(job),
        },
    )


def _finetune_under_torchrun(
    job: RunJob, stage: Stage, training: TrainingConfig, model: str | None, folder: Path
) -> None:
    recipe_file = job.output_dir / RECIPE_COPY
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={job.nproc_per_node}", "-m", "reciprune", "finetune",
        "--recipe", str(recipe_file), "--stage", stage.name, "--output-dir", str(folder),
        "--ppl-samples", str(job.ppl_samples),
    ]  # fmt: skip
    if model is not None:
        command += ["--model", model]
    if training.dataset is not None:
        command += ["--dataset", training.dataset]
    if training.distill_teacher is not None:
        command += ["--distill-teacher", training.distill_teacher]
    if job.resume and folder.with_name(folder.name + ".checkpoints").is_dir():
        command.append("--resume")
    if job.overwrite:
        command.append("--overwrite")
    if not job.eval_ppl:
        command.append("--no-eval-ppl")
    if job.ppl_file:
        command += ["--ppl-file", job.ppl_file]
    if job.trust_remote_code:
        command.append("--trust-remote-code")
    if not job.progress:
        command.append("--no-progress")
    code = subprocess.call(command)
    if code != 0:
        raise ReciPruneError(
            f"stage {stage.name!r} failed under torchrun (exit status {code}); its messages are "
            "above. Fix the cause and rerun with --resume to skip the finished stages."
        )


def _write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str))
