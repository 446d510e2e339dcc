"""A 4-bit (NF4) base for fine-tuning: the quant-residual initialisation of row deltas
(against a naive loop), and `reciprune finetune --load-in-4bit` end to end with LoRA,
RowSparse and SpIEL on a tiny Llama, including its bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reciprune.algorithms.nf4 import NF4_LEVELS, quant_residual, quantize_nf4
from reciprune.cli import main


def _naive_nf4(W: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """NF4(W) element by element: block absmax c, nearest level to w·(1/c), level · c."""
    flat = W.reshape(-1).float()
    out = torch.empty_like(flat)
    levels = torch.tensor(NF4_LEVELS)
    for start in range(0, flat.numel(), blocksize):
        block = flat[start : start + blocksize]
        c = block.abs().max()
        for i, w in enumerate(block):
            x = (w * (1.0 / c.clamp(min=1e-38))).clamp(-1, 1)
            out[start + i] = levels[int((x - levels).abs().argmin())] * c
    return out.reshape(W.shape)


def _naive_loop(W: torch.Tensor, rows: torch.Tensor, iters: int, dtype: torch.dtype):
    """Q_t = NF4(W − S_R ΔW_{t−1}), ΔW_t = dtype((W − Q_t)[R]); errors over the matrix and R."""
    delta = torch.zeros(rows.numel(), W.shape[1], dtype=dtype)
    errors, row_errors = [], []
    for t in range(iters):
        target = W.clone()
        target[rows] -= delta.float()
        Q = _naive_nf4(target)
        if t == 0:
            errors.append(float(torch.linalg.norm(W - Q)))
            row_errors.append(float(torch.linalg.norm((W - Q)[rows])))
        delta = (W - Q)[rows].to(dtype)
        approx = Q.clone()
        approx[rows] += delta.float()
        errors.append(float(torch.linalg.norm(W - approx)))
        row_errors.append(float(torch.linalg.norm((W - approx)[rows])))
    return errors, row_errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(24, 48), (16, 128)])  # blocks across rows / inside rows
def test_quant_residual_lowers_the_error_on_the_chosen_rows(shape, dtype):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(*shape, generator=g) * 0.05
    rows = torch.randperm(shape[0], generator=g)[: shape[0] // 4].sort().values
    result = quant_residual(W, rows, 3, delta_dtype=dtype)
    errors, row_errors = _naive_loop(W, rows, len(result.errors) - 1, dtype)
    assert result.errors == pytest.approx(errors, rel=1e-5, abs=1e-7)
    assert result.row_errors == pytest.approx(row_errors, rel=1e-4, abs=1e-6)
    plain = _naive_nf4(W)
    approx = result.Q.clone()
    approx[rows] += result.delta.float()
    row_error = float(torch.linalg.norm((W - approx)[rows]))
    assert row_error < float(torch.linalg.norm((W - plain)[rows])) * 0.01
    # The returned pair is the best iterate: never worse than one step, which beats plain NF4.
    whole = float(torch.linalg.norm(W - approx))
    assert whole == pytest.approx(min(errors[1:]), rel=1e-5)
    assert whole <= errors[1] < errors[0]
    best_so_far = [min(errors[: i + 1]) for i in range(len(errors))]
    assert best_so_far == sorted(best_so_far, reverse=True)
    assert result.delta.dtype == dtype and result.delta.shape == (rows.numel(), shape[1])


def test_blocks_inside_rows_and_a_float32_delta_reach_the_fixed_point_in_one_step():
    W = torch.randn(16, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    rows = torch.tensor([1, 5, 9])
    result = quant_residual(W, rows, 5)
    assert len(result.errors) == 3  # ΔW = 0, step 1, step 2 equal to step 1: stopped
    assert result.errors[1] == result.errors[2] and result.row_errors[1] == 0.0
    others = torch.ones(16, dtype=torch.bool)
    others[rows] = False
    plain = _naive_nf4(W)
    assert torch.equal(result.Q[others], plain[others])


def test_double_quant_residual_keeps_the_best_pair():
    W = torch.randn(96, 40, generator=torch.Generator().manual_seed(2)) * 0.05
    rows = torch.arange(0, 96, 4)
    result = quant_residual(W, rows, 5, quantize=lambda x: quantize_nf4(x, double_quant=True))
    approx = result.Q.clone()
    approx[rows] += result.delta
    assert float(torch.linalg.norm(W - approx)) == pytest.approx(min(result.errors[1:]), rel=1e-6)
    assert min(result.errors[1:]) < result.errors[0]


# --- end to end ---------------------------------------------------------------------------------
RECIPES = {
    "lora": "modifiers:\n  - {type: LoRAModifier, r: 4}\n",
    "rows": "modifiers:\n  - {type: RowSparseFinetuneModifier, finetuning_rank: 8, importance: "
    "l2, finetune_attn_as_linear: true}\n",
    "residual": "modifiers:\n  - {type: RowSparseFinetuneModifier, finetuning_rank: 8, "
    "importance: l2, finetune_attn_as_linear: true, init: quant_residual}\n",
    "spiel": "modifiers:\n  - {type: SparseDeltaModifier, density: 0.01, reselection_steps: 1, "
    "selection_accumulation_steps: 1}\n",
}
TRAINING = ["--max-steps", "2", "--per-device-train-batch-size", "4", "--eval-samples", "8",
            "--learning-rate", "1e-3", "--no-progress", "--no-eval-ppl"]  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    """A tiny Llama with large weights and text sampled from it: on its own samples the model
    is the best one in expectation, so a weight error shows as a higher held-out loss."""
    from conftest import TINY_LLAMA_CONFIG
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("nf4")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA_CONFIG, "initializer_range": 0.2}))
    model.eval().save_pretrained(root / "model")
    tiny_tokenizer.save_pretrained(root / "model")
    with torch.no_grad():
        sampled = model.generate(
            torch.zeros(40, 1, dtype=torch.long), do_sample=True, max_new_tokens=47,
            min_new_tokens=47, pad_token_id=1, generation_config=None,
        )  # fmt: skip
    rows = [json.dumps({"input_ids": ids}) for ids in sampled.tolist()]
    (root / "data.jsonl").write_text("\n".join(rows) + "\n")
    for name, text in RECIPES.items():
        (root / f"{name}.yaml").write_text(text)
    return {"root": root, "model": root / "model", "data": root / "data.jsonl"}


def _run(setup: dict[str, Path], recipe: str, out: str, *extra: str) -> int:
    return main([
        "finetune", "--recipe", str(setup["root"] / f"{recipe}.yaml"), "--model",
        str(setup["model"]), "--output-dir", str(setup["root"] / out), "--dataset",
        str(setup["data"]), "--data-format", "pretokenized", *TRAINING, *extra,
    ])  # fmt: skip


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "reciprune_manifest.json").read_text())


@pytest.mark.parametrize(
    ("recipe", "extra"),
    [
        ("lora", []),
        ("rows", []),
        ("spiel", ["--bnb-4bit-use-double-quant", "--quant-backend", "reciprune"]),
        ("residual", []),
    ],
)
def test_finetune_on_a_4bit_base_saves_a_plain_checkpoint(setup, recipe, extra):
    from transformers import LlamaForCausalLM

    out = setup["root"] / f"out_{recipe}"
    assert _run(setup, recipe, out.name, "--load-in-4bit", *extra) == 0
    manifest = _manifest(out)
    base = manifest["base_quantization"]
    assert base["modules"] == 14 and base["format"].startswith("nf4")
    assert base["double_quant"] == ("--bnb-4bit-use-double-quant" in extra)
    assert base["base_linear_bytes_nf4"] < base["base_linear_bytes_dense"] / 6
    assert manifest["training"]["load_in_4bit"] is True
    saved = load_file(str(out / "model.safetensors"))
    assert not [k for k in saved if "nf4" in k or "absmax" in k]
    model = LlamaForCausalLM.from_pretrained(out)  # a plain checkpoint
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.float32
    if recipe == "rows":
        # Rows that did not train are exactly the NF4 values of the starting weights.
        start = load_file(str(setup["model"] / "model.safetensors"))
        deltas = load_file(str(out / "row_sparse_deltas.safetensors"))
        for name in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"):
            W = start[f"{name}.weight"]
            changed = (saved[f"{name}.weight"] != _naive_nf4(W)).any(dim=1)
            chosen = torch.zeros(W.shape[0], dtype=torch.bool)
            chosen[deltas[f"{name}.row_index"]] = True
            assert changed.any() and not changed[~chosen].any(), name


def test_quant_residual_starts_with_a_lower_held_out_loss_than_the_4bit_base(setup):
    runs = {}
    for recipe in ("rows", "residual"):
        out = setup["root"] / f"loss_{recipe}"
        assert _run(setup, recipe, out.name, "--load-in-4bit", "--max-steps", "1") == 0
        runs[recipe] = _manifest(out)["metrics"]["eval_loss_before"]
    out = setup["root"] / "loss_dense"
    assert _run(setup, "rows", out.name, "--max-steps", "1") == 0
    dense = _manifest(out)["metrics"]["eval_loss_before"]
    assert dense < runs["residual"] < runs["rows"]


def test_bad_inputs_fail_with_a_clear_message(setup, capsys, monkeypatch):
    assert _run(setup, "residual", "bad1") == 2
    assert "quant_residual" in capsys.readouterr().err and not (setup["root"] / "bad1").exists()
    assert _run(setup, "rows", "bad2", "--quant-backend", "bitsandbytes") == 2
    assert "--load-in-4bit" in capsys.readouterr().err
    assert _run(setup, "rows", "bad3", "--load-in-4bit", "--nproc-per-node", "2") == 2
    assert "one process" in capsys.readouterr().err
    import reciprune.core.nf4_base as nf4_base

    monkeypatch.setattr(nf4_base, "_bitsandbytes_problem", lambda device: "it is not installed")
    args = ("--load-in-4bit", "--quant-backend", "bitsandbytes")
    assert _run(setup, "rows", "bad4", *args) == 2
    assert "4-bit base requested with no backend available" in capsys.readouterr().err
    assert not (setup["root"] / "bad4").exists()
