"""RowSparseFinetuneModifier: fine-tune only the most important output rows of each Linear."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator, model_validator
from torch import nn

from reciprune.algorithms.nf4 import quant_residual
from reciprune.algorithms.row_importance import (
    add_row_delta,
    base_zero_mask,
    l2_row_scores,
    magnitude_row_scores,
    merge_row_delta,
    rows_to_finetune,
    taylor_row_scores,
    top_rows,
    zo_gradient,
    zo_projected_gradients,
)
from reciprune.core import distributed as D
from reciprune.core.layers import eval_mode
from reciprune.core.targets import as_matrix, weight_matrix
from reciprune.errors import RecipeError, ReciPruneError
from reciprune.modifiers.constant import keeps_base_zeros
from reciprune.modifiers.registry import register_modifier
from reciprune.modifiers.targeted import DeltaModifier

if TYPE_CHECKING:
    from reciprune.core.session import LifecycleSession

#: Names the modifier registers on each targeted module (removed again by `export_state`).
DELTA, ROWS = "row_delta", "row_index"
#: The file `export_files` writes beside the checkpoint.
DELTAS_FILE = "row_sparse_deltas.safetensors"
#: Last name components of query/key/value projections (separate or fused), left out unless
#: `finetune_attn_as_linear` (the reference's `--finetune_attn_as_linear`).
_QKV = ("q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "c_attn", "Wqkv")
# The reference's command-line spellings, by field.
_ALIASES = {
    "importance": {"ZOtaylor": "zo_taylor", "l1": "magnitude"},
    "param_dtype": {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"},
}


@register_modifier
class RowSparseFinetuneModifier(DeltaModifier):
    """Fine-tune only the most important output rows of each targeted Linear, through a trainable row delta (row-sparse fine-tuning).

    Before training, every targeted Linear's output rows (neurons) are scored on the first
    optimizer step's batches with `importance`, and the top r rows kept: I_i = Σ_j |W_ij g_ij|
    with g a zeroth-order (SPSA/MeZO) gradient estimate from forward passes only (`zo_taylor`)
    or the exact gradient (`taylor`), or the row's L2 norm or L1 magnitude. All base weights
    are frozen; each targeted module gets a trainable `row_delta` ΔW ∈ R^{r×d_in} and a
    `row_index` buffer R, and computes h = Wx + S_R(ΔW · dropout(x)). At export W[R] += ΔW is
    merged into a plain checkpoint, and the deltas are saved on their own in
    row_sparse_deltas.safetensors. With `mask_base_zeros`, ΔW is masked by W[R] ≠ 0 in the
    forward pass and the merge, so a sparse base stays exactly as sparse.

    With a 4-bit base (`load_in_4bit`), `init: quant_residual` starts ΔW from the base's
    quantization error instead of zeros (LoftQ-style, Li et al. 2024): after the rows are
    chosen on the full-precision weights, each module alternates Q = NF4(W − S_R ΔW) and
    ΔW = (W − Q)[R] (`residual_iters` times, keeping the best pair), its frozen weight becomes
    Q and ΔW starts from the residual, so the chosen rows start at W's values and only the other
    rows carry the 4-bit error (see `reciprune.algorithms.nf4.quant_residual`).

    The LM head, embeddings and norms are never targets (only Linears inside decoder layers
    are); query/key/value projections only with `finetune_attn_as_linear`. The reference
    spreads its ZO perturbations over separate slices of the training data; here every
    estimate is measured on the same (first optimizer step's) batches. Biases stay frozen.
    """

    importance: Literal["zo_taylor", "taylor", "l2", "magnitude"] = Field(
        "zo_taylor",
        description="Row score: zo_taylor Σ_j|W_ij ĝ_ij| (forward-only gradient estimate), "
        "taylor (exact gradient, one backward), l2 ‖W_i‖₂, magnitude Σ_j|W_ij|.",
    )
    n_estimate: int = Field(8, ge=1, description="ZO estimates n (2 forward passes each).")
    zo_eps: float = Field(1e-3, gt=0.0, description="ZO perturbation size ε.")
    finetuning_rank: int | None = Field(
        None, ge=1, description="Rows r to fine-tune in every targeted module."
    )
    finetuning_ratio: float | None = Field(
        None, gt=0.0, le=1.0, description="Fraction of each module's rows to fine-tune (⌊ratio·rows⌋, at least 1)."
    )
    clamp_rank: bool = Field(
        False,
        description="Train all rows of modules with fewer than finetuning_rank rows (the "
        "reference's behaviour) instead of failing.",
    )
    finetune_attn_as_linear: bool = Field(
        False, description="Also fine-tune the query/key/value projections."
    )
    p_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Dropout on the input of the delta path in training."
    )
    param_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Storage dtype of the trainable deltas."
    )
    init: Literal["zeros", "kaiming", "quant_residual"] = Field(
        "zeros",
        description="ΔW at step 0: zeros keeps the model's function; kaiming (uniform, "
        "a=√5) is the reference's choice; quant_residual (needs a 4-bit base, load_in_4bit) "
        "alternates Q = NF4(W − S_R ΔW), ΔW = (W − Q)[R] so that the NF4 base plus ΔW "
        "matches W on the chosen rows (LoftQ-style).",
    )
    residual_iters: int = Field(
        5, ge=1, description="init quant_residual: alternations of NF4 and the row residual."
    )
    mask_base_zeros: bool | None = Field(
        None,
        description="Mask ΔW where the base weight is zero, so its zeros stay zero; unset: on "
        "when the stage has a ConstantPruningModifier.",
    )
    seed: int = Field(0, description="Seed of the ZO perturbations and of the kaiming init.")

    example_fields: ClassVar[dict[str, Any]] = {"finetuning_rank": 16}
    paper: ClassVar[str] = (
        "Li & Bhaskara, 'An Efficient Sparse Fine-Tuning with Low Quantization Error via Neural "
        "Network Pruning' (OpenReview w3b67v5EzD, arXiv 2502.11439)"
    )

    # validation ------------------------------------------------------------------------------
    @field_validator("importance", "param_dtype", mode="before")
    @classmethod
    def _reference_spelling(cls, value: Any, info: ValidationInfo) -> Any:
        return _ALIASES[info.field_name].get(value, value) if isinstance(value, str) else value

    @property
    def needs_4bit_base(self) -> bool:
        """Whether the stage must run with a 4-bit base (`init: quant_residual`)."""
        return self.init == "quant_residual"

    def missing_4bit_base(self) -> ReciPruneError:
        """The error for `init: quant_residual` in a run without a 4-bit base."""
        return ReciPruneError(
            f"{self.type_name()} with init: quant_residual fits its deltas to the error of a "
            "4-bit base, and this run has none. Pass --load-in-4bit (or set 'load_in_4bit: "
            "true' under the stage's 'training:'), or use init: zeros."
        )

    @model_validator(mode="after")
    def _rank_or_ratio(self) -> RowSparseFinetuneModifier:
        if (self.finetuning_rank is None) == (self.finetuning_ratio is None):
            given = "both" if self.finetuning_rank is not None else "neither"
            raise ValueError(
                f"{given} of finetuning_rank and finetuning_ratio is set: give exactly one, "
                "e.g. 'finetuning_rank: 64' (rows per module, the paper's setting) or "
                "'finetuning_ratio: 0.02' (a fraction of each module's rows)"
            )
        return self

    # wiring ----------------------------------------------------------------------------------
    def on_prepare(self, session: LifecycleSession) -> None:
        super().on_prepare(session)
        self._modules = self._finetuned_modules()
        counts = {name: self._row_count(name, module) for name, module in self._modules.items()}
        self._mask = keeps_base_zeros(self.mask_base_zeros, session)
        backend = self._residual_backend(session)
        scores = self._scores(session)
        for index, (name, module) in enumerate(self._modules.items()):
            rows = _same_on_every_process(top_rows(scores[name], counts[name]))
            delta = None
            if backend is not None:
                delta = self._quant_residual(session, name, module, rows, backend)
            self._add_delta(session, module, rows, index, delta)
            session.records[name].update(
                method=self.type_name(),
                importance=self.importance,
                finetuned_rows=counts[name],
                rows=int(weight_matrix(module).shape[0]),
                mask_base_zeros=self._mask,
            )

    def _residual_backend(self, session: LifecycleSession) -> Any:
        if self.init != "quant_residual":
            return None
        backend = session.training.base_quantization
        if backend is None:
            raise self.missing_4bit_base()
        conv1d = [n for n, m in self._modules.items() if not isinstance(m, nn.Linear)]
        if conv1d:
            raise ReciPruneError(
                f"{self.type_name()}: init quant_residual needs nn.Linear modules (the 4-bit "
                f"base stores those), and {conv1d[0]} is a {type(self._modules[conv1d[0]]).__name__}. "
                "Use init: zeros for this model."
            )
        return backend

    def _quant_residual(
        self, session: LifecycleSession, name: str, module: nn.Module, rows: torch.Tensor,
        backend: Any,
    ) -> torch.Tensor:
        """Store `module`'s weight as the quant-residual Q (NF4) and return ΔW to start from."""
        from reciprune.core.nf4_base import quantize_linear

        result = quant_residual(
            module.weight.detach(), rows, self.residual_iters,
            delta_dtype=getattr(torch, self.param_dtype),
            quantize=backend.quantize, dequantize=backend.dequantize,
        )  # fmt: skip
        quantize_linear(module, backend, result.q)
        session.records[name].update(
            quant_residual_error_nf4=result.errors[0],
            quant_residual_error=min(result.errors[1:]),
            quant_residual_row_error_nf4=result.row_errors[0],
            quant_residual_iterations=len(result.errors) - 1,
        )
        return result.delta

    def _finetuned_modules(self) -> dict[str, nn.Module]:
        modules = {
            name: module
            for name, module in self.targeted_modules().items()
            if self.finetune_attn_as_linear or name.rsplit(".", 1)[-1] not in _QKV
        }
        if not modules:
            raise RecipeError(
                f"{self.type_name()}: targets {self.targets} select only query/key/value "
                "projections, which are left out unless finetune_attn_as_linear is true. Set "
                "it, or target other Linears (e.g. 'Linear' for all of them)."
            )
        for name, module in modules.items():
            if hasattr(module, DELTA):
                raise ReciPruneError(
                    f"{self.type_name()}: {name} already has a '{DELTA}' (two row-sparse "
                    "modifiers target it). Give each module to one modifier with targets/ignore."
                )
        return modules

    def _row_count(self, name: str, module: nn.Module) -> int:
        d_out = int(weight_matrix(module).shape[0])
        rank = self.finetuning_rank
        if rank is not None and rank > d_out:
            if self.clamp_rank:
                return d_out
            raise RecipeError(
                f"{self.type_name()}: finetuning_rank {rank} is larger than the {d_out} output "
                f"rows of {name}. Lower finetuning_rank (at most {d_out} here), use "
                "finetuning_ratio, leave the module out with `ignore`, or set clamp_rank: true "
                "to train every row of such modules."
            )
        return rows_to_finetune(d_out, rank=rank, ratio=self.finetuning_ratio)

    def _scores(self, session: LifecycleSession) -> dict[str, torch.Tensor]:
        """Row importance of every fine-tuned module, by name (float32 [d_out])."""
        if self.importance in ("l2", "magnitude"):
            score = l2_row_scores if self.importance == "l2" else magnitude_row_scores
            return {n: score(weight_matrix(m)) for n, m in self._modules.items()}
        batches, loss = session.training.sample_batches, session.training.loss
        if not batches or loss is None:
            raise ReciPruneError(
                f"{self.type_name()} with importance '{self.importance}' scores rows on training "
                "batches, and the session has none (session.training.sample_batches / session.training.loss are "
                "set by `reciprune finetune`). Use importance l2 or magnitude, or run it in a "
                "finetune stage."
            )
        # Eval mode: the two ZO losses must differ only by the perturbation (no dropout).
        with eval_mode(session.model):
            if self.importance == "zo_taylor":
                return self._zo_taylor_scores(batches, loss)
            return self._taylor_scores(batches, loss)

    def _zo_taylor_scores(self, batches: list, loss: Any) -> dict[str, torch.Tensor]:
        projected = zo_projected_gradients(
            [m.weight for m in self._modules.values()],
            lambda: sum(float(loss(batch)) for batch in batches) / len(batches),
            n_estimate=self.n_estimate,
            eps=self.zo_eps,
            seed=self.seed,
        )
        scores = {}
        for index, (name, module) in enumerate(self._modules.items()):
            # ĝ is rebuilt one module at a time: only one weight-sized estimate in memory.
            g = zo_gradient(module.weight, index, projected, seed=self.seed)
            scores[name] = taylor_row_scores(weight_matrix(module), as_matrix(module, g))
        return scores

    def _taylor_scores(self, batches: list, loss: Any) -> dict[str, torch.Tensor]:
        weights = [m.weight for m in self._modules.values()]
        for weight in weights:
            weight.requires_grad_(True)
        try:
            for batch in batches:
                (loss(batch) / len(batches)).backward()
            return {
                name: taylor_row_scores(weight_matrix(module), as_matrix(module, module.weight.grad))
                for name, module in self._modules.items()
            }
        finally:
            for weight in weights:
                weight.grad = None
                weight.requires_grad_(False)

    def _add_delta(
        self, session: LifecycleSession, module: nn.Module, rows: torch.Tensor, index: int,
        initial: torch.Tensor | None = None,
    ) -> None:
        weight = module.weight
        d_in = int(weight_matrix(module).shape[1])
        delta = torch.zeros(
            rows.numel(), d_in, dtype=getattr(torch, self.param_dtype), device=weight.device
        )
        if initial is not None:
            delta.copy_(initial)
        elif self.init == "kaiming":
            generator = torch.Generator(device=weight.device).manual_seed(self.seed + index)
            nn.init.kaiming_uniform_(delta, a=math.sqrt(5), generator=generator)
        module.register_parameter(DELTA, nn.Parameter(delta))
        module.register_buffer(ROWS, rows.to(weight.device))
        session.register_hook(self, module, self._forward_hook)

    def _forward_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        if self.p_dropout and module.training:
            x = F.dropout(x, self.p_dropout, training=True)
        rows, delta = getattr(module, ROWS), getattr(module, DELTA)
        if self._mask:
            delta = delta * base_zero_mask(weight_matrix(module), rows)
        return add_row_delta(output, x, delta, rows)

    # export ----------------------------------------------------------------------------------
    def _effective_deltas(
        self, state: dict[str, torch.Tensor]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(W as [out, in]; ΔW as applied, i.e. masked when masking is on; R) of each module."""
        out = {}
        for name, module in self._modules.items():
            weight = as_matrix(module, state[f"{name}.weight"])
            delta, rows = state[f"{name}.{DELTA}"], state[f"{name}.{ROWS}"].long()
            if self._mask:
                delta = delta * base_zero_mask(weight, rows)
            out[name] = (weight, delta, rows)
        return out

    def export_files(self, state: dict[str, torch.Tensor]) -> dict[str, bytes]:
        from safetensors.torch import save

        tensors = {}
        for name, (_, delta, rows) in self._effective_deltas(state).items():
            tensors[f"{name}.{DELTA}"] = delta.detach().cpu().contiguous()
            tensors[f"{name}.{ROWS}"] = rows.detach().cpu().contiguous()
        metadata = {"format": "row_sparse", "merge": "W[row_index] += row_delta"}
        return {DELTAS_FILE: save(tensors, metadata=metadata)}

    def export_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        deltas = self._effective_deltas(state)
        state = dict(state)
        for name, (weight, delta, rows) in deltas.items():
            merged = merge_row_delta(weight, delta, rows)
            state[f"{name}.weight"] = as_matrix(self._modules[name], merged).contiguous()
            del state[f"{name}.{DELTA}"], state[f"{name}.{ROWS}"]
        return state


def _same_on_every_process(rows: torch.Tensor) -> torch.Tensor:
    """Rank 0's rows on every process: the scores are computed everywhere on the same batches,
    and an FSDP-sharded delta must mean the same rows on every process."""
    if not D.is_distributed():
        return rows
    mine = rows if D.is_main_process() else torch.zeros_like(rows)
    return D.all_reduce_sum(mine).to(rows.dtype)
