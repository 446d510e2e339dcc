"""OutputDistillationModifier: distil a frozen teacher's layer outputs into the student (SquareHead)."""

from __future__ import annotations

import difflib
import re
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from reciprune.algorithms.distillation import COMPARISONS
from reciprune.core.events import Event, EventType
from reciprune.core.layers import find_decoder_layers
from reciprune.errors import ReciPruneError
from reciprune.modifiers.base import Modifier
from reciprune.modifiers.registry import register_modifier
from reciprune.modifiers.targeted import as_list, checked_patterns

if TYPE_CHECKING:
    from reciprune.core.session import LifecycleSession

#: The target that names the model's output logits (the output of `get_output_embeddings()`).
LOGITS = "logits"

# SparseML fields whose value here can only be the no-op one (reciprune compares raw outputs).
_SPARSEML_NO_OP = {
    "projection": (None,),
    "projection_args": (None, {}),
    "transforms": (None, "identity", ["identity"]),
    "transforms_args": (None, {}),
    "comparison_args": (None, {}),
}


@register_modifier
class OutputDistillationModifier(Modifier):
    """Add a distillation term to the training loss: the student's outputs at the targeted modules are pulled towards a frozen teacher's.

    Every micro-batch the teacher runs on the same input under `torch.no_grad()`, forward hooks
    capture both models' outputs at each target (a decoder layer's hidden states, or the
    logits), and the loss the optimizer sees becomes

        loss = orig_scale · task_loss + s · (1/N) Σ_{l ∈ targets} L_l

    where N is the number of targeted modules, L_l the comparison of layer l over the
    non-padding tokens of the micro-batch (attention mask), and s = distill_scale, except that
    with comparison 'square_head' a distill_scale of exactly 1.0 (the default, or written out)
    becomes N, as in SparseML, so the default SquareHead term is the sum over layers Σ_l L_l.
    SquareHead (Kurtic et al. 2023) is L_l = Σ (t − s)² / Σ t² over all the non-padding tokens
    and hidden units of layer l; with the defaults this is the paper's CE + SquareHead objective.
    'kl_divergence' is Hinton's T²·KL(teacher ‖ student) (SparseML's legacy
    DistillationModifier); SparseML's OutputDistillationModifier instead compared softmaxed
    outputs as KL(student ‖ teacher) without the T².

    The teacher comes from the training settings (`distill_teacher`, or `--distill-teacher`):
    a model path, or 'self' for a frozen copy of the starting model. Targets are looked up in
    the teacher by the same names, so the teacher may be deeper than the student but hidden
    states are compared only between modules of the same width. The task loss and the
    unscaled layer mean are reported as the metrics `task_loss` and `distill_loss`. SparseML's
    `projection`, `transforms` and `comparison_args` are accepted when they change nothing
    ('identity'; 'softmax' before 'kl_divergence'; a `temperature` in the arguments).
    """

    targets: list[str] | None = Field(
        None,
        description="Modules whose outputs are compared: full module names ('model.layers.0') "
        "or 're:' regexes matched from the start of full names ('re:model.layers.\\d+$'), and "
        "'logits' for the output logits. The teacher's modules of the same names are used. "
        "Unset: every decoder layer (model.layers.* in Llama/Qwen, transformer.h.* in GPT-2, "
        "model.decoder.layers.* in OPT).",
    )
    comparison: Literal["square_head", "kl_divergence", "mse", "cosine"] = Field(
        "square_head",
        description="Per-target loss: 'square_head' Σ(t−s)²/Σt² (Kurtic et al. 2023); "
        "'kl_divergence' T²·KL(softmax(t/T) ‖ softmax(s/T)) per token, for logits; 'mse' the "
        "mean squared error; 'cosine' 1 − cosine similarity per token. Token means and sums "
        "cover the non-padding tokens only.",
    )
    temperature: float = Field(
        1.0, gt=0.0, description="Softmax temperature T of 'kl_divergence' (the term is × T²)."
    )
    orig_scale: float = Field(
        1.0, ge=0.0, description="Weight of the task (cross-entropy) loss; 0 trains on the "
        "distillation term alone.",
    )
    distill_scale: float = Field(
        1.0,
        ge=0.0,
        description="Weight s of the mean over targets of the comparison. As in SparseML, with "
        "'square_head' exactly 1.0 becomes the number of targeted modules, so the default term "
        "is the sum of the per-layer SquareHead losses.",
    )

    needs_teacher: ClassVar[bool] = True
    run_types: ClassVar[tuple[str, ...]] = ("finetune",)
    paper: ClassVar[str] = (
        "Kurtic, Kuznedelev, Frantar, Goin & Alistarh, 'Sparse Fine-tuning for Inference "
        "Acceleration of Large Language Models', 2023 (SquareHead); SparseML "
        "OutputDistillationModifier"
    )
    legacy_fields: ClassVar[dict[str, str | None]] = {"offload_layer_output": None}

    # validation ------------------------------------------------------------------------------
    @model_validator(mode="before")
    @classmethod
    def _sparseml_fields(cls, data: Any) -> Any:
        """Accept SparseML's projection/transform fields when they ask for nothing."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        args = data.get("comparison_args")
        if isinstance(args, dict) and set(args) == {"temperature"} and "temperature" not in data:
            data["temperature"] = data.pop("comparison_args")["temperature"]
        if data.get("comparison") == "kl_divergence" and data.get("transforms") in (
            "softmax",
            ["softmax"],
        ):
            # SparseML compared softmaxed outputs; our kl_divergence softmaxes the logits itself.
            data.pop("transforms")
            targs = data.get("transforms_args")
            if isinstance(targs, dict) and set(targs) <= {"temperature", "dim"}:
                data.pop("transforms_args")
                if "temperature" in targs and "temperature" not in data:
                    data["temperature"] = targs["temperature"]
        for key, no_ops in _SPARSEML_NO_OP.items():
            if key not in data:
                continue
            if data[key] not in no_ops:
                raise ValueError(
                    f"SparseML's '{key}: {data[key]!r}' has no equivalent here: reciprune "
                    "compares the raw outputs of the targets with `comparison` ('kl_divergence' "
                    "applies the tempered softmax itself, set `temperature`). Remove the field."
                )
            data.pop(key)
        return data

    _targets_as_list = field_validator("targets", mode="before")(as_list)

    @field_validator("targets")
    @classmethod
    def _check_targets(cls, value: list[str] | None) -> list[str] | None:
        if value == []:
            raise ValueError("targets is empty: leave it unset to compare every decoder layer")
        return checked_patterns(value)

    @model_validator(mode="after")
    def _check_temperature(self) -> OutputDistillationModifier:
        if self.comparison != "kl_divergence" and self.temperature != 1.0:
            raise ValueError(
                f"temperature applies to comparison 'kl_divergence' only, but comparison is "
                f"'{self.comparison}'; remove temperature or change the comparison"
            )
        return self

    # wiring ----------------------------------------------------------------------------------
    @property
    def effective_distill_scale(self) -> float:
        """The s multiplying the layer mean (after `on_initialize`): see `distill_scale`."""
        return self._scale

    def on_initialize(self, session: LifecycleSession) -> None:
        student, teacher = session.model, session.teacher
        if teacher is None:
            raise ReciPruneError(
                f"{self.type_name()} needs a teacher model but the stage has none: set "
                "`distill_teacher` in the stage's training settings, or pass --distill-teacher "
                "PATH or self (a frozen copy of the starting model)."
            )
        if teacher is student:
            raise ReciPruneError(
                f"{self.type_name()}: the teacher is the student itself; use a separate frozen "
                "copy (--distill-teacher self makes one)."
            )
        names = self._resolve_student(student)
        self._student = {name: self._module(student, name) for name in names}
        self._teacher = {name: self._teacher_module(teacher, name) for name in names}
        for name in names:
            self._check_width(student, teacher, name)
        # SparseML: square_head with the default scale weighs the layer mean by the number of
        # layers, so the term (a sum over layers) is of the order of the cross-entropy.
        square_head_default = self.comparison == "square_head" and self.distill_scale == 1.0
        self._scale = float(len(names)) if square_head_default else self.distill_scale
        self._capturing = False
        self._outputs: dict[str, dict[str, torch.Tensor]] = {"student": {}, "teacher": {}}
        self._mask: torch.Tensor | None = None
        for side, modules in (("student", self._student), ("teacher", self._teacher)):
            for name, module in modules.items():
                session.register_hook(self, module, self._capture_hook(side, name))

    def _capture_hook(self, side: str, name: str) -> Any:
        store = self._outputs[side]

        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            # Off outside BATCH_START..LOSS_COMPUTED: recomputation under gradient checkpointing
            # and evaluation forwards capture nothing.
            if self._capturing:
                store[name] = output if isinstance(output, torch.Tensor) else output[0]

        return hook

    def on_event(self, session: LifecycleSession, event: Event) -> None:
        if event.type == EventType.BATCH_START:
            self._start_batch(session, event)
        elif event.type == EventType.LOSS_COMPUTED:
            self._capturing = False
            self._add_loss(event)
            self._clear()
        elif event.type == EventType.BATCH_END:
            self._clear()

    def on_finalize(self, session: LifecycleSession) -> None:
        self._clear()

    def _clear(self) -> None:
        self._capturing = False
        self._mask = None
        for store in self._outputs.values():
            store.clear()

    def _start_batch(self, session: LifecycleSession, event: Event) -> None:
        batch = event.batch
        if batch is None or "input_ids" not in batch:
            raise RuntimeError(
                f"{self.type_name()} needs BATCH_START to carry the batch (input_ids, "
                "attention_mask) to run the teacher on it"
            )
        self._clear()
        self._mask = batch.get("attention_mask")
        self._capturing = True
        # Every process runs the teacher (it may be sharded with FSDP: forwards in lockstep).
        with torch.no_grad():
            session.teacher(input_ids=batch["input_ids"], attention_mask=self._mask, use_cache=False)

    def _add_loss(self, event: Event) -> None:
        if event.loss is None:
            raise RuntimeError(f"{self.type_name()}: LOSS_COMPUTED came without a loss")
        student, teacher = self._outputs["student"], self._outputs["teacher"]
        missing = [n for n in self._student if n not in student or n not in teacher]
        if missing:
            raise RuntimeError(
                f"{self.type_name()}: no output captured for {missing[:3]}; the pipeline must "
                "emit BATCH_START with the batch, run the student forward, then LOSS_COMPUTED"
            )
        mask = self._mask if self._mask is not None and self._mask.dim() == 2 else None
        compare = COMPARISONS[self.comparison]
        kwargs = {"temperature": self.temperature} if self.comparison == "kl_divergence" else {}
        task = event.loss
        terms = [compare(student[n], teacher[n], mask, **kwargs) for n in self._student]
        distill = torch.stack(terms).mean().to(task.device)
        event.loss = self.orig_scale * task + self._scale * distill
        # Tensors, read off the device once per logged step by the trainer (no sync here).
        event.metrics["task_loss"] = task.detach()
        event.metrics["distill_loss"] = distill.detach()

    # target resolution -----------------------------------------------------------------------
    def _resolve_student(self, model: nn.Module) -> list[str]:
        """Full names of the targeted student modules, in model order ('logits' last)."""
        if self.targets is None:
            layers_name, layers = find_decoder_layers(model)
            return [f"{layers_name}.{i}" for i in range(len(layers))]
        names = [n for n, _ in model.named_modules() if n]
        selected: list[str] = []
        for pattern in self.targets:
            if pattern == LOGITS:
                found = [LOGITS]
            elif pattern.startswith("re:"):
                found = [n for n in names if re.match(pattern[3:], n)]
            else:
                found = [pattern] if pattern in names else []
            if not found:
                raise ReciPruneError(
                    f"{self.type_name()}: target '{pattern}' matches no module of the student "
                    f"({type(model).__name__}). {self._name_hint(model, pattern)} Targets are "
                    "full module names, 're:' regexes matched from the start of the name, or "
                    "'logits'."
                )
            selected += [n for n in found if n not in selected]
        order = {n: i for i, n in enumerate(names)}
        return sorted(selected, key=lambda n: order.get(n, len(order)))

    def _module(self, model: nn.Module, name: str) -> nn.Module:
        if name == LOGITS:
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            if head is None:
                raise ReciPruneError(
                    f"{self.type_name()}: target 'logits' needs a model with an output "
                    f"(LM head) layer, and {type(model).__name__} has none; target hidden "
                    "states (decoder layers) instead."
                )
            return head
        return model.get_submodule(name)

    def _teacher_module(self, teacher: nn.Module, name: str) -> nn.Module:
        try:
            return self._module(teacher, name)
        except AttributeError:
            raise ReciPruneError(
                f"{self.type_name()}: the teacher ({type(teacher).__name__}) has no module "
                f"'{name}', which the student has. {self._name_hint(teacher, name)} Targets are "
                "looked up in the teacher by the same name: target only modules both have."
            ) from None

    @staticmethod
    def _name_hint(model: nn.Module, pattern: str) -> str:
        """One sentence on what `model` does have: its decoder layers, and close names."""
        parts = []
        try:
            layers_name, layers = find_decoder_layers(model)
            last = f"{layers_name}.{len(layers) - 1}"
            parts.append(f"It has {len(layers)} decoder layers ('{layers_name}.0' … '{last}').")
        except ReciPruneError:
            pass
        names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(pattern.removeprefix("re:"), names, n=3)
        if close:
            parts.append(f"Closest module names: {', '.join(close)}.")
        return " ".join(parts)

    def _check_width(self, student: nn.Module, teacher: nn.Module, name: str) -> None:
        s_dim = _output_width(student, self._student[name])
        t_dim = _output_width(teacher, self._teacher[name])
        if s_dim is None or t_dim is None or s_dim == t_dim:
            return
        if name == LOGITS:
            raise ReciPruneError(
                f"{self.type_name()}: the teacher's logits have {t_dim} entries (vocabulary) and "
                f"the student's {s_dim}; logits can only be compared between models with the same "
                "tokenizer. Use such a teacher, or target hidden states instead of 'logits'."
            )
        raise ReciPruneError(
            f"{self.type_name()}: the teacher's '{name}' outputs {t_dim} features (hidden size) "
            f"and the student's {s_dim}; hidden states can only be compared between modules of "
            "the same width. Use a teacher of the same hidden size, or target 'logits'."
        )


def _output_width(model: nn.Module, module: nn.Module) -> int | None:
    """Size of the last dim of `module`'s output: a Linear's out features, else hidden_size."""
    for attr in ("out_features", "nf"):  # nn.Linear, GPT-2's Conv1D
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    width = getattr(getattr(model, "config", None), "hidden_size", None)
    return width if isinstance(width, int) else None
