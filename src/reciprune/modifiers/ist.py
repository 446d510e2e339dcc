"""ISTModifier: importance-aware sparse tuning, a sampled few layers' adapters train each step."""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from reciprune.algorithms.ist import (
    layer_count,
    sample_layers_to_update,
    sample_suppression_rollouts,
    update_importance,
)
from reciprune.core import distributed as D
from reciprune.core.events import Event, EventType
from reciprune.core.layers import eval_mode, find_decoder_layers
from reciprune.errors import RecipeError, ReciPruneError
from reciprune.modifiers.base import Modifier
from reciprune.modifiers.registry import register_modifier

if TYPE_CHECKING:
    from collections.abc import Iterator

    from reciprune.core.session import LifecycleSession

# Streams of the per-step generators: the layers to update, and the suppression rollouts.
_UPDATE, _SUPPRESS = 0, 1


def _generator(seed: int, step: int, stream: int) -> torch.Generator:
    """A generator that depends only on (seed, step, stream): every process, and a resumed run,
    draws the same layers at the same step."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 2 + stream) % 2**63)


@register_modifier
class ISTModifier(Modifier):
    """Importance-aware sparse tuning: each optimizer step only a sampled fraction of the decoder layers' adapters get gradients, drawn by layer scores learnt from adapter-suppression rollouts.

    IST wraps the per-layer trainable parameters that modifiers before it in the stage added
    (LoRAModifier's adapters, or another adapter or delta modifier's): every parameter with
    requires_grad inside decoder layer ℓ, grouped by ℓ. Trainable parameters outside the decoder
    layers always train. Each step draws N_u = round(L · update_ratio) (halves up, at least 1) of
    the L layers that hold such parameters, without replacement, with P(ℓ) ∝ σ(−s_ℓ); the others get
    requires_grad False for the step's forwards and backwards, so autograd does not compute their
    gradients (nor backpropagates below the lowest drawn layer) and AdamW skips them (their grads
    are None): no update, no weight decay, no moment change.

    Every `importance_interval` steps (not after the last), after the optimizer step, `rollouts`
    forwards without gradients (dropout off) run on the step's micro-batches (all of them, on every
    process: the same global batch whatever the number of processes), each with N_s = round(L ·
    suppress_ratio) layers drawn with P(ℓ) ∝ σ(s_ℓ) whose adapter output is scaled by
    `suppress_factor`. With L_k the mean task loss of rollout k (averaged over processes), r_k =
    exp(−L_k) − mean_j exp(−L_j) and s_ℓ += importance_lr · r_k · σ(s_ℓ)(1 − σ(s_ℓ)) for each layer
    suppressed in rollout k: a layer whose suppression lowers the loss gets a higher score and is
    updated less often (see reciprune.algorithms.ist).

    Suppression scales a PEFT LoRA/DoRA layer's `scaling` (the factor of its lora_B path, which
    DoRA also uses in its norm), exactly as the authors' code does; any other trainable
    parameter of the layer is multiplied by the factor for the rollout, which assumes the
    layer's adapter contribution is linear in it (true of a row-sparse ΔW or a sparse delta
    added to W). The draws are seeded by (seed, step), so every process draws the same layers
    and a resumed run continues the same sequence; the scores are saved with the run's state.
    """

    update_ratio: float = Field(0.25, gt=0.0, le=1.0, description="Fraction of the layers "
                                "whose adapters train at each step (at least one layer).")
    importance_interval: int = Field(10, gt=0, description="Optimizer steps between two "
                                     "importance updates.")
    rollouts: int = Field(3, ge=2, description="Forward passes (suppressed layer sets) per "
                          "importance update; the reward baseline is their mean, so at least 2.")
    suppress_ratio: float = Field(0.5, gt=0.0, lt=1.0, description="Fraction of the layers "
                                  "whose adapters are suppressed in each rollout.")
    suppress_factor: float = Field(0.25, ge=0.0, lt=1.0, description="Factor on a suppressed "
                                   "layer's adapter output during a rollout (0 removes it).")
    importance_lr: float = Field(10.0, gt=0.0, description="Step size η of the importance "
                                 "score update.")
    seed: int = Field(0, description="Seed of the layer draws; each step draws from a "
                      "generator seeded by (seed, step).")

    run_types: ClassVar[tuple[str, ...]] = ("finetune",)
    example_before: ClassVar[dict[str, dict[str, Any]]] = {"LoRAModifier": {"r": 8, "alpha": 16}}
    paper: ClassVar[str] = (
        "Yao et al., 'Layer-wise Importance Matters: Less Memory for Better Performance in "
        "Parameter-efficient Fine-tuning of Large Language Models', Findings of EMNLP 2024"
    )

    # validation ------------------------------------------------------------------------------
    def check_stage(self, earlier: list[Modifier]) -> str | None:
        if not any(m.adds_layer_parameters for m in earlier):
            return (
                "ISTModifier chooses which layers' adapters train, and no modifier before it in "
                "its stage adds per-layer trainable parameters: put a LoRAModifier (or another "
                "adapter or sparse-delta modifier) before it in the same stage"
            )
        return None

    # wiring ----------------------------------------------------------------------------------
    def on_prepare(self, session: LifecycleSession) -> None:
        position = next(i for i, m in enumerate(session.modifiers) if m is self)
        problem = self.check_stage(session.modifiers[:position])
        if problem:
            raise RecipeError(problem)
        layers_name, layers = find_decoder_layers(session.model)
        groups: dict[int, list[str]] = {}
        for index, layer in enumerate(layers):
            names = [f"{layers_name}.{index}.{n}" for n, p in layer.named_parameters()
                     if p.requires_grad]
            if names:
                groups[index] = names
        if not groups:
            raise ReciPruneError(
                f"ISTModifier: no decoder layer of {type(session.model).__name__} has trainable "
                "parameters after the modifiers before it in the stage ran, so there are no "
                "adapters to schedule. Put a LoRAModifier (or another adapter modifier) that "
                "targets modules inside the decoder layers before it."
            )
        self._layers_name = layers_name
        # Names, not tensors: FSDP replaces the parameters when it shards after this call.
        self._groups = groups

    def on_initialize(self, session: LifecycleSession) -> None:
        if not hasattr(self, "_groups"):
            raise RuntimeError("ISTModifier.on_prepare must run before on_initialize")
        from peft.tuners.lora import LoraLayer

        model = session.model
        params = dict(model.named_parameters())
        _, layers = find_decoder_layers(model)
        self._indices = sorted(self._groups)  # position p in the scores ↔ decoder layer index
        self._params = [[params[n] for n in self._groups[i]] for i in self._indices]
        self._lora_layers: list[list[nn.Module]] = []
        self._scaled_params: list[list[nn.Parameter]] = []
        for index, group in zip(self._indices, self._params, strict=True):
            lora = [m for m in layers[index].modules() if isinstance(m, LoraLayer)]
            covered = {id(p) for m in lora for p in m.parameters()}
            self._lora_layers.append(lora)
            self._scaled_params.append([p for p in group if id(p) not in covered])
        L = len(self._indices)
        self._n_update = layer_count(L, self.update_ratio)
        self._n_suppress = layer_count(L, self.suppress_ratio)
        self._scores = torch.zeros(L, dtype=torch.float64)
        self._updates = torch.zeros(L, dtype=torch.long)
        self._chosen_step: int | None = None
        self._chosen: set[int] = set(range(L))
        self._batches: list[dict[str, torch.Tensor]] = []
        # A root pre-forward hook toggles requires_grad: FSDP2's own root hook runs first (it is
        # prepended) and initialises its groups lazily on the first forward while every adapter
        # is still trainable, which fixes their gradient dtypes.
        session.register_hook(self, model, self._pre_forward_hook(session), kind="forward_pre")

    @property
    def scores(self) -> torch.Tensor:
        """The importance scores s, one per layer with trainable parameters (a copy)."""
        return self._scores.clone()

    @property
    def num_update(self) -> int:
        """N_u: layers whose adapters train at each step."""
        return self._n_update

    def layers_to_update(self, step: int) -> set[int]:
        """Positions (into the scored layers) whose adapters train at `step`."""
        drawn = sample_layers_to_update(
            self._scores, self._n_update, _generator(self.seed, step, _UPDATE)
        )
        return set(drawn.tolist())

    def trained_layers(self) -> list[int]:
        """Decoder-layer indices whose adapters train at the current step (after its forward)."""
        return [self._indices[p] for p in sorted(self._chosen)]

    def _pre_forward_hook(self, session: LifecycleSession) -> Any:
        def hook(_module: nn.Module, _args: Any) -> None:
            if not torch.is_grad_enabled():  # evaluation and the rollouts
                return
            step = session.global_step
            if not self.is_active(step, session.total_steps):
                self._set_trainable(set(range(len(self._indices))))
                return
            if self._chosen_step != step:
                self._chosen_step = step
                self._chosen = self.layers_to_update(step)
                self._updates[sorted(self._chosen)] += 1
            self._set_trainable(self._chosen)

        return hook

    def _set_trainable(self, chosen: set[int]) -> None:
        for position, group in enumerate(self._params):
            for param in group:
                param.requires_grad_(position in chosen)

    def on_event(self, session: LifecycleSession, event: Event) -> None:
        done = event.global_step + 1
        due = done % self.importance_interval == 0 and (
            session.total_steps is None or done < session.total_steps
        )
        if event.type == EventType.BATCH_START and due and event.batch is not None:
            self._batches.append(event.batch)
        elif event.type == EventType.OPTIMIZER_POST_STEP:
            if due and self._batches:
                self._update_importance(session, event.global_step)
            self._batches = []
            # Between steps (evaluation, checkpoints) every adapter is trainable again.
            self._set_trainable(set(range(len(self._indices))))

    def _update_importance(self, session: LifecycleSession, step: int) -> None:
        if session.training.loss is None:
            raise RuntimeError("ISTModifier needs session.training.loss (the task loss of a batch)")
        suppressed = sample_suppression_rollouts(
            self._scores, self._n_suppress, self.rollouts, _generator(self.seed, step, _SUPPRESS)
        )
        losses = []
        # Eval mode: no dropout in the rollouts, as in the authors' code.
        with eval_mode(session.model), torch.no_grad():
            for layers in suppressed:
                with self._suppressed(set(layers.tolist())):
                    batch_losses = [float(session.training.loss(b)) for b in self._batches]
                losses.append(sum(batch_losses) / len(batch_losses))
        # Every process must update the scores identically: the loss of the global batch.
        mean = D.all_reduce_mean(torch.tensor(losses, dtype=torch.float64))
        self._scores = update_importance(self._scores, suppressed, mean, self.importance_lr)

    @contextmanager
    def _suppressed(self, positions: set[int]) -> Iterator[None]:
        """Scale the adapter output of the layers at `positions` by `suppress_factor`."""
        saved_scaling: list[tuple[dict[str, float], dict[str, float]]] = []
        saved_params: list[tuple[torch.Tensor, torch.Tensor]] = []
        try:
            for p in sorted(positions):
                for module in self._lora_layers[p]:
                    scaling = module.scaling
                    saved_scaling.append((scaling, dict(scaling)))
                    for key in scaling:
                        scaling[key] = scaling[key] * self.suppress_factor
                for param in self._scaled_params[p]:
                    local = D.local_tensor(param.data)
                    saved_params.append((local, local.clone()))
                    local.mul_(self.suppress_factor)
            yield
        finally:
            for scaling, values in saved_scaling:
                scaling.update(values)
            for local, values in saved_params:
                local.copy_(values)  # exact: dividing by the factor would round (or divide by 0)

    def on_finalize(self, session: LifecycleSession) -> None:
        self._set_trainable(set(range(len(self._indices))))
        self._batches = []
        for position, index in enumerate(self._indices):
            record = session.records[f"{self._layers_name}.{index}"]
            record["ist_score"] = float(self._scores[position])
            record["ist_steps_trained"] = int(self._updates[position])

    def state_dict(self) -> dict[str, Any]:
        return {"scores": self._scores.clone(), "updates": self._updates.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        scores = state.get("scores")
        if scores is None or scores.shape != self._scores.shape:
            shape = None if scores is None else tuple(scores.shape)
            raise ValueError(
                f"saved ISTModifier state has scores of shape {shape}, expected "
                f"{tuple(self._scores.shape)} (one per layer with adapters)"
            )
        self._scores = scores.to(torch.float64).clone()
        self._updates = state.get("updates", self._updates).clone()
