"""SparseDeltaModifier: SpIEL sparse fine-tuning, a fixed number of weight deltas re-chosen by drop-and-grow."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.distributed as dist
from pydantic import Field, field_validator, model_validator
from torch import nn

from reciprune.algorithms.spiel import (
    drop_and_grow,
    drop_rate,
    merge_sparse_delta,
    sparse_delta_product,
    split_budget,
    top_candidates,
)
from reciprune.core import distributed as D
from reciprune.core.events import Event, EventType
from reciprune.core.targets import stores_transposed
from reciprune.errors import ReciPruneError
from reciprune.modifiers.constant import keeps_base_zeros
from reciprune.modifiers.registry import register_modifier
from reciprune.modifiers.targeted import DeltaModifier

if TYPE_CHECKING:
    from reciprune.core.session import LifecycleSession

#: Names of what the modifier adds to each targeted module (in the state dict as `<module>.<name>`).
INDICES, VALUES = "delta_indices", "delta_values"
#: The file export_files writes: `<module>.indices`, `<module>.values`, `<module>.shape`.
DELTAS_FILE = "sparse_deltas.safetensors"


@register_modifier
class SparseDeltaModifier(DeltaModifier):
    """Sparse fine-tuning (SpIEL-AG): train a fixed number of weight deltas whose positions are re-chosen during training by drop-and-grow.

    Each targeted Linear gets a flat `delta_indices` buffer η and a trainable `delta_values`
    parameter φ (zeros), and computes with W' = W + S(η, φ); every base parameter of the model
    is frozen. The budget (`density` of all the model's parameters, or `num_tunable_weights`)
    is split across the targeted modules in proportion to their size; the first indices are a
    seeded uniform random choice, as in the reference implementation.

    Selection (step counts are optimizer steps, so 1 process with accumulation and N
    processes see the same data): in the `selection_accumulation_steps` steps before each
    reselection, the candidates are the untuned entries with the largest |gradient| in the
    first micro-batch (of the global batch), and their gradient is summed over the steps. At
    the end of those steps the ⌊ζ·k⌋ tuned entries with the smallest |φ| are dropped and as
    many candidates with the largest accumulated |gradient| grown, with φ = 0 and AdamW's
    moments seeded with their mean gradient and mean squared gradient (bias-corrected for the
    current step). Reselections happen after steps S, S + R, S + 2R, … (S =
    selection_accumulation_steps, R = reselection_steps); the first replaces every random
    index (ζ = 1, as in the reference), later ones ζ = reselection_rate · (1 − step/total).

    The dense gradient of W is formed for one layer at a time in its backward, reduced at once
    to the gradients of φ and of the candidates, and freed: it never persists, and no dense
    copy of W' is kept. Under FSDP the candidates come from rank 0, their gradients are
    all-reduced every step and the values gathered at reselection, so every process makes
    the same choice. At export, W += S(η, φ) and the added names are removed (the saved
    checkpoint is the plain architecture); the deltas are also saved on their own in
    `sparse_deltas.safetensors` (`<module>.indices`, `.values`, `.shape`). On a sparse base
    (`mask_base_zeros`, on when the stage has a ConstantPruningModifier) neither the first
    indices nor any grown one is a position where the base weight is zero, so the merged model
    keeps every zero.
    """

    density: float | None = Field(
        None,
        description="Tuned entries as a fraction of all the model's parameters (the paper's "
        "density; 0.01 = 1%), placed in the targeted modules. Exactly one of density and "
        "num_tunable_weights.",
    )
    num_tunable_weights: int | None = Field(
        None, gt=0, description="Tuned entries in all targeted modules together."
    )
    reselection_steps: int = Field(
        20, gt=0, description="Optimizer steps between two drop-and-grow reselections."
    )
    selection_accumulation_steps: int = Field(
        5,
        gt=0,
        description="Optimizer steps over which candidate gradients are summed before each "
        "reselection (at most reselection_steps).",
    )
    reselection_rate: float = Field(
        0.2,
        ge=0.0,
        le=1.0,
        description="Fraction of tuned entries replaced at a reselection, decaying linearly to "
        "0 at the end of training (the first reselection replaces all the random ones).",
    )
    param_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Dtype of the trained delta values."
    )
    seed: int = Field(0, description="Seed of the first (random) choice of indices.")
    mask_base_zeros: bool | None = Field(
        None,
        description="Never place a delta on a weight that is zero in the base model, so a "
        "sparse base stays exactly as sparse after the merge; unset: on when the stage has a "
        "ConstantPruningModifier.",
    )

    example_fields: ClassVar[dict[str, Any]] = {"density": 0.01}
    paper: ClassVar[str] = (
        "Ansell, Vulić, Sterz, Korhonen & Ponti, 'Scaling Sparse Fine-Tuning to Large Language "
        "Models', 2024 (SpIEL-AG); reference: the sft tuner of AlanAnsell/peft"
    )
    legacy_fields: ClassVar[dict[str, str | None]] = {
        "initial_reselection_rate": "reselection_rate",
    }

    # validation ------------------------------------------------------------------------------
    @field_validator("density")
    @classmethod
    def _check_density(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 < value <= 1.0:
            raise ValueError(
                f"density {value} is outside (0, 1]: it is the fraction of the model's "
                "parameters that are tuned, e.g. 0.01 for 1%"
            )
        return value

    @model_validator(mode="after")
    def _check_budget(self) -> SparseDeltaModifier:
        if (self.density is None) == (self.num_tunable_weights is None):
            given = "both" if self.density is not None else "neither"
            raise ValueError(
                f"{given} of density and num_tunable_weights given: set exactly one, e.g. "
                "'density: 0.01' (1% of the model's parameters) or 'num_tunable_weights: "
                "1000000'"
            )
        if self.selection_accumulation_steps > self.reselection_steps:
            raise ValueError(
                f"selection_accumulation_steps ({self.selection_accumulation_steps}) is more "
                f"than reselection_steps ({self.reselection_steps}): the gradients are summed "
                "over steps between two reselections; lower it or raise reselection_steps"
            )
        return self

    # preparation -----------------------------------------------------------------------------
    def on_prepare(self, session: LifecycleSession) -> None:
        super().on_prepare(session)
        targeted = self.targeted_modules()
        total = sum(p.numel() for p in session.model.parameters())
        try:
            budget = split_budget(
                [m.weight.numel() for m in targeted.values()],
                total,
                density=self.density,
                num_tunable_weights=self.num_tunable_weights,
            )
        except ValueError as exc:
            raise ReciPruneError(
                f"{self.type_name()}: {exc} (the model has {total} parameters). Lower density "
                "or num_tunable_weights, or target more modules."
            ) from None
        generator = torch.Generator().manual_seed(self.seed)
        self._keep_zeros = keeps_base_zeros(self.mask_base_zeros, session)
        self._modules: dict[str, nn.Module] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for (name, module), k in zip(targeted.items(), budget, strict=True):
            if k == 0:  # too small for even one entry of the budget
                continue
            if hasattr(module, INDICES) or hasattr(module, VALUES):
                raise ReciPruneError(
                    f"{self.type_name()}: {name} already has sparse deltas; target each module "
                    "with one SparseDeltaModifier only."
                )
            weight = module.weight
            # Every process draws the same indices: the buffer is replicated under FSDP.
            order = torch.randperm(weight.numel(), generator=generator)
            if self._keep_zeros:
                allowed = order[weight.detach().reshape(-1).cpu()[order] != 0]
                if allowed.numel() < k:
                    raise ReciPruneError(
                        f"{self.type_name()}: {name} has {allowed.numel()} non-zero weights, "
                        f"fewer than its budget of {k} deltas on non-zero weights. Lower "
                        "density or num_tunable_weights, or set mask_base_zeros: false."
                    )
                order = allowed
            indices = order[:k].sort().values
            module.register_buffer(INDICES, indices.to(weight.device))
            values = torch.zeros(k, dtype=getattr(torch, self.param_dtype), device=weight.device)
            module.register_parameter(VALUES, nn.Parameter(values))
            self._modules[name] = module
            self._shapes[name] = tuple(weight.shape)
            session.register_hook(self, module, self._delta_hook(name))
            session.records[name].update(spiel_tunable_weights=k, spiel_reselections=0)
        self._stats: dict[str, dict[str, torch.Tensor]] = {}
        self._collecting = False
        self._batch_step = -1

    def _delta_hook(self, name: str) -> Any:
        transposed = stores_transposed(self._modules[name])  # GPT-2 stores W as [in, out]

        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            on_grad = None
            if self._collecting and torch.is_grad_enabled():
                # The weight as this forward used it (unsharded under FSDP2, and kept valid
                # through the backward that calls on_grad, which needs it for ∂L/∂x anyway).
                on_grad = self._accumulate(name, module.weight if self._keep_zeros else None)
            delta = sparse_delta_product(
                args[0],
                getattr(module, VALUES),
                getattr(module, INDICES),
                self._shapes[name],
                transposed=transposed,
                on_weight_grad=on_grad,
            )
            return output + delta

        return hook

    def _accumulate(self, name: str, base_weight: torch.Tensor | None) -> Any:
        """Backward callback: reduce the layer's dense ∂L/∂W' to its candidates' entries.
        With `base_weight`, positions where it is zero are never candidates."""

        def on_grad(grad_w: torch.Tensor) -> None:
            stats = self._stats.get(name)
            if stats is None:  # the phase's first micro-batch picks the candidates
                indices = getattr(self._modules[name], INDICES)
                excluded = None if base_weight is None else base_weight.detach() == 0
                candidates = top_candidates(grad_w, indices, indices.numel(), excluded)
                if D.is_distributed():
                    dist.broadcast(candidates, src=0)  # rank 0 holds global micro-batch 0
                zeros = torch.zeros(candidates.numel(), dtype=torch.float32, device=grad_w.device)
                stats = {"candidates": candidates, "step": zeros, "sum": zeros.clone(),
                         "sq": zeros.clone(), "steps": torch.zeros((), dtype=torch.float32)}  # fmt: skip
                self._stats[name] = stats
            stats["step"] += grad_w.reshape(-1)[stats["candidates"]].float()

        return on_grad

    # schedule --------------------------------------------------------------------------------
    def _in_selection(self, step: int, total_steps: int | None) -> bool:
        """Whether optimizer step `step` (0-based) sums candidate gradients."""
        R, S = self.reselection_steps, self.selection_accumulation_steps
        reselect_after = step - step % R + S
        return step % R < S and (not total_steps or reselect_after < total_steps)

    def on_event(self, session: LifecycleSession, event: Event) -> None:
        step, total = event.global_step, event.total_steps
        if event.type == EventType.BATCH_START:
            if self._batch_step != step and step % self.reselection_steps == 0:
                self._stats = {}  # a new phase: forget an unfinished one
            self._batch_step = step
            self._collecting = self._in_selection(step, total)
        elif event.type == EventType.OPTIMIZER_PRE_STEP and self._in_selection(step, total):
            self._end_selection_step()
        elif event.type == EventType.OPTIMIZER_POST_STEP:
            self._collecting = False
            last = step % self.reselection_steps == self.selection_accumulation_steps - 1
            if last and self._in_selection(step, total) and self._stats:
                self._reselect(session, step + 1, total)
                self._stats = {}

    def _end_selection_step(self) -> None:
        """Fold this step's candidate gradients (averaged over processes) into the sums."""
        names = [name for name in self._modules if name in self._stats]
        if not names:
            return
        step = D.all_reduce_sum(torch.cat([self._stats[n]["step"] for n in names]))
        step /= D.world_size()  # FSDP averages gradients over processes: the same mean
        for name, g in zip(names, step.split([self._stats[n]["step"].numel() for n in names]),
                           strict=True):  # fmt: skip
            stats = self._stats[name]
            stats["sum"] += g
            stats["sq"] += g * g
            stats["steps"] += 1
            stats["step"].zero_()

    def _reselect(self, session: LifecycleSession, completed: int, total: int | None) -> None:
        """Drop-and-grow in every module, then seed the optimizer state of the changed slots."""
        first = completed == self.selection_accumulation_steps
        rate = 1.0 if first else (
            drop_rate(completed, total, self.reselection_rate) if total else self.reselection_rate
        )
        with torch.no_grad():
            for name, module in self._modules.items():
                stats = self._stats.get(name)
                if stats is None:
                    continue
                param = getattr(module, VALUES)
                full = param.full_tensor() if hasattr(param, "full_tensor") else param
                indices = getattr(module, INDICES)
                k = int(rate * indices.numel())
                result = drop_and_grow(indices, full, stats["candidates"], stats["sum"].abs(), k)
                indices.copy_(result.indices)
                steps = stats["steps"].clamp(min=1).to(stats["sum"].device)
                mean = stats["sum"][result.grown] / steps
                mean_sq = stats["sq"][result.grown] / steps
                self._write_slots(session, param, result.slots, mean, mean_sq)
                record = session.records[name]
                record["spiel_reselections"] = record.get("spiel_reselections", 0) + 1
                record["spiel_last_changed"] = int(result.slots.numel())

    @staticmethod
    def _write_slots(
        session: LifecycleSession,
        param: nn.Parameter,
        slots: torch.Tensor,
        mean: torch.Tensor,
        mean_sq: torch.Tensor,
    ) -> None:
        """φ ← 0 and Adam's (exp_avg, exp_avg_sq) ← (bc₁·ḡ, bc₂·ḡ²) at `slots`, in this
        process's shard of the parameter and of its optimizer state."""
        local = D.local_tensor(param.data)
        n = param.shape[0]
        if local.numel() == n:
            offset = 0
        else:  # FSDP2 shards dim 0 like torch.chunk: rank r holds [r·c, (r+1)·c), c = ⌈n/W⌉
            chunk = math.ceil(n / D.world_size())
            offset = min(D.rank() * chunk, n)
            if local.numel() != max(0, min(chunk, n - offset)):
                raise RuntimeError(
                    f"unexpected shard of {n} sparse delta values: {local.numel()} on rank "
                    f"{D.rank()} of {D.world_size()}"
                )
        mine = (slots >= offset) & (slots < offset + local.numel())
        where = slots[mine] - offset
        local[where] = 0
        optimizer = session.optimizer
        state = optimizer.state.get(param) if optimizer is not None else None
        if not state:  # no optimizer yet (or no step taken): nothing to seed
            return
        betas = next(g.get("betas", (0.9, 0.999)) for g in optimizer.param_groups
                     if any(p is param for p in g["params"]))  # fmt: skip
        t = float(state["step"]) if "step" in state else 0.0
        # AdamW divides by (1 − β^t): scaling the seeds by it makes the corrected moments ḡ, ḡ².
        for key, beta, seed in (("exp_avg", betas[0], mean), ("exp_avg_sq", betas[1], mean_sq)):
            if key in state:
                moment = D.local_tensor(state[key])
                moment[where] = ((1.0 - beta**t) * seed[mine]).to(moment.dtype)

    # export and resume -----------------------------------------------------------------------
    def export_files(self, state: dict[str, torch.Tensor]) -> dict[str, bytes]:
        from safetensors.torch import save

        tensors: dict[str, torch.Tensor] = {}
        for name in self._modules:
            tensors[f"{name}.indices"] = state[f"{name}.{INDICES}"].detach().cpu().long().clone()
            tensors[f"{name}.values"] = state[f"{name}.{VALUES}"].detach().cpu().float().clone()
            tensors[f"{name}.shape"] = torch.tensor(self._shapes[name], dtype=torch.long)
        return {DELTAS_FILE: save(tensors, metadata={"method": "SpIEL sparse deltas"})}

    def export_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        state = dict(state)
        for name in self._modules:
            indices, values = state.pop(f"{name}.{INDICES}"), state.pop(f"{name}.{VALUES}")
            key = f"{name}.weight"
            state[key] = merge_sparse_delta(state[key], indices.long(), values)
        return state

    def state_dict(self) -> dict[str, Any]:
        # The indices and values are in the model's own state; only an unfinished selection
        # phase lives here.
        return {"stats": {n: {k: v.clone() for k, v in s.items()} for n, s in self._stats.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._stats = {}
        for name, stats in state.get("stats", {}).items():
            if name not in self._modules:
                raise ValueError(f"saved SparseDeltaModifier state names unknown module {name}")
            device = getattr(self._modules[name], INDICES).device
            self._stats[name] = {k: v.to(device) if k != "steps" else v for k, v in stats.items()}

    def on_finalize(self, session: LifecycleSession) -> None:
        self._stats = {}
        self._collecting = False
