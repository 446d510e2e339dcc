"""The one shape every modifier has: pydantic fields, then lifecycle callbacks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from torch import Tensor
    from torch.nn import Module

    from reciprune.core.events import Event
    from reciprune.core.session import LifecycleSession


class Modifier(BaseModel):
    """Base class. Subclasses declare fields with defaults and descriptions and override the hooks.

    A modifier knows nothing of pipelines: it reacts to events and registers hooks through the
    session, and calls one pure function in `reciprune.algorithms` for the math.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    start: float | None = Field(
        None,
        description="First global step (or fraction of training when < 1) at which the modifier "
        "acts; unset means from the beginning.",
    )
    end: float | None = Field(
        None,
        description="Step (or fraction of training when < 1) from which the modifier stops acting; "
        "unset or -1 means until the end.",
    )

    #: Whether the modifier needs calibration data (oneshot statistics).
    needs_calibration: ClassVar[bool] = False
    #: Stage kinds (`oneshot`, `finetune`) the modifier can run in.
    run_types: ClassVar[tuple[str, ...]] = ("oneshot",)
    #: Whether the modifier reads a teacher model (`session.teacher`), e.g. distillation.
    needs_teacher: ClassVar[bool] = False
    #: What the modifier leaves in the weights that the saved checkpoint must describe:
    #: "sparsity" (zeros that stay zeros: metadata, sparse formats) and/or "quantization"
    #: (modules with a quantization scheme: packed formats).
    produces: ClassVar[frozenset[str]] = frozenset()
    #: Whether `on_prepare` adds trainable parameters inside the decoder layers (adapters,
    #: deltas): what ISTModifier schedules layer by layer.
    adds_layer_parameters: ClassVar[bool] = False
    #: Whether `on_prepare` freezes every weight the model came with (only what the modifier
    #: adds trains): a `self` teacher may then share the student's weights instead of a copy.
    freezes_base: ClassVar[bool] = False
    #: The paper the modifier implements, for reference pages.
    paper: ClassVar[str] = ""
    #: Values the reference page's recipe snippet sets beside the defaults, for fields that have
    #: none but need one (e.g. one of two alternatives), so the snippet validates as written.
    example_fields: ClassVar[dict[str, Any]] = {}
    #: Modifiers (name → fields) the snippet puts before this one in its stage, for a modifier
    #: that works on what another adds (e.g. ISTModifier schedules LoRAModifier's adapters).
    example_before: ClassVar[dict[str, dict[str, Any]]] = {}
    #: Legacy SparseML field names: old name → new name, or None when accepted and ignored.
    legacy_fields: ClassVar[dict[str, str | None]] = {}

    @model_validator(mode="before")
    @classmethod
    def _map_legacy_fields(cls, data: Any) -> Any:
        """Rename SparseML field names to ours (or drop the ones that mean nothing here)."""
        if not isinstance(data, dict) or not cls.legacy_fields:
            return data
        data = dict(data)
        for old, new in cls.legacy_fields.items():
            if old in data:
                value = data.pop(old)
                if new is not None and new not in data:
                    data[new] = value
        return data

    @property
    def needs_profile(self) -> bool:
        """Whether a dense statistics pass over all layers must run before calibration."""
        return False

    @property
    def mask_pattern(self) -> str | None:
        """The sparsity structure the modifier leaves ('unstructured' or 'N:M'), or None when
        it does not decide one (it keeps whatever mask the weights have)."""
        return None

    @property
    def needs_4bit_base(self) -> bool:
        """Whether the finetune stage must run on a 4-bit base (`load_in_4bit`); the modifier
        then reads the NF4 backend from `session.training.base_quantization`."""
        return False

    def missing_4bit_base(self) -> Exception:
        """The error for a run without the 4-bit base this modifier needs."""
        from reciprune.errors import ReciPruneError

        return ReciPruneError(
            f"{self.type_name()} needs a 4-bit base: pass --load-in-4bit (or set "
            "'load_in_4bit: true' under the stage's 'training:')."
        )

    @property
    def requires_data(self) -> bool:
        """Whether running this modifier needs calibration batches at all."""
        return self.needs_calibration or self.needs_profile

    def _resolve_step(self, value: float, total_steps: int | None) -> float:
        if 0 < value < 1 and total_steps:
            return value * total_steps
        return value

    def is_active(self, global_step: int, total_steps: int | None = None) -> bool:
        """True when `start <= global_step < end` (bounds resolved against `total_steps`)."""
        if self.start is not None and global_step < self._resolve_step(self.start, total_steps):
            return False
        if self.end is not None and self.end != -1:
            return global_step < self._resolve_step(self.end, total_steps)
        return True

    def check_stage(self, earlier: list[Modifier]) -> str | None:
        """A problem with this modifier's place in its stage (`earlier`: the modifiers before
        it), as a message for the recipe error, or None."""
        return None

    def on_prepare(self, session: LifecycleSession) -> None:
        """Finetune stages: called once before `on_initialize`, on the whole model before it is
        sharded and before the optimizer is built. Add trainable parameters (registered on the
        modules they belong to, so FSDP shards them with their layer), wrap or freeze modules
        here. `session.training.sample_batches` (the first optimizer step's micro-batches) and
        `session.training.loss(batch)` (the task loss) serve methods that score parameters first.
        It must be deterministic: a resumed run prepares again before loading its checkpoint."""

    def on_initialize(self, session: LifecycleSession) -> None:
        """Called once, before any event: resolve targets, build state."""

    def on_event(self, session: LifecycleSession, event: Event) -> None:
        """Called for every event while the modifier is active."""

    def on_finalize(self, session: LifecycleSession) -> None:
        """Called once at the end; session hooks are removed right after."""

    def export_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Finetune stages, on rank 0 after training: the full (gathered, CPU) state dict of the
        trained model → the state dict of the plain architecture that is saved. A modifier that
        added parameters folds them into the base weights here (merge) and drops their names.
        Called in recipe order, after every modifier's `export_files`."""
        return state

    def export_model(self, model: Module) -> None:
        """Finetune stages, on rank 0: the plain model built from the exported state dict,
        before it is evaluated and saved; edit it in place (e.g. attach the quantization layout
        the checkpoint is saved in). Called in recipe order."""

    def export_files(self, state: dict[str, Tensor]) -> dict[str, bytes]:
        """Files (name → bytes) saved beside the checkpoint, e.g. trained adapters or deltas on
        their own, from the full state dict before any `export_state`."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """State a resumed run needs (masks, scores), as tensors and plain values.

        Under FSDP each process saves and reloads its own part (tensors are local shards), so a
        run resumes with the same number of processes. Called after `on_initialize`.
        """
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (called after `on_initialize` on resume)."""

    @classmethod
    def type_name(cls) -> str:
        return cls.__name__

    @classmethod
    def summary(cls) -> str:
        """First line of the class docstring."""
        return cls.__doc__.strip().splitlines()[0] if cls.__doc__ else ""
