"""QuantizationModifier: compressed-tensors weight (and activation) quantization, RTN or GPTQ."""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from reciprune.algorithms.observers import (
    ObserverColumnQuantizer,
    fake_quantize_weight,
    observe_weight,
    stored_qparams_on_grid,
)
from reciprune.core.events import Event, EventType
from reciprune.core.experts import ExpertSlice
from reciprune.core.layers import find_decoder_layers
from reciprune.core.quantization_schemes import (
    SCHEMES,
    build_scheme,
    describe_args,
    enum_value,
    stored_scheme,
)
from reciprune.core.quantized_modules import (
    FakeQuantizedForward,
    attach_quantization,
    checkpoint_qparams,
    set_static_input_qparams,
)
from reciprune.core.targets import resolve_targets, set_weight_matrix, weight_matrix
from reciprune.errors import RecipeError, ReciPruneError
from reciprune.modifiers.base import Modifier
from reciprune.modifiers.pruning import PruningModifier
from reciprune.modifiers.registry import register_modifier
from reciprune.modifiers.targeted import TargetedModifier, misfit_modules, select_in_layers

if TYPE_CHECKING:
    from compressed_tensors.quantization import QuantizationScheme

    from reciprune.core.session import LifecycleSession


@register_modifier
class QuantizationModifier(TargetedModifier):
    """Quantize each targeted Linear to a compressed-tensors scheme (W4A16, W8A8, FP8, ...) by rounding (RTN) or GPTQ; zeros of pruned weights stay zero.

    Per decoder layer, at the end of its calibration (after any pruning modifier placed before it
    in the stage), each weight gets a scale and zero point per tensor, row or group of inputs
    from the observer ('minmax', or 'mse': the range shrunk to minimise the error) and is
    replaced by its quantized value Q(W) = s·(clamp(round(W/s + z)) − z); with `algorithm: gptq`
    the columns are quantized one by one and the error is spread over the columns not yet
    quantized with the inverse Hessian (Frantar et al. 2023), the pruned weights held at zero.
    Static input scales (FP8, or config_groups with `dynamic: false`) come from the min/max of
    the module's inputs over the calibration tokens; dynamic ones are computed at run time.
    The output head is quantized only when a target is its exact name (e.g. 'lm_head'): by
    rounding, after the last layer, and not when it is tied to the input embeddings.

    In a finetune stage it does quantization-aware training: each weight's scale and zero point
    are fixed when the stage starts (the previous stage's, when it saved these weights quantized
    on that grid, e.g. a oneshot GPTQ stage; else from the observer), and every forward computes
    with W_q = W + sg(Q(W) − W) and, for schemes with dynamic input quantization (W8A8,
    FP8_DYNAMIC), x_q = x + sg(Q(x) − x): the straight-through estimator, so the float weights
    train. At the end the trained weights are rounded on those scales and saved quantized; the
    checkpoint computes what the trained model computed. Zeros stay zero (with
    ConstantPruningModifier the mask holds too). Not with static input scales, GPTQ, start/end,
    or modifiers that add parameters (LoRA, RowSparse, SpIEL).

    The stage's output is saved through compressed-tensors: packed int4 (`pack-quantized`),
    int8 / FP8 weights (`int-quantized`, `float-quantized`, `naive-quantized`) with a
    `quantization_config` in config.json that transformers and vLLM load. Calibration data is
    needed only by GPTQ and static input scales. Modules whose input size a group size does not
    divide must be ignored.
    """

    scheme: str | None = Field(
        None,
        description="compressed-tensors preset: W4A16 / W8A16 (int weights, groups of 128), W8A8 "
        "(int8 per-channel weights, dynamic per-token int8 inputs), FP8 (static per-tensor FP8), "
        "FP8_DYNAMIC; or leave unset and give config_groups.",
    )
    config_groups: dict[str, dict[str, Any]] | None = Field(
        None,
        description="Explicit compressed-tensors schemes by group name: {targets, weights: "
        "{num_bits, type: int|float, strategy: tensor|channel|group, group_size, symmetric}, "
        "input_activations: {..., strategy: tensor|token|group, dynamic}}; a module takes the "
        "first group whose targets (class, name or 're:' regex) match it.",
    )
    observer: Literal["minmax", "mse"] = Field(
        "minmax",
        description="Weight scales from the full min/max range, or 'mse': the shrunk range "
        "(grid of 100, up to 20%) with the lowest |Q(W) − W|^2.4 per scale group.",
    )
    algorithm: Literal["rtn", "gptq"] = Field(
        "rtn",
        description="'rtn': round each weight to its nearest grid point; 'gptq': quantize column "
        "by column and update the rest from the layer Hessian (needs calibration data).",
    )
    block_size: int = Field(128, gt=0, description="GPTQ: columns quantized and updated together.")
    dampening_frac: float = Field(
        0.01, ge=0.0, description="GPTQ: fraction of the mean Hessian diagonal added to its diagonal."
    )
    actorder: bool = Field(
        False,
        description="GPTQ: quantize columns in order of decreasing Hessian diagonal (group scales "
        "still follow the stored column order, so the format does not change).",
    )

    run_types: ClassVar[tuple[str, ...]] = ("oneshot", "finetune")
    produces: ClassVar[frozenset[str]] = frozenset({"quantization"})
    example_fields: ClassVar[dict[str, Any]] = {"scheme": "W4A16"}
    paper: ClassVar[str] = (
        "Frantar, Ashkboos, Hoefler & Alistarh, 'GPTQ: Accurate Post-Training Quantization for "
        "Generative Pre-trained Transformers', ICLR 2023"
    )
    legacy_fields: ClassVar[dict[str, str | None]] = {
        "percdamp": "dampening_frac",
        "blocksize": "block_size",
    }
    #: Refusal of a modifier that adds layer parameters (its name second) in this one's stage.
    _beside_adapter: ClassVar[str] = (
        "{} cannot train beside {}: its parameters are folded into the weights only at export, "
        "so the trained forward would not be the saved one. Fine-tune with it first, then "
        "quantize in a later stage."
    )

    # validation ------------------------------------------------------------------------------
    @field_validator("scheme")
    @classmethod
    def _check_scheme(cls, value: str | None) -> str | None:
        if value is None:
            return None
        name = value.strip().upper()
        if name not in SCHEMES:
            raise ValueError(
                f"unknown scheme {value!r}; the schemes are {', '.join(SCHEMES)} (or give "
                "config_groups for anything else)"
            )
        return name

    @model_validator(mode="after")
    def _check_scheme_source(self) -> QuantizationModifier:
        if (self.scheme is None) == (self.config_groups is None):
            raise ValueError(
                "set exactly one of scheme (one of " + ", ".join(SCHEMES) + ") and config_groups"
            )
        if self.config_groups is not None:
            if not self.config_groups:
                raise ValueError("config_groups is empty: give at least one group")
            for name, group in self.config_groups.items():
                build_scheme(name, group)
        if self.actorder and self.algorithm != "gptq":
            raise ValueError("actorder orders GPTQ's columns; it needs algorithm: gptq")
        return self

    def schemes(self) -> dict[str, QuantizationScheme]:
        """The config groups as compressed-tensors schemes, in order (a preset is one group)."""
        from compressed_tensors.quantization import preset_name_to_scheme

        if self.scheme is not None:
            return {self.scheme: preset_name_to_scheme(self.scheme, ["Linear"])}
        return {name: build_scheme(name, group) for name, group in (self.config_groups or {}).items()}

    @property
    def static_inputs(self) -> bool:
        """Whether some group needs input scales observed on calibration data."""
        return any(
            s.input_activations is not None and not s.input_activations.dynamic
            for s in self.schemes().values()
        )

    @property
    def requires_data(self) -> bool:
        return self.algorithm == "gptq" or self.static_inputs

    def check_stage(self, earlier: list[Modifier]) -> str | None:
        if any(isinstance(m, QuantizationModifier) for m in earlier):
            return (
                "a stage takes one QuantizationModifier (config.json holds one quantization "
                "config per checkpoint); give different settings per module with config_groups"
            )
        adds = [m.type_name() for m in earlier if m.adds_layer_parameters]
        return self._beside_adapter.format(self.type_name(), adds[0]) if adds else None

    # targets ---------------------------------------------------------------------------------
    def assign_schemes(
        self, modules: dict[str, nn.Module]
    ) -> dict[str, tuple[str, QuantizationScheme]]:
        """Module name → (group name, scheme) of the first group whose targets match it; modules
        no group matches are left out."""
        schemes = self.schemes()
        assigned = {}
        for name, module in modules.items():
            for group, scheme in schemes.items():
                if resolve_targets(module, scheme.targets, prefix=name):
                    assigned[name] = (group, scheme)
                    break
        return assigned

    def check_targets(self, modules: dict[str, nn.Module]) -> None:
        """Raise a RecipeError naming the modules whose shape the scheme cannot take (a group
        size that does not divide the input size), with the `ignore` entry that skips them."""
        bad: dict[str, tuple[int, int]] = {}
        in_sizes = set()
        for name, (_group, scheme) in self.assign_schemes(modules).items():
            in_features = weight_matrix(modules[name]).shape[1]
            in_sizes.add(in_features)
            for args in (scheme.weights, scheme.input_activations):
                if args is not None and enum_value(args.strategy) == "group":
                    if in_features % args.group_size:
                        bad[name] = (in_features, args.group_size)
        if not bad:
            return
        sizes = sorted({g for _, g in bad.values()})
        listed, ignore = misfit_modules({n: i for n, (i, _) in bad.items()})
        fits = math.gcd(*in_sizes)
        fitting = [g for g in (128, 64, 32, 16) if fits % g == 0]
        hint = f" or a group_size that divides every input size (e.g. {fitting[0]})" if fitting else ""
        raise RecipeError(
            f"{self.type_name()}: group_size {'/'.join(map(str, sizes))} does not divide the "
            f"input size of {len(bad)} module(s): {listed}. Leave them unquantized with "
            f"{ignore} (or their names){hint}."
        )

    def on_initialize(self, session: LifecycleSession) -> None:
        if session.run_type == "finetune":
            if not hasattr(self, "_qat"):
                raise RuntimeError(
                    f"{self.type_name()} in a finetune stage is set up by session.prepare(), "
                    "which must run before initialize"
                )
            return
        self._resolve(session)
        self._input_range: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        self._input_hooks: list[torch.utils.hooks.RemovableHandle] = []

    def _resolve(self, session: LifecycleSession) -> dict[str, nn.Module]:
        """Find the targeted modules (and a named head), check them, assign each its scheme;
        returns the selected modules by full name."""
        layers_name, layers = find_decoder_layers(session.model)
        self._targets = select_in_layers(layers_name, layers, self.targets, self.ignore)
        self._head = self._named_head(session.model)
        selected = {**self.targeted_modules(), **self._head}
        if not selected:
            raise RecipeError(
                f"{self.type_name()}: targets {self.targets} (ignore {self.ignore}) select no "
                f"Linear module inside the decoder layers '{layers_name}'. Use 'Linear', module "
                "names like 'model.layers.0.mlp.down_proj', or 're:' regexes."
            )
        not_linear = [
            n for n, m in selected.items() if not isinstance(m, (nn.Linear, ExpertSlice))
        ]
        if not_linear:
            raise ReciPruneError(
                f"{self.type_name()}: compressed-tensors quantizes torch.nn.Linear modules, and "
                f"{not_linear[0]} is a {type(selected[not_linear[0]]).__name__}; add it to ignore"
            )
        self.check_targets(selected)
        self._assigned = self.assign_schemes(selected)
        if not self._assigned:
            raise RecipeError(
                f"{self.type_name()}: no targeted module matches the targets of any config group "
                f"({', '.join(self.schemes())})"
            )
        self._stored = self._stored_schemes()
        for name in self._head:
            if name in self._assigned and self._static_input(name):
                raise RecipeError(
                    f"{self.type_name()}: {name} comes after the decoder layers, where no "
                    "calibration inputs are observed, so it cannot take a static input scale; "
                    "use a weight-only or dynamic scheme for it"
                )
        position = next(i for i, m in enumerate(session.modifiers) if m is self)
        later = [m.type_name() for m in session.modifiers[position + 1 :] if isinstance(m, PruningModifier)]
        if later:
            raise RecipeError(
                f"{later[0]} comes after {self.type_name()} in its stage and would change the "
                "quantized weights; put the pruning modifier first"
            )
        return selected

    def _named_head(self, model: nn.Module) -> dict[str, nn.Module]:
        """The output head when a target is its exact name (never through a class or regex)."""
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            return {}
        name = next(n for n, m in model.named_modules() if m is head)
        if not set(self.targets) & {name, f"{name}.weight"} or resolve_targets(
            head, self.ignore, prefix=name
        ):
            return {}
        if self.algorithm == "gptq":
            raise RecipeError(
                f"{self.type_name()}: GPTQ needs the Hessian of {name}'s inputs, which the "
                "layer-by-layer calibration does not collect; quantize it with algorithm: rtn "
                "(in a stage of its own) or leave it out of targets"
            )
        embeddings = model.get_input_embeddings()
        if embeddings is not None and embeddings.weight is head.weight:
            raise ReciPruneError(
                f"{self.type_name()}: {name} shares its weight with the input embeddings "
                "(tie_word_embeddings), so quantizing it would quantize them too; leave it out "
                "of targets"
            )
        return {name: head}

    def _stored_schemes(self) -> dict[str, QuantizationScheme]:
        """Per group, the scheme written on its modules and into config.json: targets 'Linear'
        when one group covers every quantized module (the rest are listed in `ignore` by
        compressed-tensors), else the group's module names, so reloading is unambiguous."""
        groups: dict[str, list[str]] = {}
        for name, (group, _) in self._assigned.items():
            groups.setdefault(group, []).append(name)
        stored = {}
        for group, scheme in self.schemes().items():
            if group not in groups:
                continue
            targets = ["Linear"] if len(groups) == 1 else groups[group]
            actorder = self.algorithm == "gptq" and self.actorder
            stored[group] = stored_scheme(scheme, targets, actorder=actorder)
        return stored

    # quantization-aware training (finetune stages) -------------------------------------------
    def on_prepare(self, session: LifecycleSession) -> None:
        """Finetune: fix each targeted weight's scale and zero point from the weights the stage
        starts from, and make the module compute on fake-quantized values (`qat_linear`)."""
        self._check_training_stage(session)
        selected = self._resolve(session)
        stored = checkpoint_qparams(session.model, list(self._assigned))
        self._qat: dict[str, tuple[torch.Tensor, torch.Tensor, QuantizationScheme]] = {}
        for name, (group, _) in self._assigned.items():
            module = selected[name]
            scheme = self._stored[group]
            W = weight_matrix(module).detach()
            with torch.no_grad():
                scale, zero = observe_weight(W, scheme.weights, self.observer)
                adopted = stored_qparams_on_grid(W, stored.get(name), scale, zero, scheme.weights)
            if adopted is not None:
                scale, zero = adopted
            self._qat[name] = (scale, zero, scheme)
            module.forward = FakeQuantizedForward(module, scale, zero, scheme)
            session.records[name].update(
                quantization=describe_args(scheme.weights),
                input_quantization=describe_args(scheme.input_activations),
                quantization_algorithm="qat",
                observer="checkpoint" if adopted is not None else self.observer,
            )

    def _check_training_stage(self, session: LifecycleSession) -> None:
        """What a finetune stage cannot do with this modifier, as errors before training."""
        where = f"{self.type_name()} in a finetune stage"
        if self.algorithm == "gptq":
            raise RecipeError(
                f"{where} trains on fake-quantized weights and saves them rounded to the nearest "
                "grid point; GPTQ needs calibration Hessians. Use algorithm: rtn here, and put a "
                "GPTQ QuantizationModifier in a oneshot stage before it (its scales are kept)."
            )
        if self.static_inputs:
            raise RecipeError(
                f"{where}: static input scales (FP8, or dynamic: false) come from calibration, "
                "which a finetune stage does not run. Train with a dynamic input scheme "
                "(FP8_DYNAMIC, W8A8) or a weight-only one, or quantize statically in a oneshot "
                "stage after training."
            )
        if self.start is not None or self.end not in (None, -1):
            raise RecipeError(
                f"{where} fake-quantizes for the whole stage; remove start/end (split the "
                "training into two stages to quantize only the second part)."
            )
        adds = [m.type_name() for m in session.modifiers if m.adds_layer_parameters]
        if adds:
            raise RecipeError(self._beside_adapter.format(where, adds[0]))

    def export_model(self, model: nn.Module) -> None:
        """Finetune: round the trained weights of `model` (the plain model about to be saved)
        on the scales fixed at the start and attach the compressed-tensors layout, so it is
        saved quantized and computes what training computed."""
        from compressed_tensors.quantization import QuantizationStatus

        with torch.no_grad():
            for name, (scale, zero, scheme) in getattr(self, "_qat", {}).items():
                module = model.get_submodule(name)
                W = weight_matrix(module)
                scale, zero = scale.to(W.device), zero.to(W.device)
                Q = fake_quantize_weight(W.float(), scale, zero, scheme.weights).to(W.dtype)
                attach_quantization(module, scheme, Q, scale, zero)
                module.quantization_status = QuantizationStatus.FROZEN

    def on_finalize(self, session: LifecycleSession) -> None:
        for name in getattr(self, "_qat", {}):
            module = session.model.get_submodule(name)
            if isinstance(module.__dict__.get("forward"), FakeQuantizedForward):
                del module.forward  # back to nn.Linear.forward

    # wiring ----------------------------------------------------------------------------------
    def on_event(self, session: LifecycleSession, event: Event) -> None:
        if session.run_type == "finetune":
            return
        if event.type == EventType.CALIBRATION_END and self._head:
            for name, module in self._head.items():
                self.quantize_module(session, name, module)
            return
        if event.layer_index is None or event.layer_index not in self._targets:
            return
        modules = {n: m for n, m in self._targets[event.layer_index].items() if n in self._assigned}
        if event.type == EventType.LAYER_START:
            for name, module in modules.items():
                # GPTQ reads H = 2/n Σ XᵀX; RTN asks only for ‖X_j‖², so that the session can
                # measure the reconstruction error when calibration data is there anyway.
                session.statistics.track(module, hessian=self.algorithm == "gptq")
                if self._static_input(name):
                    self._input_hooks.append(
                        session.register_hook(self, module, self._observe_input, kind="forward_pre")
                    )
        elif event.type == EventType.LAYER_CALIBRATED:
            for handle in self._input_hooks:
                handle.remove()
            self._input_hooks.clear()
            reached = {n: m for n, m in modules.items() if session.statistics.reached(m)}
            solved = self._gptq(session, reached) if self.algorithm == "gptq" else {}
            for name, module in modules.items():
                self.quantize_module(session, name, module, solved.get(name))

    def _static_input(self, name: str) -> bool:
        if ".experts.slices." in name:  # stored dense: only their weights are quantized
            return False
        inputs = self._stored[self._assigned[name][0]].input_activations
        return inputs is not None and not inputs.dynamic

    @torch.no_grad()
    def _observe_input(self, module: nn.Module, args: tuple) -> None:
        lo, hi = torch.aminmax(args[0].detach().float())
        if module in self._input_range:
            old_lo, old_hi = self._input_range[module]
            lo, hi = torch.minimum(lo, old_lo), torch.maximum(hi, old_hi)
        self._input_range[module] = (lo, hi)

    @torch.no_grad()
    def quantize_module(
        self,
        session: LifecycleSession,
        name: str,
        module: nn.Module,
        gptq: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Attach the scheme's parameters to `module` (compressed-tensors' layout), set them
        from the observer or GPTQ (`gptq`: its (Q(W), scale, zero) when already solved with the
        module's layer) and the observed inputs, and replace W by Q(W)."""
        from compressed_tensors.quantization import QuantizationStatus

        scheme = self._stored[self._assigned[name][0]]
        W = weight_matrix(module).clone()
        unreached = isinstance(module, ExpertSlice) and not session.statistics.reached(module)
        if self.algorithm == "gptq" and not unreached:
            Q, scale, zero = gptq if gptq is not None else self._gptq(session, {name: module})[name]
        else:
            scale, zero = observe_weight(W, scheme.weights, self.observer)
            Q = fake_quantize_weight(W, scale, zero, scheme.weights)
        if isinstance(module, ExpertSlice):
            self._fake_quantize_expert(session, name, module, Q, unreached)
            return
        attach_quantization(module, scheme, Q, scale, zero)
        if self._static_input(name):
            if module not in self._input_range:
                raise ReciPruneError(
                    f"{self.type_name()}: no calibration input reached {name}, so its static "
                    "input scale is unknown; use a dynamic input scheme or check the data"
                )
            lo, hi = self._input_range.pop(module)
            set_static_input_qparams(module, lo, hi, scheme.input_activations)
        module.quantization_status = QuantizationStatus.FROZEN
        session.records[name].update(
            method=session.records[name].get("method", self.type_name()),
            quantization=describe_args(scheme.weights),
            input_quantization=describe_args(scheme.input_activations),
            quantization_algorithm=self.algorithm,
            observer=self.observer,
        )

    def _fake_quantize_expert(
        self, session: LifecycleSession, name: str, module: ExpertSlice, Q: torch.Tensor, unreached: bool
    ) -> None:
        """An expert of fused 3-D weights keeps its dtype holding Q(W): compressed-tensors packs
        nn.Linear weights only, and per-expert packed weights would not reload."""
        set_weight_matrix(module, Q)
        record = session.records[name]
        record.update(
            method=record.get("method", self.type_name()),
            quantization=describe_args(self._stored[self._assigned[name][0]].weights),
            quantization_algorithm="rtn" if unreached else self.algorithm,
            stored="dense fake-quantized (fused mixture-of-experts weight)",
        )
        if unreached:
            record["fallback"] = "rtn: no calibration token reached it"
        if not getattr(self, "_told_experts", False):
            self._told_experts = True
            print(
                f"note: {self.type_name()} stores the mixture-of-experts weights dense, holding "
                "their quantized values (compressed-tensors packs nn.Linear weights only)",
                file=sys.stderr,
            )

    @torch.no_grad()
    def _gptq(
        self, session: LifecycleSession, modules: dict[str, nn.Module]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """GPTQ on the layer Hessian with every zero of W held at zero: (Q(W), scale, zero) by
        name. Modules that read one input and share a config group, dtype and a grid per row
        (channel or group strategy) are solved together, with the same result as one by one."""
        from reciprune.algorithms.gptq import gptq_quantize_stacked

        name_of = {module: name for name, module in modules.items()}
        solves: dict[tuple, list[str]] = {}
        for index, shared in enumerate(session.statistics.shared_groups(modules.values())):
            for module in shared:
                name = name_of[module]
                group = self._assigned[name][0]
                per_row = enum_value(self._stored[group].weights.strategy) in ("channel", "group")
                key = (index, group, weight_matrix(module).dtype) if per_row else (name,)
                solves.setdefault(key, []).append(name)
        solved = {}
        for names in solves.values():
            args = self._stored[self._assigned[names[0]][0]].weights
            Ws = [weight_matrix(modules[name]) for name in names]
            results = gptq_quantize_stacked(
                Ws,
                session.statistics.hessian(modules[names[0]]),
                ObserverColumnQuantizer(args, self.observer, Ws[0].dtype),
                blocksize=self.block_size,
                percdamp=self.dampening_frac,
                actorder=self.actorder,
                group_size=args.group_size if enum_value(args.strategy) == "group" else None,
                keep_masks=[W != 0 for W in Ws],
            )
            for name, (Q, params) in zip(names, results, strict=True):
                solved[name] = (Q, params.scale, params.zero_point)
        return solved
