"""End-to-end jobs behind the CLI: load, calibrate, compress, evaluate, save."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from reciprune.data.calibration import DEFAULT_DATASET, load_calibration, load_eval_texts
from reciprune.errors import ReciPruneError
from reciprune.evaluation.perplexity import perplexity
from reciprune.export import build_manifest, layer_sparsity_report, save_checkpoint, sparsity_config
from reciprune.export.manifest import job_invocation
from reciprune.export.save import check_output_dir
from reciprune.models import load_model, resolve_model
from reciprune.modifiers.constant import ConstantPruningModifier
from reciprune.modifiers.pruning import PruningModifier
from reciprune.pipelines.oneshot import run_oneshot
from reciprune.recipe import Recipe
from reciprune.recipe.schema import Stage
from reciprune.recipe.training import TrainingConfig


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
            "invocation": job_invocation(job),
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


# --- finetune -------------------------------------------------------------------------------------
@dataclass
class FinetuneJob:
    """Options of `reciprune finetune` for one finetune stage (recipe values already merged)."""

    stage: Stage
    recipe_yaml: str
    training: TrainingConfig
    output_dir: Path
    model: str | None = None
    resume: bool = False
    overwrite: bool = False
    eval_ppl: bool = True
    ppl_file: str | None = None
    ppl_samples: int = 16
    ppl_max_seq_length: int = 512
    trust_remote_code: bool = False
    progress: bool = True


def run_finetune_job(job: FinetuneJob) -> dict[str, Any]:
    """Train one finetune stage (1 process, or N under torchrun with FSDP2) and save a plain
    Hugging Face checkpoint with recipe.yaml, manifest (with the loss curve) and loss_curve.png.

    Every check that can fail on user input runs before weights load or training starts.
    """
    from reciprune.core import distributed as D
    from reciprune.data.training import load_training_data
    from reciprune.pipelines.finetune import (
        Trainer,
        causal_lm_loss,
        check_4bit_base,
        checkpoint_root,
        finetune_stage_session,
        frozen_copy,
        latest_checkpoint,
        plan_batches,
        resolve_precision,
        setup_distributed,
        shard_model,
    )

    config = job.training
    output_dir = Path(job.output_dir).expanduser().absolute()
    device = setup_distributed()
    needs_teacher = [m.type_name() for m in job.stage.modifiers if m.needs_teacher]
    if needs_teacher and not config.distill_teacher:
        raise ReciPruneError(
            f"stage {job.stage.name!r} has {', '.join(needs_teacher)}, which needs a teacher "
            "model: pass --distill-teacher PATH (a model folder), or --distill-teacher self for "
            "a frozen copy of the starting model."
        )
    if config.distill_teacher and config.distill_teacher.startswith("stage:"):
        raise ReciPruneError(
            f"--distill-teacher {config.distill_teacher}: 'stage:NAME' names the output of an "
            "earlier stage and only works in `reciprune run`. Pass that stage's output folder."
        )
    check_4bit_base(config, job.stage, D.world_size())
    base_backend = None
    if config.load_in_4bit:  # an unusable backend fails here, before any weights load
        from reciprune.core.nf4_base import select_backend

        base_backend = select_backend(
            config.quant_backend, device, double_quant=config.bnb_4bit_use_double_quant
        )
    checkpoints = checkpoint_root(output_dir)
    resume_from = None
    if job.resume:
        resume_from = latest_checkpoint(checkpoints)
        if resume_from is None:
            raise ReciPruneError(
                f"--resume: no complete checkpoint in {checkpoints}. Checkpoints are written "
                "every --save-steps steps; run without --resume to start from the beginning."
            )
    else:
        check_output_dir(output_dir, job.overwrite)
        if checkpoints.exists() and any(checkpoints.iterdir()):
            if not job.overwrite:
                raise ReciPruneError(
                    f"a previous run left checkpoints in {checkpoints}. Pass --resume to continue "
                    "it, or --overwrite to start over (its checkpoints are deleted)."
                )
            D.barrier()
            if D.is_main_process():
                shutil.rmtree(checkpoints)
    source = resolve_model(job.model)
    teacher_source = None
    if config.distill_teacher == "base":  # outside `reciprune run` the base is the model itself
        config = config.model_copy(update={"distill_teacher": "self"})
    if needs_teacher and config.distill_teacher != "self":
        teacher_source = resolve_model(config.distill_teacher)
    eval_texts = load_eval_texts(job.ppl_file) if job.eval_ppl else None

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    torch.manual_seed(config.seed)
    # Rank 0 loads first: a first load of the embedded model fills the conversion cache.
    if not D.is_main_process():
        D.barrier()
    # dequantize: a quantized checkpoint (an earlier stage's) trains as float weights.
    model, tokenizer, source = load_model(
        source.spec, trust_remote_code=job.trust_remote_code, dequantize=True
    )
    teacher = None
    if teacher_source is not None:
        teacher, _, teacher_source = load_model(
            teacher_source.spec, trust_remote_code=job.trust_remote_code
        )
    if D.is_main_process():
        D.barrier()
    timings["load_model"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    data = load_training_data(
        config.dataset,
        tokenizer,
        max_seq_length=config.max_seq_length,
        response_only=config.response_only,
        packing=config.packing,
        max_samples=config.max_train_samples,
        text_field=config.text_field,
        data_format=config.data_format,
        seed=config.seed,
    )
    train_data, eval_data = data, None
    if config.eval_samples:
        if config.eval_samples >= len(data):
            raise ReciPruneError(
                f"the training data has {len(data)} examples, not enough to hold out "
                f"eval_samples={config.eval_samples} for the eval loss. Lower --eval-samples "
                "(0 turns the eval loss off) or use more data."
            )
        train_data, eval_data = data.split(config.eval_samples, seed=config.seed)
    plan_batches(config, len(train_data), D.world_size())  # fails before training starts
    timings["load_data"] = time.perf_counter() - t0

    metrics: dict[str, Any] = {}
    if resume_from is not None:  # what the interrupted run measured before training
        metrics.update(trainer_state_before(resume_from).get("metrics", {}))
    compute_dtype = resolve_precision(config.precision, device)
    if eval_texts is not None and resume_from is None and D.is_main_process():
        t0 = time.perf_counter()
        metrics["ppl_before"] = _finetune_ppl(model, tokenizer, eval_texts, job)
        timings["eval_before"] = time.perf_counter() - t0
    D.barrier()

    if needs_teacher and config.distill_teacher == "self":
        teacher = frozen_copy(model)
    elif teacher is not None:
        teacher = frozen_copy(teacher)  # frozen in place of a copy would do; copies are cheap
    if config.gradient_checkpointing:
        # transformers 5 renamed the method; older versions only have the first name.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        model.config.use_cache = False
    model.to(device)
    if teacher is not None:
        teacher.to(device)
    session = finetune_stage_session(model, job.stage, teacher)
    plan = plan_batches(config, len(train_data), D.world_size())
    session.sample_batches = [
        {k: v.to(device) for k, v in train_data.collate(plan.micro_batch(0, a, r)).items()}
        for a in range(plan.accumulation)
        for r in range(D.world_size())
    ]
    session.loss = lambda batch: causal_lm_loss(
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
        batch["labels"],
    )[0]
    session.base_quantization = base_backend
    session.prepare()
    base_quantization = None
    if base_backend is not None:
        from reciprune.core.nf4_base import quantize_base

        # After on_prepare: the modifiers scored and chose on the full-precision weights, and
        # what they made trainable stays in full precision.
        base_quantization = quantize_base(model, base_backend)
    if D.is_distributed():
        shard_model(model, compute_dtype)
        if teacher is not None:
            shard_model(teacher, compute_dtype)
    session.initialize()
    trainer = Trainer(
        model=model,
        session=session,
        train_data=train_data,
        eval_data=eval_data,
        config=config,
        device=device,
        compute_dtype=compute_dtype,
        checkpoint_dir=checkpoints,
        progress=job.progress,
        trainer_state_extra={"data_fingerprint": data.fingerprint, "metrics": metrics},
    )
    try:
        result = trainer.train(resume_from)
        session.finalize()
    except BaseException:
        session.abort()
        raise
    timings["train"] = result.seconds
    metrics["train_loss_first"] = result.history[0]["loss"] if result.history else None
    metrics["train_loss_last"] = result.history[-1]["loss"] if result.history else None
    metrics["eval_loss"] = result.evals[-1]["eval_loss"] if result.evals else None
    if result.evals and result.evals[0]["step"] == 0:
        metrics["eval_loss_before"] = result.evals[0]["eval_loss"]
    metrics["tokens_per_second"] = result.tokens / max(sum(h["seconds"] for h in result.history), 1e-9)
    metrics.update(peak_memory_per_process(device))

    plain, extra_files = _gather_plain_model(model, session)
    if D.is_main_process():
        plain.eval()
        if eval_texts is not None:
            t0 = time.perf_counter()
            metrics["ppl_after"] = _finetune_ppl(plain, tokenizer, eval_texts, job)
            timings["eval_after"] = time.perf_counter() - t0
        _save_finetuned(
            job, plain, tokenizer, source, teacher_source, data, result, metrics, timings,
            extra_files, base_quantization,
        )
    D.barrier()
    if D.is_main_process():
        shutil.rmtree(checkpoints, ignore_errors=True)
    return {"metrics": metrics, "timings": timings, "history": result.history}


def peak_memory_per_process(device: torch.device) -> dict[str, list[float]]:
    """Peak resident memory (MB) of every process, in rank order; with CUDA also the peak GPU
    memory torch allocated. Collective: every process must call it."""
    import resource

    from reciprune.core import distributed as D

    # Linux reports ru_maxrss in KiB.
    values = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]
    if device.type == "cuda":
        values.append(torch.cuda.max_memory_allocated(device) / 2**20)
    mine = torch.zeros(D.world_size(), len(values), dtype=torch.float64)
    mine[D.rank()] = torch.tensor(values, dtype=torch.float64)
    table = D.all_reduce_sum(mine)
    result = {"peak_rss_mb_per_process": [round(v, 1) for v in table[:, 0].tolist()]}
    if device.type == "cuda":
        result["peak_cuda_mb_per_process"] = [round(v, 1) for v in table[:, 1].tolist()]
    return result


def trainer_state_before(checkpoint: Path) -> dict[str, Any]:
    from reciprune.pipelines.finetune import TRAINER_STATE

    return json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))


def _finetune_ppl(model, tokenizer, texts: list[str], job: FinetuneJob) -> float:
    return perplexity(
        model,
        tokenizer,
        texts,
        max_seq_length=job.ppl_max_seq_length,
        max_samples=job.ppl_samples,
        progress=job.progress,
    ).ppl


def _gather_plain_model(
    model: torch.nn.Module, session
) -> tuple[torch.nn.Module | None, dict[str, bytes]]:
    """The trained weights in an ordinary (unsharded, CPU) model of the original architecture on
    rank 0, with what modifiers added folded in (`export_state`), and the files they save on
    their own (`export_files`); (None, {}) on other ranks. Collective under FSDP."""
    from reciprune.core import distributed as D

    if D.is_distributed():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    else:
        state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    if not D.is_main_process():
        return None, {}
    from reciprune.core.nf4_base import dequantize_state

    state = dequantize_state(state, model)  # a 4-bit base: its NF4 values, as plain weights
    from transformers import AutoModelForCausalLM

    files: dict[str, bytes] = {}
    for modifier in session.modifiers:
        files.update(modifier.export_files(state))
    for modifier in session.modifiers:
        state = modifier.export_state(state)
    dtype = next(iter(state.values())).dtype
    plain = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    tied = {name for name in missing if _is_tied(plain, name)}
    if unexpected or set(missing) - tied:
        raise ReciPruneError(
            "the trained model's weights do not fit its architecture after the modifiers' "
            f"export (unexpected: {sorted(unexpected)[:3]}, missing: "
            f"{sorted(set(missing) - tied)[:3]}). This is a bug in a modifier's export_state; "
            "please report it with the recipe."
        )
    plain.tie_weights()
    for modifier in session.modifiers:
        modifier.export_model(plain)
    return plain, files


def _is_tied(model: torch.nn.Module, name: str) -> bool:
    """True for the output embedding's weight when the config ties it to the input embedding."""
    head = model.get_output_embeddings()
    tied = getattr(model.config, "tie_word_embeddings", False)
    return bool(tied and head is not None and name.endswith("weight") and any(
        p is head.weight for n, p in model.named_parameters(remove_duplicate=False) if n == name
    ))


def _save_finetuned(
    job, model, tokenizer, source, teacher_source, data, result, metrics, timings, extra_files,
    base_quantization=None,
):
    from reciprune.evaluation.report import loss_curve_png

    layers = layer_sparsity_report(model)
    sparse = {name: info for name, info in layers.items() if info["sparsity"] > 0}
    config = None
    # Only a held mask makes the zeros a property of the checkpoint: rounding (QAT, an NF4 base)
    # or training also leave a few exact zeros, which are no sparsity to advertise.
    if sparse and any(isinstance(m, ConstantPruningModifier) for m in job.stage.modifiers):
        patterns = {info["nm"] for info in sparse.values()}
        structure = next(iter(patterns)) if len(patterns) == 1 and None not in patterns else (
            "unstructured"
        )
        config = sparsity_config(
            model, list(sparse), structure=structure, ignore=sorted(_output_head_names(model))
        )
        metrics["global_sparsity"] = config["global_sparsity"]
    manifest = build_manifest(
        recipe_yaml=job.recipe_yaml,
        model_source=source,
        data_fingerprint=data.fingerprint,
        seed=job.training.seed,
        metrics=metrics,
        timings=timings,
        layers=layers,
        extra={
            "run_type": "finetune",
            "stages": [job.stage.name],
            "invocation": job_invocation(job, world_size=_world_size()),
            "training": job.training.model_dump(mode="json"),
            "world_size": _world_size(),
            "teacher": None if teacher_source is None else asdict(teacher_source),
            "data": {"source": data.source, "format": data.format, "examples": len(data)},
            "loss_curve": result.history,
            "eval_curve": result.evals,
            "base_quantization": base_quantization,
        },
    )
    save_checkpoint(
        model,
        tokenizer,
        job.output_dir,
        recipe_yaml=job.recipe_yaml,
        manifest=manifest,
        sparsity_config=config,
        overwrite=True,  # checked before training; a resumed run replaces nothing else
        extra_files={
            "loss_curve.png": loss_curve_png(result.history, result.evals),
            **extra_files,
        },
    )


def _world_size() -> int:
    from reciprune.core import distributed as D

    return D.world_size()
