"""Oneshot compression: `run_oneshot` on a loaded model, `run_oneshot_job` for the command.

`run_oneshot` hands a stage's modifiers to a calibration pipeline (`pipelines.calibration`);
the job resolves where it computes (`--device`, `--dtype`, `--pipeline`), loads the model
(whole, or only its outer modules when layers are streamed from disk) and the data, runs every
stage, measures perplexity and saves one checkpoint in the format the modifiers' results call
for (`export.formats`).
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

from reciprune.core.devices import (
    dtype_name,
    peak_memory_mb,
    reset_peak_memory,
    resolve_device,
    resolve_dtype,
)
from reciprune.core.placement import InMemory, Onload, Streamed
from reciprune.core.shards import ShardReader, ShardWriter
from reciprune.core.targets import as_matrix
from reciprune.data.calibration import CalibrationData, load_calibration
from reciprune.errors import ReciPruneError
from reciprune.export import build_manifest, layer_sparsity_report, save_checkpoint
from reciprune.export.formats import CheckpointContents
from reciprune.export.manifest import describe_sparsity, sparsity_metrics, warn_low_decoder_sparsity
from reciprune.export.save import check_output_dir, staging_folder
from reciprune.models import load_config, load_model, load_model_skeleton, resolve_model
from reciprune.modifiers.base import Modifier
from reciprune.pipelines.calibration import PIPELINES, OneshotResult, auto_pipeline, select_pipeline
from reciprune.pipelines.job_run import JobRun
from reciprune.pipelines.jobs import OneshotJob
from reciprune.recipe.schema import Stage

Batch = dict[str, torch.Tensor]
#: Share of the available memory a model may take and still be loaded whole ("auto").
MEMORY_SHARE = 0.7


def run_oneshot(
    model: nn.Module,
    modifiers: list[Modifier],
    batches: list[Batch] | None,
    *,
    progress: bool = True,
    description: str = "oneshot",
    pipeline: str = "auto",
    placement: Any = None,
    exact_error: bool = False,
) -> OneshotResult:
    """Apply oneshot `modifiers` to `model` layer by layer over the calibration `batches`;
    `placement` (`reciprune.core.placement`) says where layers live and run (default: where
    the model is); `exact_error` makes every module's reconstruction error exact (a full XᵀX
    for each, also for methods that need only column norms)."""
    cls = select_pipeline(modifiers, pipeline)
    walker = cls(progress=progress, description=description, placement=placement,
                 exact_error=exact_error)  # fmt: skip
    return walker.run(model, modifiers, batches)


@dataclass(kw_only=True)
class _OneshotRun(JobRun):
    """What the steps of one oneshot job share."""

    job: OneshotJob
    device: torch.device
    dtype: torch.dtype
    pipelines: dict[str, str]  # stage → resolved pipeline name
    placement_kind: str
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    data: dict[str, CalibrationData] = field(default_factory=dict)  # by stage
    reader: ShardReader | None = None  # streaming: the input checkpoint's files
    staging: Path | None = None  # streaming: the output folder being written

    def placement(self, model: nn.Module, *, source: ShardReader | None = None, writer=None):
        """Where layers live and run for this job (streamed ones read from `source`)."""
        if self.placement_kind == "stream":
            return Streamed(self.device, source or self.reader, self.dtype, writer)
        if self.placement_kind == "onload":
            return Onload(self.device)
        return InMemory(model)


def run_oneshot_job(job: OneshotJob) -> dict[str, Any]:
    """Run every stage of `job.recipe` (all oneshot) and save one checkpoint; returns metrics."""
    run = _check(job)
    try:
        return _run(run)
    finally:
        if run.staging is not None and run.staging.exists():  # a failed streamed run
            shutil.rmtree(run.staging, ignore_errors=True)


def _run(run: _OneshotRun) -> dict[str, Any]:
    job = run.job
    model, tokenizer = _load(run)
    _load_data(run, tokenizer)
    reset_peak_memory(run.device)
    run.measure_ppl(model, tokenizer, "ppl_dense", "eval_dense", _ppl_placement(run, model))
    writer = _stream_writer(run, model)
    for stage in job.recipe.stages:
        data = run.data.get(stage.name)
        calibration = job.stage_calibration(stage)
        batches = list(data.batches(calibration.calibration_batch_size)) if data else None
        result = run_oneshot(
            model, stage.modifiers, batches, progress=job.output.progress, description=stage.name,
            pipeline=run.pipelines[stage.name], placement=run.placement(model, writer=writer),
            exact_error=calibration.exact_layer_error,
        )  # fmt: skip
        for name, record in result.records.items():
            run.records.setdefault(name, {}).update(record)
        run.timings.update({f"{stage.name}.{k}": v for k, v in result.timings.items()})
    if writer is not None:
        run.placement(model, writer=writer).finish(model)
    output = ShardReader(run.staging) if run.staging else None
    run.measure_ppl(model, tokenizer, "ppl_compressed", "eval_compressed",
                    _ppl_placement(run, model, output))  # fmt: skip
    layers = _save(run, model, tokenizer, output)
    return {"metrics": run.metrics, "timings": run.timings, "layers": layers}


# --- before weights load --------------------------------------------------------------------------
def _check(job: OneshotJob) -> _OneshotRun:
    """Everything that can fail on user input, before weights load."""
    finetune = [s.name for s in job.recipe.stages if s.run_type != "oneshot"]
    if finetune:
        raise ReciPruneError(
            f"this recipe has finetune stage(s) {finetune}; `reciprune oneshot` runs oneshot "
            "stages only: pass --stage NAME to run one of its oneshot stages"
        )
    check_output_dir(job.output.output_dir, job.output.overwrite, job.model.model)
    source = resolve_model(job.model.model)  # a bad path fails here
    first = job.stage_calibration(job.recipe.stages[0])
    device = resolve_device(first.device)
    config = load_config(job.model.model)
    for stage in job.recipe.stages:
        warn_beyond_positions(job.stage_calibration(stage).max_seq_length, config)
    dtype = resolve_dtype(first.dtype, device, config)
    fits = _fits_in_memory(source.path, dtype)
    pipelines = {}
    for stage in job.recipe.stages:  # an unknown or unfit pipeline fails before weights load
        name = job.stage_calibration(stage).pipeline
        if name == "auto":
            name = auto_pipeline(stage.modifiers, gpu=device.type == "cuda", fits_in_memory=fits)
        select_pipeline(stage.modifiers, name)
        pipelines[stage.name] = name
    kinds = {PIPELINES[n].placement_kind for n in pipelines.values()} - {"memory"}
    if len(kinds) > 1:
        raise ReciPruneError(
            f"the stages ask for different pipelines ({pipelines}); one oneshot run keeps its "
            "model in one place. Use one pipeline, or `reciprune run` (a folder per stage)."
        )
    run = _OneshotRun(job=job, source=source, device=device, dtype=dtype, pipelines=pipelines,
                      placement_kind=next(iter(kinds), "memory"))  # fmt: skip
    if run.placement_kind == "stream":
        _check_streaming(job)
    run.load_eval_texts()
    return run


def warn_beyond_positions(max_seq_length: int, config: Any) -> None:
    """Warn when calibration windows are longer than the positions the model was trained on:
    rotary models run but see positions they never learned; learned-position models fail."""
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and max_seq_length > positions:
        print(f"warning: --max-seq-length {max_seq_length} is longer than the model's "
              f"{positions} positions (max_position_embeddings); calibration statistics beyond "
              f"them are unreliable. Use --max-seq-length {positions} or less.",
              file=sys.stderr)  # fmt: skip


def check_oneshot_stage(stage: Stage, calibration: Any) -> None:
    """What can be checked of a oneshot stage before its model exists (`reciprune run`)."""
    resolve_device(calibration.device)
    select_pipeline(stage.modifiers, calibration.pipeline)


def _fits_in_memory(path: str, dtype: torch.dtype) -> bool:
    """Whether the weights, in `dtype`, take less than MEMORY_SHARE of the available memory
    (True when their size cannot be read: a hub id, a GGUF file)."""
    folder = Path(path)
    try:
        reader = ShardReader(folder)
    except ReciPruneError:  # no safetensors folder (a GGUF file, a hub id)
        return True
    from safetensors import safe_open

    numel = 0
    for file, names in reader.files().items():
        with safe_open(folder / file, framework="pt") as handle:
            for name in names:
                numel += torch.Size(handle.get_slice(name).get_shape()).numel()
    size = numel * torch.empty((), dtype=dtype).element_size()
    return size < MEMORY_SHARE * psutil.virtual_memory().available


def _check_streaming(job: OneshotJob) -> None:
    if len(job.recipe.stages) > 1:
        raise ReciPruneError(
            "--pipeline streaming writes each layer into the output as soon as it is compressed, "
            "so it runs one stage: pass --stage NAME, or use `reciprune run` (a folder per stage)."
        )
    quantizers = [m.type_name() for m in job.recipe.stages[0].modifiers
                  if "quantization" in m.produces]  # fmt: skip
    if quantizers:
        raise ReciPruneError(
            f"--pipeline streaming writes dense weights layer by layer, and {quantizers[0]} "
            "needs the whole model at save time to pack it (compressed-tensors). Use --pipeline "
            "sequential (one layer at a time on the GPU, weights in CPU memory)."
        )


# --- loading --------------------------------------------------------------------------------------
def _load(run: _OneshotRun) -> tuple[nn.Module, Any]:
    """The model in the job's dtype, on the CPU (or on the device for the layerwise pipeline on
    a GPU); for streaming only the modules around the decoder layers."""
    t0 = time.perf_counter()
    torch.manual_seed(run.job.stage_calibration(run.job.recipe.stages[0]).seed)
    trust = run.job.model.trust_remote_code
    if run.placement_kind == "stream":
        model, tokenizer, run.source, run.reader = load_model_skeleton(
            run.source.spec, dtype=run.dtype, trust_remote_code=trust
        )
    else:
        model, tokenizer, run.source = load_model(
            run.source.spec, dtype=run.dtype, trust_remote_code=trust
        )
        if run.placement_kind == "memory":
            model.to(run.device)
    run.timed("load_model", t0)
    return model, tokenizer


def _load_data(run: _OneshotRun, tokenizer: Any) -> None:
    """Each stage's calibration data (stages with the same options share one load)."""
    t0 = time.perf_counter()
    loaded: dict[str, CalibrationData] = {}
    for stage in run.job.recipe.stages:
        if not any(m.requires_data for m in stage.modifiers):
            continue
        options = run.job.stage_calibration(stage)
        key = options.model_dump_json(include={"dataset", "num_calibration_samples",
                                               "max_seq_length", "seed"})  # fmt: skip
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


def _ppl_placement(run: _OneshotRun, model: nn.Module, source: ShardReader | None = None):
    """Perplexity runs the whole model where it is, or layer by layer as the pipeline does."""
    return None if run.placement_kind == "memory" else run.placement(model, source=source)


def _stream_writer(run: _OneshotRun, model: nn.Module) -> ShardWriter | None:
    """Streaming: the output files in a staging folder, split into shards as save_pretrained
    splits them (its default 50 GB shards), each tensor in the model's dtype."""
    if run.placement_kind != "stream":
        return None
    from huggingface_hub import split_torch_state_dict_into_shards

    run.staging = staging_folder(Path(run.job.output.output_dir).expanduser().absolute())
    state = model.state_dict()
    stored = {name: torch.empty_like(state[name], device="meta") for name in run.reader.names}
    split = split_torch_state_dict_into_shards(
        stored, filename_pattern="model{suffix}.safetensors", max_shard_size="50GB"
    )
    specs = {name: (t.dtype, tuple(t.shape)) for name, t in stored.items()}
    return ShardWriter(run.staging, split.filename_to_tensors, specs)


# --- saving ---------------------------------------------------------------------------------------
def _calibration_record(run: _OneshotRun) -> dict[str, Any]:
    """The calibration each stage read (resolved options), for the manifest."""
    return {
        stage.name: {**run.job.stage_calibration(stage).model_dump(mode="json"),
                     "pipeline": run.pipelines[stage.name], "used": stage.name in run.data}
        for stage in run.job.recipe.stages
    }  # fmt: skip


def _stored_weights(reader: ShardReader):
    """A weight source reading each module's weight from the files written (streaming)."""

    def read(name: str, module: nn.Module) -> torch.Tensor:
        return as_matrix(module, reader.get(f"{name}.weight"))

    return read


def _save(
    run: _OneshotRun, model: nn.Module, tokenizer: Any, written: ShardReader | None
) -> dict[str, dict[str, Any]]:
    job = run.job
    weights = {"weights": _stored_weights(written)} if written is not None else {}
    layers = layer_sparsity_report(model, list(run.records) or None, **weights)
    for name, record in run.records.items():
        layers.setdefault(name, {}).update(record)
    modifiers = [m for s in job.recipe.stages for m in s.modifiers]
    sparsity = describe_sparsity(model, modifiers, **weights)
    if sparsity is not None:
        run.metrics["global_sparsity"] = sparsity["global_sparsity"]
        run.metrics.update(sparsity_metrics(model, modifiers, **weights))
        warn_low_decoder_sparsity(run.metrics)
    if run.device.type == "cuda":
        run.metrics["peak_device_memory_mb"] = peak_memory_mb(run.device)
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
            "compute": {"device": str(run.device), "dtype": dtype_name(run.dtype),
                        "pipelines": run.pipelines},  # fmt: skip
        },
    )
    contents = CheckpointContents(
        sparsity=sparsity,
        quantized=any("quantization" in m.produces for m in modifiers),
        streamed=written is not None,
    )
    # One checkpoint for all the job's stages: the last stage's format is the one it is saved in.
    save_format = job.stage_calibration(job.recipe.stages[-1]).save_format
    save_checkpoint(model, tokenizer, job.output.output_dir, recipe_yaml=recipe_yaml,
                    manifest=manifest, contents=contents, save_format=save_format,
                    overwrite=job.output.overwrite, staging=run.staging)  # fmt: skip
    return layers
