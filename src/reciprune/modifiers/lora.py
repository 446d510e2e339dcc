"""LoRAModifier: LoRA or DoRA adapters through PEFT, merged into the weights at the end."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import Field, field_validator
from torch import nn

from reciprune.algorithms.lora import lora_merge
from reciprune.core.layers import find_decoder_layers
from reciprune.core.targets import LINEAR_ALIAS, is_linear_like, stores_transposed
from reciprune.errors import ReciPruneError
from reciprune.modifiers.base import Modifier
from reciprune.modifiers.registry import register_modifier
from reciprune.modifiers.targeted import as_list, checked_patterns

if TYPE_CHECKING:
    from torch import Tensor

    from reciprune.core.session import LifecycleSession

#: PEFT's name for the one adapter this modifier injects (it appears in parameter names).
ADAPTER = "default"
#: Adapter weights saved beside the checkpoint, with PEFT's key names.
ADAPTER_FILE = "lora_adapter.safetensors"
#: PEFT's adapter_config.json under another name: a file called adapter_config.json beside
#: config.json makes transformers apply the adapter again on top of the merged weights.
ADAPTER_CONFIG_FILE = "lora_adapter_config.json"


@register_modifier
class LoRAModifier(Modifier):
    """Train low-rank adapters (LoRA, or DoRA with `use_dora`) on the targeted Linears of the decoder layers, base weights frozen; merged into the weights at the end.

    The adapters are PEFT's (`peft.inject_adapter_in_model`), injected in place so the model keeps
    its class: a targeted `q_proj` becomes a PEFT LoRA layer holding the frozen `q_proj.base_layer`
    and the trainable `q_proj.lora_A.default` (r × in, Kaiming-uniform) and `q_proj.lora_B.default`
    (out × r, zeros, so the model's outputs are unchanged at step 0); DoRA adds the magnitude vector
    `q_proj.lora_magnitude_vector.default` (initialised to the row norms of the weight). Every other
    parameter of the model is frozen. The forward adds s·B·A·x with s = alpha / r.

    At the end the adapters are merged in the saved state dict (W = W0 + s·B·A; DoRA:
    W = m / ‖W0 + s·B·A‖_row · (W0 + s·B·A)), so the checkpoint is the plain architecture. The
    adapters alone are saved as `lora_adapter.safetensors` (PEFT's key names) with PEFT's adapter
    config as `lora_adapter_config.json`: renamed to adapter_model.safetensors and
    adapter_config.json in a folder of their own, `PeftModel.from_pretrained(base, folder)` loads
    them on the starting model. Merging fills the zeros of a sparse base model.
    """

    r: int = Field(8, gt=0, description="Rank r of each adapter (A is r × in, B is out × r).")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha: the adapter output is scaled by "
                         "alpha / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input "
                           "during training (PEFT's lora_dropout).")
    targets: list[str] = Field(
        default_factory=lambda: [LINEAR_ALIAS],
        description="Linears inside the decoder layers to adapt: 'Linear' (all of them, the "
        "default), module-name suffixes ('q_proj', 'self_attn.v_proj') or 're:' regexes matched "
        "from the start of full names ('re:.*\\.mlp\\.').",
    )
    use_dora: bool = Field(False, description="DoRA (Liu et al. 2024): also train a magnitude "
                           "vector per output row of each adapted weight.")
    seed: int = Field(0, description="Seed of the adapters' initialisation (lora_A), so every "
                      "process and a resumed run start from the same adapters.")

    run_types: ClassVar[tuple[str, ...]] = ("finetune",)
    paper: ClassVar[str] = (
        "Hu et al., 'LoRA: Low-Rank Adaptation of Large Language Models', ICLR 2022; Liu et al., "
        "'DoRA: Weight-Decomposed Low-Rank Adaptation', ICML 2024; through Hugging Face PEFT"
    )
    #: Adds trainable parameters inside the decoder layers (what ISTModifier schedules).
    adds_layer_parameters: ClassVar[bool] = True
    freezes_base: ClassVar[bool] = True

    _targets_as_list = field_validator("targets", mode="before")(as_list)

    @field_validator("targets")
    @classmethod
    def _check_targets(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("targets is empty: leave it unset to adapt every Linear of the "
                             "decoder layers, or name modules like 'q_proj'")
        return checked_patterns(value)

    # wiring ----------------------------------------------------------------------------------
    def resolve(self, model: nn.Module) -> dict[str, bool]:
        """Full names of the Linear-like modules inside the decoder layers that `targets` select,
        each with whether its weight is stored transposed (GPT-2's Conv1D)."""
        layers_name, layers = find_decoder_layers(model)
        found: dict[str, bool] = {}
        for index, layer in enumerate(layers):
            for name, module in layer.named_modules():
                full = f"{layers_name}.{index}.{name}"
                selected = any(self._matches(t, full) for t in self.targets)
                if name and is_linear_like(module) and selected:
                    found[full] = stores_transposed(module)
        if not found:
            linears = (n for n, m in layers[0].named_modules() if n and is_linear_like(m))
            raise ReciPruneError(
                f"{self.type_name()}: targets {self.targets} select no Linear module inside the "
                f"decoder layers '{layers_name}' of {type(model).__name__}. Use 'Linear', "
                f"suffixes of module names such as 'q_proj' or 'mlp.down_proj' (e.g. "
                f"'{next(linears, 'q_proj')}'), or 're:' regexes."
            )
        if len(set(found.values())) > 1:
            raise ReciPruneError(
                f"{self.type_name()}: the targets mix nn.Linear and Conv1D modules, which PEFT "
                "cannot adapt with one setting; target one kind only."
            )
        return found

    @staticmethod
    def _matches(target: str, name: str) -> bool:
        if target == LINEAR_ALIAS:
            return True
        if target.startswith("re:"):
            return re.match(target[3:], name) is not None
        return name == target or name.endswith("." + target)

    def lora_config(self) -> Any:
        """PEFT's LoraConfig for the resolved modules (full names, matched exactly by PEFT)."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=sorted(self._modules),
            use_dora=self.use_dora,
            fan_in_fan_out=any(self._modules.values()),  # resolve() admits one layout only
            bias="none",
        )

    def on_prepare(self, session: LifecycleSession) -> None:
        from peft import inject_adapter_in_model

        model = session.model
        self._modules = self.resolve(model)
        config = self.lora_config()
        # PEFT draws lora_A from the global generator: a fixed seed gives every process (and a
        # resumed run) the same adapters whatever ran before.
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            inject_adapter_in_model(config, model, adapter_name=ADAPTER)
        adapter = {f"{name}.{part}.{ADAPTER}.weight" for name in self._modules for part in
                   self._parts()}
        names = {name for name, _ in model.named_parameters()}
        missing = sorted(adapter - names)
        if missing:
            raise ReciPruneError(
                f"{self.type_name()}: PEFT did not create the expected adapter parameters "
                f"{missing[:3]}; this PEFT version names them differently. Please report it "
                "with `pip show peft`."
            )
        for name, param in model.named_parameters():
            param.requires_grad_(name in adapter)

    def _parts(self) -> tuple[str, ...]:
        parts = ("lora_A", "lora_B")
        return (*parts, "lora_magnitude_vector") if self.use_dora else parts

    # export ----------------------------------------------------------------------------------
    def _adapter_tensors(self, state: dict[str, Tensor], name: str) -> dict[str, Tensor]:
        keys = {part: f"{name}.{part}.{ADAPTER}.weight" for part in self._parts()}
        keys["base_layer"] = f"{name}.base_layer.weight"
        missing = [k for k in keys.values() if k not in state]
        if missing:
            raise ReciPruneError(
                f"{self.type_name()}: the trained state dict lacks {missing[:3]}, so the adapter "
                f"of '{name}' cannot be merged. This is a bug; please report it with the recipe."
            )
        return {part: state[key] for part, key in keys.items()}

    def export_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        state = dict(state)
        for name, transposed in self._modules.items():
            t = self._adapter_tensors(state, name)
            state[f"{name}.weight"] = lora_merge(
                t["base_layer"], t["lora_A"], t["lora_B"], self.alpha / self.r,
                t.get("lora_magnitude_vector"), transposed=transposed,
            )  # fmt: skip
            del state[f"{name}.base_layer.weight"]
            for key in [k for k in state if k.startswith(f"{name}.")]:
                if key.startswith(f"{name}.base_layer."):  # e.g. the bias: its plain name back
                    state[f"{name}.{key[len(name) + len('.base_layer.'):]}"] = state.pop(key)
                elif key != f"{name}.weight":  # the adapter's own tensors
                    del state[key]
        return state

    def export_files(self, state: dict[str, Tensor]) -> dict[str, bytes]:
        from safetensors.torch import save

        tensors: dict[str, Tensor] = {}
        for name in self._modules:
            t = self._adapter_tensors(state, name)
            # PEFT's save_pretrained names: the model under base_model.model., no adapter name,
            # and the DoRA magnitude without '.weight'.
            prefix = f"base_model.model.{name}"
            for part in self._parts():
                suffix = "" if part == "lora_magnitude_vector" else ".weight"
                tensors[f"{prefix}.{part}{suffix}"] = t[part].contiguous()
        config = self.lora_config()
        config.inference_mode = True
        config.task_type = "CAUSAL_LM"
        as_dict = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
        return {
            ADAPTER_FILE: save(tensors, metadata={"format": "pt"}),
            ADAPTER_CONFIG_FILE: json.dumps(as_dict, indent=2, default=str).encode("utf-8"),
        }
