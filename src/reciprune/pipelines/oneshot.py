"""Oneshot compression: `run_oneshot` on a loaded model, `run_oneshot_job` for the command.

`run_oneshot` hands a stage's modifiers to a calibration pipeline (`pipelines.calibration`);
the job loads the model and data, runs every stage, measures perplexity and saves one
checkpoint in the format the modifiers' results call for (`export.formats`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from reciprune.data.calibration import CalibrationData, load_calibration
from reciprune.errors import ReciPruneError
from reciprune.export import build_manifest, layer_sparsity_report, save_checkpoint
from reciprune.export.formats import CheckpointContents
from reciprune.export.manifest import describe_sparsity
from reciprune.export.save import check_output_dir
from reciprune.models import load_model, resolve_model
from reciprune.modifiers.base import Modifier
from reciprune.pipelines.calibration import OneshotResult, select_pipeline
from reciprune.pipelines.job_run import JobRun
from reciprune.pipelines.jobs import OneshotJob
from reciprune.recipe.schema import Stage

Batch = dict[str, torch.Tensor]


def run_oneshot(
    model: nn.Module,
    modifiers: list[Modifier],
    batches: list[Batch] | None,
    *,
    progress: bool = True,
    description: str = "oneshot",
    pipeline: str = "auto",
) -> OneshotResult:
    """Apply oneshot `modifiers` to `model` layer by layer over the calibration `batches`."""
    cls = select_pipeline(modifiers, pipeline)
    return cls(progress=progress, description=description).run(model, modifiers, batches)


@dataclass(kw_only=True)
class _OneshotRun(JobRun):
    """What the steps of one oneshot job share."""

    job: OneshotJob
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    data: dict[str, CalibrationData] = field(default_factory=dict)  # by stage


def run_oneshot_job(job: OneshotJob) -> dict[str, Any]:
    """Run every stage of `job.recipe` (all oneshot) and save one checkpoint; returns metrics."""
    run = _check(job)
    t0 = time.perf_counter()
    torch.manual_seed(job.calibration.over(job.recipe.stages[0].calibration).seed)
    model, tokenizer, run.source = load_model(
        run.source.spec, trust_remote_code=job.model.trust_remote_code
    )
    run.timed("load_model", t0)
    _load_data(run, tokenizer)
    run.measure_ppl(model, tokenizer, "ppl_dense", "eval_dense")
    for stage in job.recipe.stages:
        data = run.data.get(stage.name)
        calibration = job.stage_calibration(stage)
        batches = list(data.batches(calibration.calibration_batch_size)) if data else None
        result = run_oneshot(
            model, stage.modifiers, batches, progress=job.output.progress,
            description=stage.name, pipeline=calibration.pipeline,
        )  # fmt: skip
        for name, record in result.records.items():
            run.records.setdefault(name, {}).update(record)
        run.timings.update({f"{stage.name}.{k}": v for k, v in result.timings.items()})
    run.measure_ppl(model, tokenizer, "ppl_compressed", "eval_compressed")
    layers = _save(run, model, tokenizer)
    return {"metrics": run.metrics, "timings": run.timings, "layers": layers}


def _check(job: OneshotJob) -> _OneshotRun:
    """Everything that can fail on user input, before weights load."""
    finetune = [s.name for s in job.recipe.stages if s.run_type != "oneshot"]
    if finetune:
        raise ReciPruneError(
            f"this recipe has finetune stage(s) {finetune}; `reciprune oneshot` runs oneshot "
            "stages only: pass --stage NAME to run one of its oneshot stages"
        )
    check_output_dir(job.output.output_dir, job.output.overwrite)
    for stage in job.recipe.stages:  # an unknown or unfit pipeline fails before weights load
        select_pipeline(stage.modifiers, job.stage_calibration(stage).pipeline)
    run = _OneshotRun(job=job, source=resolve_model(job.model.model))  # bad paths fail here
    run.load_eval_texts()
    return run


def _needs_data(stage: Stage) -> bool:
    return any(m.requires_data for m in stage.modifiers)


def _load_data(run: _OneshotRun, tokenizer: Any) -> None:
    """Each stage's calibration data (stages with the same options share one load)."""
    t0 = time.perf_counter()
    loaded: dict[str, CalibrationData] = {}
    for stage in run.job.recipe.stages:
        if not _needs_data(stage):
            continue
        options = run.job.stage_calibration(stage)
        key = options.model_dump_json(exclude={"calibration_batch_size"})
        if key not in loaded:
            loaded[key] = load_calibration(
                options.dataset,
                tokenizer,
                num_samples=options.num_calibration_samples,
                max_seq_length=options.max_seq_length,
                seed=options.seed,
            )
        run.data[stage.name] = loaded[key]
    if loaded:
        run.timed("load_data", t0)


def _calibration_record(run: _OneshotRun) -> dict[str, Any]:
    """The calibration each stage read (resolved options), for the manifest."""
    return {
        stage.name: {**run.job.stage_calibration(stage).model_dump(mode="json"),
                     "used": stage.name in run.data}
        for stage in run.job.recipe.stages
    }  # fmt: skip


def _save(run: _OneshotRun, model: nn.Module, tokenizer: Any) -> dict[str, dict[str, Any]]:
    job = run.job
    layers = layer_sparsity_report(model, list(run.records) or None)
    for name, record in run.records.items():
        layers.setdefault(name, {}).update(record)
    modifiers = [m for s in job.recipe.stages for m in s.modifiers]
    sparsity = describe_sparsity(model, modifiers)
    if sparsity is not None:
        run.metrics["global_sparsity"] = sparsity["global_sparsity"]
    recipe_yaml = job.recipe.to_yaml()
    fingerprints = {d.fingerprint for d in run.data.values()}
    manifest = build_manifest(
        recipe_yaml=recipe_yaml,
        model_source=run.source,
        data_fingerprint=next(iter(fingerprints)) if len(fingerprints) == 1 else (
            {name: d.fingerprint for name, d in run.data.items()} or None
        ),
        seed=job.stage_calibration(job.recipe.stages[0]).seed,
        metrics=run.metrics,
        timings=run.timings,
        layers=layers,
        extra={
            "run_type": "oneshot",
            "stages": job.recipe.stage_names,
            "options": job.options(),
            "calibration": _calibration_record(run),
        },
    )
    contents = CheckpointContents(
        sparsity=sparsity, quantized=any("quantization" in m.produces for m in modifiers)
    )
    save_checkpoint(
        model,
        tokenizer,
        job.output.output_dir,
        recipe_yaml=recipe_yaml,
        manifest=manifest,
        contents=contents,
        overwrite=job.output.overwrite,
    )
    return layers
