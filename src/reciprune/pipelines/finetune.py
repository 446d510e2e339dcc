"""Fine-tuning driven by the lifecycle session: FSDP2 under torchrun, one process without it.

One optimizer step takes a *global batch* of `per_device_train_batch_size × accumulation ×
world_size` sequences. The order of the training examples is a seeded permutation per epoch, and
global step `s` always takes the same slice of it, split into micro-batches so that micro-batch
`a × world_size + rank` goes to `rank` at accumulation step `a`. A run with 1 process and 2
accumulation steps therefore sees exactly the micro-batches a run with 2 processes and 1 step
sees, and a resumed run continues from the step number alone.

Each micro-batch: BATCH_START → student forward → task loss (mean over its label tokens) →
LOSS_COMPUTED (modifiers may add terms) → backward of loss / accumulation → BATCH_END. Then
OPTIMIZER_PRE_STEP (gradients ready) → clip → step → OPTIMIZER_POST_STEP → scheduler. Under FSDP2
gradients are averaged over processes, so the update equals the single-process one.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from reciprune.core import distributed as D
from reciprune.core.events import EventType
from reciprune.core.layers import eval_mode, find_decoder_layers
from reciprune.core.session import LifecycleSession
from reciprune.errors import ReciPruneError
from reciprune.progress import progress_bar
from reciprune.recipe.schema import Stage
from reciprune.recipe.training import TrainingConfig

CHECKPOINT_SUFFIX = ".checkpoints"
COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.json"


# --- distributed setup ----------------------------------------------------------------------------
def setup_distributed() -> torch.device:
    """Join the torchrun process group when launched by torchrun; the device to train on.

    NCCL with one GPU per process on CUDA machines, gloo on CPU (so CI can test 2 processes).
    """
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if D.launched_by_torchrun() and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if precision == "bfloat16" else torch.float32


def shard_model(model: nn.Module, compute_dtype: torch.dtype) -> None:
    """FSDP2: `fully_shard` each decoder layer, then the root (embeddings, norm, head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    _, layers = find_decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mp_policy=policy, reshard_after_forward=True)
    fully_shard(model, mp_policy=policy, reshard_after_forward=True)


# --- batches ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchPlan:
    """How many sequences each optimizer step takes and how they are split."""

    per_device: int
    accumulation: int
    world_size: int
    num_examples: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.per_device * self.accumulation * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch

    def micro_batch(self, step: int, accumulation_index: int, rank: int) -> list[int]:
        """Example indices of one process's micro-batch at `step` (deterministic from `step`)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.num_examples, generator=generator)
        start = position * self.global_batch
        chunk = (accumulation_index * self.world_size + rank) * self.per_device
        return order[start + chunk : start + chunk + self.per_device].tolist()


def accumulation_steps(config: TrainingConfig, world_size: int) -> int:
    """Micro-batches per optimizer step on each process; a clear error when `global_batch_size`
    cannot be split evenly over `world_size` processes."""
    if config.global_batch_size is None:
        return config.gradient_accumulation_steps
    per_device = config.per_device_train_batch_size
    per_step = per_device * world_size
    if config.global_batch_size % per_step:
        raise ReciPruneError(
            f"global batch size {config.global_batch_size} is not divisible by "
            f"{world_size} processes × {per_device} sequences per device = {per_step}. "
            "Choose a global batch size that is a multiple of it, or change "
            "--per-device-train-batch-size or the number of processes."
        )
    return config.global_batch_size // per_step


def check_4bit_base(config: TrainingConfig, stage: Stage, world_size: int) -> None:
    """Clear errors, before weights load or workers start, for a 4-bit base on several
    processes and for modifiers that need a 4-bit base without one."""
    if config.load_in_4bit and world_size > 1:
        raise ReciPruneError(
            f"--load-in-4bit with {world_size} processes: the 4-bit (NF4) base is not sharded "
            "with FSDP. Run the stage on one process (drop --nproc-per-node, or use "
            "--nproc-per-node 1); the 4-bit base is what makes a model fit on one device."
        )
    for modifier in stage.modifiers:
        if modifier.needs_4bit_base and not config.load_in_4bit:
            raise ReciPruneError(f"stage {stage.name!r}: {modifier.missing_4bit_base()}")


def plan_batches(config: TrainingConfig, num_examples: int, world_size: int) -> BatchPlan:
    """The batch plan, with a clear error when the numbers do not fit together."""
    per_device = config.per_device_train_batch_size
    accumulation = accumulation_steps(config, world_size)
    plan = BatchPlan(per_device, accumulation, world_size, num_examples, config.seed)
    if plan.steps_per_epoch < 1:
        raise ReciPruneError(
            f"the training data has {num_examples} examples, fewer than one global batch of "
            f"{plan.global_batch} ({per_device} per device × {accumulation} accumulation × "
            f"{world_size} processes). Use more data, or a smaller batch."
        )
    return plan


def total_steps(config: TrainingConfig, plan: BatchPlan) -> int:
    if config.max_steps > 0:
        return config.max_steps
    return max(1, math.ceil(config.num_train_epochs * plan.steps_per_epoch))


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy over label tokens (labels != -100), and their count (a
    tensor: reading it would wait for the device). No label token: a zero loss."""
    shift_labels = labels[:, 1:]
    count = (shift_labels != -100).sum()
    loss = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return loss / count.clamp_min(1), count


# --- checkpoints ------------------------------------------------------------------------------
def checkpoint_root(output_dir: Path) -> Path:
    """Where resumable checkpoints of a run writing `output_dir` live (beside it, not in it)."""
    return output_dir.with_name(output_dir.name + CHECKPOINT_SUFFIX)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint (one with the COMPLETE marker), or None."""
    done = [p for p in root.glob("step-*") if (p / COMPLETE_MARKER).is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_training_checkpoint(path: Path, trainer: Trainer, trainer_state: dict[str, Any]) -> None:
    """Model and optimizer (sharded, torch.distributed.checkpoint), then per process the
    scheduler, RNG and modifier state; COMPLETE is written last, once every process is done."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if D.is_main_process():
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
    D.barrier()
    model_state, optim_state = get_state_dict(trainer.model, trainer.optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path / "state"))
    torch.save(
        {
            "scheduler": trainer.scheduler.state_dict(),
            "rng": _rng_state(),
            "modifiers": [m.state_dict() for m in trainer.session.modifiers],
        },
        path / f"rank-{D.rank()}.pt",
    )
    D.barrier()
    if D.is_main_process():
        (path / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1), encoding="utf-8")
        (path / COMPLETE_MARKER).write_text("", encoding="utf-8")
        for old in path.parent.glob("step-*"):
            if old != path:  # keep only the newest checkpoint: each is a full model + optimizer
                shutil.rmtree(old, ignore_errors=True)
    D.barrier()


def load_training_checkpoint(path: Path, trainer: Trainer) -> dict[str, Any]:
    """Restore into `trainer` what `save_training_checkpoint` wrote; returns the trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    trainer_state = read_trainer_state(path)
    if trainer_state["world_size"] != D.world_size():
        raise ReciPruneError(
            f"checkpoint {path} was written by {trainer_state['world_size']} processes, and this "
            f"run has {D.world_size()}. Resume with --nproc-per-node "
            f"{trainer_state['world_size']} (modifier state is saved per process)."
        )
    model, optimizer = trainer.model, trainer.optimizer
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(path / "state"))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    local = torch.load(path / f"rank-{D.rank()}.pt", weights_only=True)
    trainer.scheduler.load_state_dict(local["scheduler"])
    for modifier, modifier_state in zip(trainer.session.modifiers, local["modifiers"], strict=True):
        modifier.load_state_dict(modifier_state)
    _set_rng_state(local["rng"])
    return trainer_state


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))


def warn_short_training(config: TrainingConfig, steps: int) -> None:
    """Warn when training ends inside its warmup: the schedule then never reaches the peak
    learning rate (and its first step runs at 0), which looks like a run that does not learn."""
    if config.warmup_steps <= steps:
        return
    peak = config.learning_rate * steps / config.warmup_steps
    warnings.warn(
        f"warmup_steps={config.warmup_steps} is longer than the {steps} training steps: the "
        f"learning rate starts at 0 and reaches only {peak:.2e} ({steps / config.warmup_steps:.0%} "
        f"of learning_rate={config.learning_rate:g}) on the last step, so the weights barely "
        f"change. Lower warmup_steps (e.g. to {steps // 10}) or raise max_steps.",
        stacklevel=2,
    )


def adamw(params: list[nn.Parameter], config: TrainingConfig, device: torch.device) -> Any:
    """AdamW; on CUDA the fused kernel (one launch for all parameters)."""
    kwargs = {"lr": config.learning_rate, "weight_decay": config.weight_decay}
    if device.type == "cuda":
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, TypeError):  # parameters the fused kernel does not take
            pass
    return torch.optim.AdamW(params, **kwargs)


# --- callbacks --------------------------------------------------------------------------------
class FinetuneCallback:
    """Watches a finetune run without changing it (benchmarks, tests); every method is a no-op
    unless overridden. Register one for every run of this process with `add_callback`."""

    def on_prepare(self) -> None:
        """Model and data loaded, before the modifiers' `on_prepare` adds anything."""

    def on_train_begin(self, trainer: Trainer) -> None:
        """The optimizer exists; the first step is next."""

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        """Optimizer step `step` (0-based) finished (checkpoint written if one was due)."""

    def on_log(self, trainer: Trainer, records: list[dict[str, float]]) -> None:
        """The metrics of the steps since the last log, read off the device (every
        `logging_steps` steps, the first step, and before evaluations and checkpoints)."""

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        """After the last step and the final held-out loss."""


CALLBACKS: list[FinetuneCallback] = []


def add_callback(callback: FinetuneCallback) -> None:
    """Call `callback` in every finetune run of this process."""
    CALLBACKS.append(callback)


# --- the loop ---------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What a training run produced; `history` has one entry per optimizer step."""

    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0


@dataclass
class Trainer:
    """Runs one finetune stage on an already loaded (and, under torchrun, sharded) model."""

    model: nn.Module
    session: LifecycleSession
    train_data: Any  # reciprune.data.training.TrainingData
    eval_data: Any | None
    config: TrainingConfig
    device: torch.device
    plan: BatchPlan
    checkpoint_dir: Path
    compute_dtype: torch.dtype = torch.float32
    progress: bool = True
    trainer_state_extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.total_steps = total_steps(self.config, self.plan)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ReciPruneError(
                "the model has no trainable parameter: nothing to fine-tune. Check the recipe's "
                "modifiers (one that freezes the base must add trainable parameters)."
            )
        self.optimizer = adamw(params, self.config, self.device)
        self.session.start_training(self.optimizer)
        from transformers import get_scheduler

        if D.is_main_process():
            warn_short_training(self.config, self.total_steps)
        self.scheduler = get_scheduler(
            self.config.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=self.config.warmup_steps,
            num_training_steps=self.total_steps,
        )
        # One process in bf16 uses autocast; under FSDP the mixed-precision policy casts.
        self._autocast = (
            torch.autocast(self.device.type, dtype=self.compute_dtype)
            if self.compute_dtype != torch.float32 and not D.is_distributed()
            else None
        )

    def _forward_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with self._autocast or nullcontext():
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return causal_lm_loss(out.logits, batch["labels"])

    def _batch(self, indices: list[int], data: Any) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in data.collate(indices).items()}

    def evaluate(self) -> float | None:
        """Mean next-token loss over the held-out examples, token-weighted, all processes."""
        if self.eval_data is None or len(self.eval_data) < D.world_size():
            return None
        per_rank = len(self.eval_data) // D.world_size()
        mine = list(range(D.rank() * per_rank, (D.rank() + 1) * per_rank))
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        with eval_mode(self.model), torch.no_grad():
            for start in range(0, len(mine), self.plan.per_device):
                batch = self._batch(mine[start : start + self.plan.per_device], self.eval_data)
                loss, count = self._forward_loss(batch)
                totals += torch.stack([loss.double() * count, count.double()])
        totals = D.all_reduce_sum(totals)
        return float(totals[0] / totals[1].clamp_min(1))

    def train(self, resume_from: Path | None = None) -> TrainResult:
        """Run every optimizer step (from a checkpoint's when resuming); returns the history."""
        result, start_step = self._begin(resume_from)
        started = self._flushed_at = time.perf_counter()
        for step in range(start_step, self.total_steps):
            self.session.advance_to(step)
            self._pending.append(self._step(step))
            done = step + 1
            evaluate = bool(self.config.eval_steps) and done % self.config.eval_steps == 0
            save = bool(self.config.save_steps) and done % self.config.save_steps == 0
            if done == start_step + 1 or done % self.config.logging_steps == 0 or (
                evaluate or save or done == self.total_steps
            ):  # the first step alone: its warm-up is not averaged into the others
                self._flush(result)
            if evaluate and done < self.total_steps:
                result.evals.append({"step": done, "eval_loss": self.evaluate()})
            if save and done < self.total_steps:
                self._save_checkpoint(result, done)
            for callback in CALLBACKS:
                callback.on_step_end(self, step)
        if self._bar is not None:
            self._bar.close()
        self.session.advance_to(self.total_steps)
        result.evals.append({"step": self.total_steps, "eval_loss": self.evaluate()})
        result.seconds = time.perf_counter() - started
        for callback in CALLBACKS:
            callback.on_train_end(self, result)
        return result

    def _begin(self, resume_from: Path | None) -> tuple[TrainResult, int]:
        result = TrainResult()
        start_step = 0
        if resume_from is not None:
            state = load_training_checkpoint(resume_from, self)
            start_step = int(state["step"])
            result.history = list(state["history"])[:start_step]
            result.evals = list(state.get("evals", []))
            result.tokens = int(state.get("tokens", 0))
        self._pending: list[dict[str, Any]] = []
        self._bar = None
        if D.is_main_process():
            self._bar = progress_bar(total=self.total_steps, initial=start_step, desc="finetune",
                                     unit="step", progress=self.progress)  # fmt: skip
        if resume_from is None and self.eval_data is not None:
            # The held-out loss before any update: the curve's starting point.
            result.evals.append({"step": 0, "eval_loss": self.evaluate()})
        self.model.train()
        for callback in CALLBACKS:
            callback.on_train_begin(self)
        return result, start_step

    def _save_checkpoint(self, result: TrainResult, done: int) -> None:
        save_training_checkpoint(
            self.checkpoint_dir / f"step-{done:07d}",
            self,
            {
                "step": done,
                "world_size": D.world_size(),
                "history": result.history,
                "evals": result.evals,
                "tokens": result.tokens,
                **self.trainer_state_extra,
            },
        )

    def _flush(self, result: TrainResult) -> None:
        """Read the pending steps' metrics off the device (one synchronisation, one reduction
        over the processes) into the history; their wall time is shared out evenly."""
        pending, self._pending = self._pending, []  # at least the step just taken
        keys = sorted({k for p in pending for k in p["sums"]})
        zero = torch.zeros((), device=self.device)
        table = torch.stack([
            torch.stack([p["sums"].get(k, zero).float() for k in keys] + [
                torch.as_tensor(float(p["tokens"]), device=self.device),
                p["grad_norm"] if p["grad_norm"] is not None else zero.float() - 1,
            ]) for p in pending
        ])  # fmt: skip
        table[:, : len(keys)] /= self.plan.accumulation
        if D.is_distributed():
            tokens = D.all_reduce_sum(table[:, len(keys)].clone())
            table = D.all_reduce_mean(table.double()).float()
            table[:, len(keys)] = tokens
        rows = table.tolist()
        now = time.perf_counter()
        seconds, self._flushed_at = (now - self._flushed_at) / len(pending), now
        for p, row in zip(pending, rows, strict=True):
            record = {"step": p["step"], "lr": p["lr"], **dict(zip(keys, row, strict=False))}
            record["tokens"], record["seconds"] = row[len(keys)], seconds
            if row[len(keys) + 1] >= 0:
                record["grad_norm"] = row[len(keys) + 1]
            result.history.append(record)
            result.tokens += int(record["tokens"])
        for callback in CALLBACKS:
            callback.on_log(self, result.history[-len(rows):])
        if self._bar is not None:
            last = result.history[-1]
            self._bar.update(len(rows))
            self._bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}",
                                  tok_s=f"{last['tokens'] / max(seconds, 1e-9):.0f}")  # fmt: skip

    def _step(self, step: int) -> dict[str, Any]:
        """One optimizer step; its metrics stay on the device (read by `_flush`)."""
        session, plan = self.session, self.plan
        sums: dict[str, torch.Tensor] = {}
        tokens = 0
        for a in range(plan.accumulation):
            cpu_batch = self.train_data.collate(plan.micro_batch(step, a, D.rank()))
            tokens += int(cpu_batch["attention_mask"].sum())  # counted on the CPU: no sync
            batch = {k: v.to(self.device, non_blocking=True) for k, v in cpu_batch.items()}
            with self._autocast or nullcontext():  # a teacher runs here, as the student does
                session.event(EventType.BATCH_START, batch=batch)
            task_loss, _ = self._forward_loss(batch)
            event = session.event(EventType.LOSS_COMPUTED, loss=task_loss, batch=batch)
            (event.loss / plan.accumulation).backward()
            parts = {"loss": event.loss, "task_loss": task_loss, **event.metrics}
            for key, value in parts.items():
                value = torch.as_tensor(value, device=self.device).detach().float()
                sums[key] = sums[key] + value if key in sums else value
            session.event(EventType.BATCH_END, batch=batch)
        session.event(EventType.OPTIMIZER_PRE_STEP)
        grad_norm = None
        if self.config.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]],
                self.config.max_grad_norm,
            )
            full = getattr(norm, "full_tensor", None)
            grad_norm = (full() if callable(full) else norm).detach().float()
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        session.event(EventType.OPTIMIZER_POST_STEP)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"step": step + 1, "lr": lr, "sums": sums, "tokens": tokens, "grad_norm": grad_norm}


def frozen_copy(model: nn.Module, dtype: torch.dtype, *, share: bool = False) -> nn.Module:
    """A frozen, eval-mode model of `model`'s architecture with its current weights (the
    `--distill-teacher self` teacher): copies made directly in `dtype` (the compute dtype:
    bfloat16 on a GPU; never a float32 copy first), or with `share` the very same tensors
    (when the student's own weights never train, e.g. under adapters)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        teacher = type(model)(model.config)
    state = {
        name: tensor if share else tensor.detach().to(
            dtype if tensor.is_floating_point() else tensor.dtype, copy=True)
        for name, tensor in model.state_dict().items()
    }  # fmt: skip
    teacher.load_state_dict(state, assign=True, strict=True)
    teacher.tie_weights()
    return freeze(teacher)


def freeze(model: nn.Module) -> nn.Module:
    """`model` in eval mode with no parameter requiring a gradient."""
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()
