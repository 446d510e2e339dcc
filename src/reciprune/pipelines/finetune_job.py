"""`reciprune finetune`: one finetune stage, from loading to the saved checkpoint, in steps.

check (everything that can fail on user input, before weights load) → load the model and
teacher → load the training data → prepare (modifiers' `on_prepare`, 4-bit base, sharding) →
train → gather a plain model → evaluate and save. One process runs it as is; under torchrun
every process runs it and rank 0 writes.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reciprune.core import distributed as D
from reciprune.core.session import LifecycleSession, TrainingContext
from reciprune.errors import ReciPruneError
from reciprune.export import build_manifest, layer_sparsity_report, save_checkpoint
from reciprune.export.formats import CheckpointContents
from reciprune.export.manifest import describe_sparsity, sparsity_metrics, warn_low_decoder_sparsity
from reciprune.export.save import check_output_dir
from reciprune.models import ModelSource, load_model, resolve_model, tied_head_names
from reciprune.pipelines import finetune as F
from reciprune.pipelines.job_run import JobRun
from reciprune.pipelines.jobs import FinetuneJob
from reciprune.recipe.training import TrainingConfig


@dataclass(kw_only=True)
class _FinetuneRun(JobRun):
    """What the steps of one finetune job share."""

    job: FinetuneJob
    config: TrainingConfig
    output_dir: Path
    device: torch.device
    teacher_source: ModelSource | None = None
    base_backend: Any = None
    resume_from: Path | None = None

    @property
    def needs_teacher(self) -> list[str]:
        return [m.type_name() for m in self.job.stage.modifiers if m.needs_teacher]

    @property
    def checkpoints(self) -> Path:
        return F.checkpoint_root(self.output_dir)


def run_finetune_job(job: FinetuneJob) -> dict[str, Any]:
    """Train one finetune stage (1 process, or N under torchrun with FSDP2) and save a plain
    Hugging Face checkpoint with recipe.yaml, manifest (with the loss curve) and loss_curve.png.

    Every check that can fail on user input runs before weights load or training starts.
    """
    run = _check(job)
    model, tokenizer, teacher = _load_models(run)
    train_data, eval_data, data = _load_data(run, tokenizer)
    plan = F.plan_batches(run.config, len(train_data), D.world_size())
    if run.resume_from is not None:  # what the interrupted run measured before training
        run.metrics.update(F.read_trainer_state(run.resume_from).get("metrics", {}))
    if run.resume_from is None and D.is_main_process():
        run.measure_ppl(model, tokenizer, "ppl_before", "eval_before")
    D.barrier()
    session, base_quantization = _prepare(run, model, teacher, train_data, plan)
    trainer = F.Trainer(
        model=model,
        session=session,
        train_data=train_data,
        eval_data=eval_data,
        config=run.config,
        device=run.device,
        compute_dtype=F.resolve_precision(run.config.precision, run.device),
        checkpoint_dir=run.checkpoints,
        progress=job.output.progress,
        trainer_state_extra={"data_fingerprint": data.fingerprint, "metrics": run.metrics},
        plan=plan,
    )
    try:
        result = trainer.train(run.resume_from)
        session.finalize()
    except BaseException:
        session.abort()
        raise
    run.timings["train"] = result.seconds
    _training_metrics(run, result)
    plain, extra_files = _gather_plain_model(model, session)
    if D.is_main_process():
        plain.eval()
        run.measure_ppl(plain, tokenizer, "ppl_after", "eval_after")
        _save(run, plain, tokenizer, data, result, extra_files, base_quantization)
    D.barrier()
    if D.is_main_process():
        shutil.rmtree(run.checkpoints, ignore_errors=True)
    return {"metrics": run.metrics, "timings": run.timings, "history": result.history}


# --- steps ----------------------------------------------------------------------------------------
def _check(job: FinetuneJob) -> _FinetuneRun:
    """Everything that can fail on user input, before weights load."""
    config = job.training
    run = _FinetuneRun(
        job=job,
        source=resolve_model(job.model.model),
        config=config,
        output_dir=Path(job.output.output_dir).expanduser().absolute(),
        device=F.setup_distributed(),
    )
    _check_teacher(run)
    F.check_4bit_base(config, job.stage, D.world_size())
    if config.load_in_4bit:  # an unusable backend fails here, before any weights load
        from reciprune.core.nf4_base import select_backend

        run.base_backend = select_backend(
            config.quant_backend, run.device, double_quant=config.bnb_4bit_use_double_quant
        )
    _check_checkpoints(run)
    if run.needs_teacher and run.config.distill_teacher != "self":
        run.teacher_source = resolve_model(run.config.distill_teacher)
    run.load_eval_texts()
    return run


def _check_teacher(run: _FinetuneRun) -> None:
    teacher = run.config.distill_teacher
    if run.needs_teacher and not teacher:
        raise ReciPruneError(
            f"stage {run.job.stage.name!r} has {', '.join(run.needs_teacher)}, which needs a "
            "teacher model: pass --distill-teacher PATH (a model folder), or --distill-teacher "
            "self for a frozen copy of the starting model."
        )
    if teacher and teacher.startswith("stage:"):
        raise ReciPruneError(
            f"--distill-teacher {teacher}: 'stage:NAME' names the output of an earlier stage "
            "and only works in `reciprune run`. Pass that stage's output folder."
        )
    if teacher == "base":  # outside `reciprune run` the base is the model itself
        run.config = run.config.model_copy(update={"distill_teacher": "self"})


def _check_checkpoints(run: _FinetuneRun) -> None:
    """--resume needs a checkpoint; a fresh start refuses to silently drop one."""
    checkpoints = run.checkpoints
    if run.job.output.resume:
        run.resume_from = F.latest_checkpoint(checkpoints)
        if run.resume_from is None:
            raise ReciPruneError(
                f"--resume: no complete checkpoint in {checkpoints}. Checkpoints are written "
                "every --save-steps steps; run without --resume to start from the beginning."
            )
        return
    check_output_dir(run.output_dir, run.job.output.overwrite, run.job.model.model)
    if checkpoints.exists() and any(checkpoints.iterdir()):
        if not run.job.output.overwrite:
            raise ReciPruneError(
                f"a previous run left checkpoints in {checkpoints}. Pass --resume to continue "
                "it, or --overwrite to start over (its checkpoints are deleted)."
            )
        D.barrier()
        if D.is_main_process():
            shutil.rmtree(checkpoints)


def _load_models(run: _FinetuneRun) -> tuple[nn.Module, Any, nn.Module | None]:
    """The student (a quantized checkpoint loads as trainable float weights) and the teacher;
    rank 0 loads first, so a first load of the embedded model fills the conversion cache."""
    t0 = time.perf_counter()
    torch.manual_seed(run.config.seed)
    trust = run.job.model.trust_remote_code
    if not D.is_main_process():
        D.barrier()
    model, tokenizer, run.source = load_model(
        run.source.spec, trust_remote_code=trust, dequantize=True
    )
    teacher = None
    if run.teacher_source is not None:  # frozen, in the compute dtype: no float32 copy
        teacher, _, run.teacher_source = load_model(
            run.teacher_source.spec, trust_remote_code=trust,
            dtype=F.resolve_precision(run.config.precision, run.device),
        )  # fmt: skip
        F.freeze(teacher)
    if D.is_main_process():
        D.barrier()
    run.timed("load_model", t0)
    return model, tokenizer, teacher


def _load_data(run: _FinetuneRun, tokenizer: Any) -> tuple[Any, Any, Any]:
    """(train, held-out or None, all) training examples; bad sizes fail before training."""
    from reciprune.data.training import load_training_data

    t0 = time.perf_counter()
    config = run.config
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
    run.timed("load_data", t0)
    return train_data, eval_data, data


def _prepare(
    run: _FinetuneRun, model: nn.Module, teacher: nn.Module | None, train_data: Any, plan: Any
) -> tuple[LifecycleSession, dict | None]:
    """The stage's session with its collaborators, `on_prepare` run, the 4-bit base quantized
    and the models sharded; returns the session and the 4-bit base's description."""
    compute_dtype = F.resolve_precision(run.config.precision, run.device)
    if run.config.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
        model.config.use_cache = False
    model.to(run.device)
    shared = False
    if run.needs_teacher and run.config.distill_teacher == "self":
        # The student's own weights never train under adapters: the teacher can share them.
        shared = not D.is_distributed() and run.base_backend is None and any(
            m.freezes_base for m in run.job.stage.modifiers)  # fmt: skip
        teacher = F.frozen_copy(model, compute_dtype, share=shared)
    if teacher is not None:
        teacher.to(run.device)
    sample_batches = [
        {k: v.to(run.device) for k, v in train_data.collate(plan.micro_batch(0, a, r)).items()}
        for a in range(plan.accumulation)
        for r in range(D.world_size())
    ]
    context = TrainingContext(
        loss=lambda batch: F.causal_lm_loss(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
            batch["labels"],
        )[0],
        sample_batches=sample_batches,
        base_quantization=run.base_backend,
    )
    total = F.total_steps(run.config, plan)
    session = LifecycleSession(model, run.job.stage.modifiers, teacher=teacher, training=context,
                               run_type="finetune", total_steps=total)  # fmt: skip
    for callback in F.CALLBACKS:
        callback.on_prepare()
    base_params = list(model.parameters())
    session.prepare()
    if shared and any(p.requires_grad for p in base_params):
        raise RuntimeError("a modifier declared freezes_base but left a base weight trainable")
    base_quantization = None
    if run.base_backend is not None:
        from reciprune.core.nf4_base import quantize_base

        # After on_prepare: the modifiers scored and chose on the full-precision weights, and
        # what they made trainable stays in full precision.
        base_quantization = quantize_base(model, run.base_backend)
    if D.is_distributed():
        F.shard_model(model, compute_dtype)
        if teacher is not None:
            F.shard_model(teacher, compute_dtype)
    session.initialize()
    return session, base_quantization


def _training_metrics(run: _FinetuneRun, result: F.TrainResult) -> None:
    history, evals = result.history, result.evals
    run.metrics["train_loss_first"] = history[0]["loss"] if history else None
    run.metrics["train_loss_last"] = history[-1]["loss"] if history else None
    run.metrics["eval_loss"] = evals[-1]["eval_loss"] if evals else None
    if evals and evals[0]["step"] == 0:
        run.metrics["eval_loss_before"] = evals[0]["eval_loss"]
    seconds = sum(h["seconds"] for h in history)
    run.metrics["tokens_per_second"] = result.tokens / max(seconds, 1e-9)
    if len(history) > 1:  # without the first step's warm-up (allocation, kernel choice)
        steady = history[1:]
        run.metrics["tokens_per_second_steady"] = sum(h["tokens"] for h in steady) / max(
            sum(h["seconds"] for h in steady), 1e-9)  # fmt: skip
    run.metrics.update(peak_memory_per_process(run.device))


def peak_memory_per_process(device: torch.device) -> dict[str, list[float]]:
    """Peak resident memory (MB) of every process, in rank order; with CUDA also the peak GPU
    memory torch allocated. Collective: every process must call it."""
    import resource

    # Linux reports ru_maxrss in KiB.
    peaks = {"peak_rss_mb_per_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        peaks["peak_cuda_mb_per_process"] = torch.cuda.max_memory_allocated(device) / 2**20
    mine = torch.zeros(D.world_size(), len(peaks), dtype=torch.float64)
    mine[D.rank()] = torch.tensor(list(peaks.values()), dtype=torch.float64)
    columns = D.all_reduce_sum(mine).t().tolist()
    return {key: [round(v, 1) for v in column] for key, column in zip(peaks, columns, strict=True)}


# --- export ---------------------------------------------------------------------------------------
def _gather_plain_model(
    model: nn.Module, session: LifecycleSession
) -> tuple[nn.Module | None, dict[str, bytes]]:
    """The trained weights in an ordinary (unsharded, CPU) model of the original architecture on
    rank 0, with what modifiers added folded in (`export_state`), and the files they save on
    their own (`export_files`); (None, {}) on other ranks. Collective under FSDP."""
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
    files: dict[str, bytes] = {}
    for modifier in session.modifiers:
        files.update(modifier.export_files(state))
    for modifier in session.modifiers:
        state = modifier.export_state(state)
    plain = _plain_model(model.config, state)
    for modifier in session.modifiers:
        modifier.export_model(plain)
    return plain, files


def _plain_model(config: Any, state: dict[str, torch.Tensor]) -> nn.Module:
    """The original architecture holding `state`; a mismatch is a modifier's bug."""
    from transformers import AutoModelForCausalLM

    dtype = next(iter(state.values())).dtype
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    missing_untied = set(missing) - tied_head_names(plain)  # tie_weights below fills a tied head
    if unexpected or missing_untied:
        raise ReciPruneError(
            "the trained model's weights do not fit its architecture after the modifiers' "
            f"export (unexpected: {sorted(unexpected)[:3]}, missing: "
            f"{sorted(missing_untied)[:3]}). This is a bug in a modifier's export_state; "
            "please report it with the recipe."
        )
    plain.tie_weights()
    return plain


def _save(run, model, tokenizer, data, result, extra_files, base_quantization) -> None:
    from reciprune.evaluation.report import loss_curve_png

    job = run.job
    modifiers = job.stage.modifiers
    # Only a held mask makes the zeros a property of the checkpoint: rounding (QAT, an NF4 base)
    # or training also leave a few exact zeros, which are no sparsity to advertise.
    sparsity = describe_sparsity(model, modifiers)
    if sparsity is not None:
        run.metrics["global_sparsity"] = sparsity["global_sparsity"]
        run.metrics.update(sparsity_metrics(model, modifiers))
        warn_low_decoder_sparsity(run.metrics)
    recipe_yaml = job.recipe.to_yaml()
    manifest = build_manifest(
        recipe_yaml=recipe_yaml,
        model_source=run.source,
        data_fingerprint=data.fingerprint,
        seed=run.config.seed,
        metrics=run.metrics,
        timings=run.timings,
        layers=layer_sparsity_report(model),
        extra={
            "run_type": "finetune",
            "stages": [job.stage.name],
            "options": job.options(),
            "training": run.config.model_dump(mode="json"),
            "world_size": D.world_size(),
            "teacher": None if run.teacher_source is None else asdict(run.teacher_source),
            "data": {"source": data.source, "format": data.format, "examples": len(data)},
            "loss_curve": result.history,
            "eval_curve": result.evals,
            "base_quantization": base_quantization,
        },
    )
    save_checkpoint(
        model,
        tokenizer,
        run.output_dir,
        recipe_yaml=recipe_yaml,
        manifest=manifest,
        contents=CheckpointContents(
            sparsity=sparsity, quantized=any("quantization" in m.produces for m in modifiers)
        ),
        save_format=run.config.save_format,
        overwrite=True,  # checked before training; a resumed run replaces nothing else
        extra_files={"loss_curve.png": loss_curve_png(result.history, result.evals), **extra_files},
    )
