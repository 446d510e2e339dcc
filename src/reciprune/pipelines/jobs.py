"""End-to-end jobs behind the CLI: load, calibrate, compress, evaluate, save."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from reciprune.data.calibration import DEFAULT_DATASET, load_calibration, load_eval_texts
from reciprune.errors import ReciPruneError
from reciprune.evaluation.perplexity import perplexity
from reciprune.export import build_manifest, layer_sparsity_report, save_checkpoint, sparsity_config
from reciprune.export.save import check_output_dir
from reciprune.models import load_model, resolve_model
from reciprune.modifiers.pruning import PruningModifier
from reciprune.pipelines.oneshot import run_oneshot
from reciprune.recipe import Recipe


@dataclass
class OneshotJob:
    """Options of `reciprune oneshot`; defaults are the embedded model and text."""

    recipe: Recipe
    output_dir: Path
    model: str | None = None
    dataset: str | None = DEFAULT_DATASET
    num_calibration_samples: int = 64
    max_seq_length: int = 512
    calibration_batch_size: int = 8
    seed: int = 42
    eval_ppl: bool = True
    ppl_file: str | None = None
    ppl_samples: int = 16
    overwrite: bool = False
    trust_remote_code: bool = False
    progress: bool = True


def run_oneshot_job(job: OneshotJob) -> dict[str, Any]:
    """Run every stage of `job.recipe` (all oneshot) and save one checkpoint; returns metrics."""
    finetune = [s.name for s in job.recipe.stages if s.run_type != "oneshot"]
    if finetune:
        raise ReciPruneError(
            f"this recipe has finetune stage(s) {finetune}; `reciprune oneshot` runs oneshot "
            "stages only: pass --stage NAME to run one of its oneshot stages"
        )
    check_output_dir(job.output_dir, job.overwrite)
    source = resolve_model(job.model)  # a bad path fails here, before any weights load
    eval_texts = load_eval_texts(job.ppl_file) if job.eval_ppl else None
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    torch.manual_seed(job.seed)
    model, tokenizer, source = load_model(source.spec, trust_remote_code=job.trust_remote_code)
    timings["load_model"] = time.perf_counter() - t0

    needs_data = any(m.requires_data for s in job.recipe.stages for m in s.modifiers)
    calibration = None
    if needs_data:
        t0 = time.perf_counter()
        calibration = load_calibration(
            job.dataset,
            tokenizer,
            num_samples=job.num_calibration_samples,
            max_seq_length=job.max_seq_length,
            seed=job.seed,
        )
        timings["load_data"] = time.perf_counter() - t0

    metrics: dict[str, Any] = {}
    if eval_texts is not None:
        t0 = time.perf_counter()
        metrics["ppl_dense"] = _ppl(model, tokenizer, eval_texts, job)
        timings["eval_dense"] = time.perf_counter() - t0

    records: dict[str, dict[str, Any]] = {}
    batches = list(calibration.batches(job.calibration_batch_size)) if calibration else None
    for stage in job.recipe.stages:
        result = run_oneshot(
            model, stage.modifiers, batches, progress=job.progress, description=stage.name
        )
        for name, record in result.records.items():
            records.setdefault(name, {}).update(record)
        timings.update({f"{stage.name}.{k}": v for k, v in result.timings.items()})

    if eval_texts is not None:
        t0 = time.perf_counter()
        metrics["ppl_compressed"] = _ppl(model, tokenizer, eval_texts, job)
        timings["eval_compressed"] = time.perf_counter() - t0

    layers = layer_sparsity_report(model, list(records) or None)
    for name, record in records.items():
        layers.setdefault(name, {}).update(record)
    pruned = [m for s in job.recipe.stages for m in s.modifiers if isinstance(m, PruningModifier)]
    config = None
    if pruned:
        config = sparsity_config(
            model,
            list(records),
            structure=pruned[-1].mask_structure,
            targets=sorted({t for p in pruned for t in p.targets}),
            # Modifiers act inside the decoder layers only: the output head stays dense.
            ignore=sorted({i for p in pruned for i in p.ignore} | _output_head_names(model)),
        )
        metrics["global_sparsity"] = config["global_sparsity"]
    recipe_yaml = job.recipe.to_yaml()
    manifest = build_manifest(
        recipe_yaml=recipe_yaml,
        model_source=source,
        data_fingerprint=calibration.fingerprint if calibration else None,
        seed=job.seed,
        metrics=metrics,
        timings=timings,
        layers=layers,
        extra={
            "run_type": "oneshot",
            "stages": [s.name for s in job.recipe.stages],
            "calibration": {
                "dataset": job.dataset,
                "num_samples": job.num_calibration_samples if needs_data else 0,
                "max_seq_length": job.max_seq_length,
            },
        },
    )
    save_checkpoint(
        model,
        tokenizer,
        job.output_dir,
        recipe_yaml=recipe_yaml,
        manifest=manifest,
        sparsity_config=config,
        overwrite=job.overwrite,
    )
    return {"metrics": metrics, "timings": timings, "layers": layers}


def _output_head_names(model: torch.nn.Module) -> set[str]:
    head = model.get_output_embeddings()
    return {name for name, module in model.named_modules() if module is head}


def _ppl(model, tokenizer, texts: list[str], job: OneshotJob) -> float:
    result = perplexity(
        model,
        tokenizer,
        texts,
        max_seq_length=job.max_seq_length,
        max_samples=job.ppl_samples,
        progress=job.progress,
    )
    return result.ppl
