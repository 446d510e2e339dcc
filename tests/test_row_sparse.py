"""Row-sparse fine-tuning: row scores against naive loops, the ZO estimate against the exact
gradient, the modifier driven by hand (function kept at step 0, merge, sparse base), bad
inputs, and `reciprune finetune` end to end on 1 and 2 (FSDP2) processes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, load_file
from torch import nn

from reciprune.algorithms.row_importance import (
    add_row_delta,
    l2_row_scores,
    magnitude_row_scores,
    merge_row_delta,
    perturbation,
    rows_to_finetune,
    taylor_row_scores,
    top_rows,
    zo_projected_gradients,
    zo_taylor_gradient,
)
from reciprune.core.session import LifecycleSession, TrainingContext
from reciprune.errors import RecipeError, ReciPruneError
from reciprune.modifiers import ConstantPruningModifier, RowSparseFinetuneModifier
from reciprune.modifiers.row_sparse import DELTAS_FILE
from reciprune.pipelines.finetune import causal_lm_loss
from reciprune.recipe import load_recipe

QKV = ("q_proj", "k_proj", "v_proj")


# --- naive references ----------------------------------------------------------------------------
def naive_taylor(W, g):
    return [sum(abs(W[i, j].item() * g[i, j].item()) for j in range(W.shape[1])) for i in range(W.shape[0])]


def naive_l2(W):
    return [sum(W[i, j].item() ** 2 for j in range(W.shape[1])) ** 0.5 for i in range(W.shape[0])]


def naive_magnitude(W):
    return [sum(abs(W[i, j].item()) for j in range(W.shape[1])) for i in range(W.shape[0])]


def naive_top_rows(scores, r):
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(ranked[:r])


def _overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    return len(set(a.tolist()) & set(b.tolist())) / a.numel()


# --- algorithms ----------------------------------------------------------------------------------
def test_row_scores_and_top_rows_match_naive_loops():
    g = torch.Generator().manual_seed(0)
    W, grad = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    for fast, slow in (
        (taylor_row_scores(W, grad), naive_taylor(W, grad)),
        (l2_row_scores(W), naive_l2(W)),
        (magnitude_row_scores(W), naive_magnitude(W)),
    ):
        assert fast.shape == (7,)
        assert fast.tolist() == pytest.approx(slow, rel=1e-5)
        for r in (1, 3, 7):
            assert top_rows(fast, r).tolist() == naive_top_rows(fast.tolist(), r)
    tied = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0])
    assert top_rows(tied, 2).tolist() == [1, 2]  # ties: the lower index wins
    with pytest.raises(ValueError, match="cannot choose 6 rows out of 5"):
        top_rows(tied, 6)
    assert rows_to_finetune(4096, rank=64) == 64
    assert rows_to_finetune(4096, ratio=0.024) == 98  # ⌊0.024 · 4096⌋
    assert rows_to_finetune(16, ratio=0.01) == 1


def test_row_delta_forward_and_merge_match_naive_loops():
    g = torch.Generator().manual_seed(1)
    W, x = torch.randn(6, 4, generator=g), torch.randn(3, 4, generator=g)
    delta, rows = torch.randn(2, 4, generator=g), torch.tensor([1, 4])
    h = add_row_delta(x @ W.T, x, delta, rows)
    merged = merge_row_delta(W, delta, rows)
    for b in range(3):
        for i in range(6):
            expected = sum(W[i, j].item() * x[b, j].item() for j in range(4))
            if i in rows.tolist():
                k = rows.tolist().index(i)
                expected += sum(delta[k, j].item() * x[b, j].item() for j in range(4))
            assert h[b, i].item() == pytest.approx(expected, abs=1e-5)
    for i in range(6):
        for j in range(4):
            add = delta[rows.tolist().index(i), j].item() if i in rows.tolist() else 0.0
            assert merged[i, j].item() == pytest.approx(W[i, j].item() + add, abs=1e-6)


def test_zo_gradient_is_the_mean_of_projected_gradients_times_perturbations():
    """For L(θ) = Σ a ⊙ θ: p_k = (L(θ+εz) − L(θ−εz)) / 2ε and z_k recovered from the perturbed
    weights the closure saw; ĝ must be (1/n) Σ p_k z_k, computed here with plain loops."""
    g = torch.Generator().manual_seed(2)
    weights = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    a = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    originals = [w.clone() for w in weights]
    seen = []

    def loss():
        seen.append([w.clone() for w in weights])
        return sum(float((ai * w).sum()) for ai, w in zip(a, weights, strict=True))

    n, eps = 5, 1e-3
    estimate = zo_taylor_gradient(weights, loss, n_estimate=n, eps=eps, seed=7)
    assert len(seen) == 2 * n  # two forward passes per estimate
    for t, (w0, est) in enumerate(zip(originals, estimate, strict=True)):
        naive = torch.zeros_like(w0)
        for k in range(n):
            plus, minus = seen[2 * k][t], seen[2 * k + 1][t]
            z = (plus - w0) / eps
            assert torch.allclose((w0 - minus) / eps, z, atol=1e-6)  # θ − εz with the same z
            p_k = (loss_value(a, seen[2 * k]) - loss_value(a, seen[2 * k + 1])) / (2 * eps)
            for i in range(3):
                for j in range(4):
                    naive[i, j] += p_k * z[i, j].item() / n
        torch.testing.assert_close(est.double(), naive, rtol=1e-4, atol=1e-5)


def loss_value(a, weights):
    return sum(float((ai * w).sum()) for ai, w in zip(a, weights, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_are_perturbed_by_eps_z_and_restored_bit_exactly(dtype):
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(16, 8, generator=g).to(dtype), torch.randn(5, 3, generator=g).to(dtype)]
    originals = [w.clone() for w in weights]
    eps, seed, seen = 1e-2, 11, []

    def loss():
        seen.append([w.clone() for w in weights])
        return float(sum(w.float().pow(2).sum() for w in weights))

    zo_projected_gradients(weights, loss, n_estimate=3, eps=eps, seed=seed)
    for w, w0 in zip(weights, originals, strict=True):
        assert torch.equal(w, w0)
    for k in range(3):
        for sign, state in ((1, seen[2 * k]), (-1, seen[2 * k + 1])):
            for i, (w0, w) in enumerate(zip(originals, state, strict=True)):
                z = perturbation(w0, seed, k, i)
                assert torch.equal(w, (w0.float() + (sign * eps) * z).to(dtype))
    # The property is not free: undoing the perturbation arithmetically loses bits.
    z = perturbation(originals[0], seed, 0, 0)
    undone = ((originals[0].float() + eps * z).to(dtype).float() - eps * z).to(dtype)
    assert not torch.equal(undone, originals[0])


def test_weights_are_restored_when_the_loss_fails():
    w = torch.randn(4, 4)
    w0 = w.clone()
    calls = []

    def loss():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return 0.0

    with pytest.raises(RuntimeError, match="out of memory"):
        zo_projected_gradients([w], loss, n_estimate=2)
    assert torch.equal(w, w0)


def test_zo_taylor_ranking_overlaps_the_exact_taylor_ranking():
    """Seed 0, a 8→20→10 MLP whose second layer weighs the 20 hidden neurons by factors 0.1..10
    (so row importance is set by the gradient, not by |W|), one fixed batch of 64, ε = 1e-3:
    with n_estimate = 2048 (≈ 13× the 160 perturbed weights) the top-5 rows of ZO-Taylor overlap
    the exact Taylor top-5 by ≥ 80%, while 8 estimates, or plain magnitude, do not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 20), nn.Tanh(), nn.Linear(20, 10)).double()
    with torch.no_grad():
        model[2].weight.mul_(torch.logspace(-1, 1, 20, dtype=torch.float64)[torch.randperm(20)])
    x, y = torch.randn(64, 8, dtype=torch.float64), torch.randint(0, 10, (64,))

    def loss():
        return nn.functional.cross_entropy(model(x), y)

    W = model[0].weight
    loss().backward()
    exact = top_rows(taylor_row_scores(W, W.grad), 5)
    (estimate,) = zo_taylor_gradient([W], loss, n_estimate=2048, eps=1e-3, seed=0)
    cosine = nn.functional.cosine_similarity(estimate.flatten().double(), W.grad.flatten(), dim=0)
    assert cosine > 0.9
    assert _overlap(top_rows(taylor_row_scores(W, estimate), 5), exact) >= 0.8
    (few,) = zo_taylor_gradient([W], loss, n_estimate=8, eps=1e-3, seed=0)
    assert _overlap(top_rows(taylor_row_scores(W, few), 5), exact) < 0.8
    assert _overlap(top_rows(magnitude_row_scores(W), 5), exact) < 0.8


# --- the modifier, driven as `reciprune finetune` drives it -------------------------------------
def _batches(n=2, vocab=320, B=2, T=12):
    out = []
    for seed in range(n):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(2, vocab, (B, T), generator=g)
        mask = torch.ones(B, T, dtype=torch.long)
        mask[1, 9:] = 0
        ids[mask == 0] = 1
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def _prepared(model, *modifiers, batches=None):
    context = TrainingContext(
        loss=lambda batch: causal_lm_loss(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
            batch["labels"],
        )[0],
        sample_batches=_batches() if batches is None else batches,
    )
    session = LifecycleSession(
        model, list(modifiers), run_type="finetune", total_steps=4, training=context
    )
    session.prepare()
    session.initialize()
    return session


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("importance", ["zo_taylor", "taylor", "l2", "magnitude"])
def test_zero_init_keeps_the_function_and_only_the_deltas_train(tiny_llama, importance):
    model = tiny_llama()
    batch = _batches(3)[2]
    before = _logits(model, batch)
    modifier = RowSparseFinetuneModifier(importance=importance, finetuning_rank=5, n_estimate=2)
    session = _prepared(model, modifier)
    assert torch.equal(_logits(model, batch), before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    targeted = {n for n in _linears(model) if ".layers." in n and n.rsplit(".", 1)[-1] not in QKV}
    assert trainable == {f"{n}.row_delta" for n in targeted}
    assert len(targeted) == 2 * 4  # o, gate, up, down in each of 2 layers; no q/k/v, no lm_head
    for name in targeted:
        module = model.get_submodule(name)
        assert module.row_delta.shape == (5, module.in_features)
        assert module.row_delta.dtype == torch.float32
        rows = module.row_index
        assert rows.dtype == torch.long and rows.tolist() == sorted(set(rows.tolist()))
        assert session.records[name]["finetuned_rows"] == 5
    session.finalize()


def test_chosen_rows_are_the_top_rows_of_the_importance(tiny_llama):
    model = tiny_llama()
    W = {n: m.weight.detach().clone() for n, m in _linears(model).items()}
    _prepared(model, RowSparseFinetuneModifier(importance="magnitude", finetuning_ratio=0.25))
    name = "model.layers.1.mlp.down_proj"
    expected = naive_top_rows(naive_magnitude(W[name]), 8)  # ⌊0.25 · 32⌋
    assert model.get_submodule(name).row_index.tolist() == expected


def test_preparing_again_chooses_the_same_rows(tiny_llama):
    """A resumed run prepares again before loading its checkpoint: the choice is seeded."""
    chosen = []
    for _ in range(2):
        model = tiny_llama()
        _prepared(model, RowSparseFinetuneModifier(finetuning_rank=5, n_estimate=3, seed=4))
        chosen.append({n: b.clone() for n, b in model.named_buffers() if n.endswith("row_index")})
    assert chosen[0].keys() == chosen[1].keys() and len(chosen[0]) == 8
    assert all(torch.equal(chosen[0][n], chosen[1][n]) for n in chosen[0])


def test_attention_projections_only_with_finetune_attn_as_linear(tiny_llama):
    model = tiny_llama()
    _prepared(
        model,
        RowSparseFinetuneModifier(
            importance="l2", finetuning_rank=4, finetune_attn_as_linear=True, targets=["re:.*self_attn"]
        ),
    )
    added = {n.rsplit(".", 1)[0] for n, _ in model.named_parameters() if n.endswith("row_delta")}
    assert {n.rsplit(".", 1)[-1] for n in added} == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_zo_taylor_runs_forward_passes_only(tiny_llama, monkeypatch):
    def no_backward(*args, **kwargs):
        raise AssertionError("a backward pass ran")

    monkeypatch.setattr(torch.Tensor, "backward", no_backward)
    monkeypatch.setattr(torch.autograd, "backward", no_backward)
    model = tiny_llama()
    losses = []
    def loss(batch):
        value = causal_lm_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"])[0]
        losses.append(value)
        return value

    session = LifecycleSession(model, [RowSparseFinetuneModifier(finetuning_rank=4, n_estimate=3)],
                               run_type="finetune",
                               training=TrainingContext(loss=loss, sample_batches=_batches()))  # fmt: skip
    session.prepare()
    assert len(losses) == 2 * 3 * 2  # ± per estimate, per sample batch
    assert not any(value.requires_grad for value in losses)  # no graph: no activations kept
    assert all(p.grad is None for p in model.parameters())
    # The patch does catch a backward pass: exact Taylor needs one.
    taylor = LifecycleSession(tiny_llama(), [RowSparseFinetuneModifier(importance="taylor",
                              finetuning_rank=4)], run_type="finetune",
                              training=TrainingContext(loss=loss, sample_batches=_batches()))  # fmt: skip
    with pytest.raises(AssertionError, match="a backward pass ran"):
        taylor.prepare()


def _train_deltas(model, seed=5):
    """Give every row delta nonzero "trained" values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("row_delta"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_merged_checkpoint_equals_the_unmerged_forward(tiny_llama):
    model = tiny_llama()
    start = {n: t.clone() for n, t in model.state_dict().items()}
    modifier = RowSparseFinetuneModifier(finetuning_rank=6, n_estimate=2, p_dropout=0.3)
    session = _prepared(model, modifier)
    _train_deltas(model)
    batch = _batches(3)[2]
    unmerged = _logits(model, batch)  # eval mode: no dropout
    state = {n: t.detach().clone() for n, t in model.state_dict().items()}
    files = modifier.export_files(state)
    merged_state = modifier.export_state(state)
    session.finalize()

    plain = type(model)(model.config).eval()
    plain.load_state_dict(merged_state, strict=True)  # the plain architecture, nothing extra
    torch.testing.assert_close(_logits(plain, batch), unmerged, rtol=0, atol=1e-5)
    deltas = load(files[DELTAS_FILE])
    for name, tensor in merged_state.items():
        module_name = name.removesuffix(".weight")
        if f"{module_name}.row_index" not in deltas:
            assert torch.equal(tensor, start[name]), name
            continue
        rows = deltas[f"{module_name}.row_index"]
        changed = (tensor != start[name]).any(dim=1).nonzero().flatten()
        assert changed.tolist() == rows.tolist(), name  # only the chosen rows moved
        torch.testing.assert_close(tensor[rows] - start[name][rows], deltas[f"{module_name}.row_delta"])
    assert len({k for k in deltas if k.endswith("row_delta")}) == 8


def test_dropout_acts_on_the_delta_path_in_training_only(tiny_llama):
    model = tiny_llama()
    _prepared(model, RowSparseFinetuneModifier(finetuning_rank=6, importance="l2", p_dropout=0.5))
    _train_deltas(model)
    batch = _batches(1)[0]
    base = tiny_llama()  # the same weights without the delta path
    model.train()
    first, second = _logits(model, batch), _logits(model, batch)
    assert not torch.equal(first, second)
    model.eval()
    assert torch.equal(_logits(model, batch), _logits(model, batch))
    assert not torch.allclose(_logits(model, batch), _logits(base, batch))


def _sparse(model):
    with torch.no_grad():
        for name, module in _linears(model).items():
            if ".layers." in name:
                w = module.weight
                w[w.abs() <= w.abs().flatten().kthvalue(w.numel() // 2).values] = 0
    return model


@pytest.mark.parametrize("mask", [None, False])
def test_a_sparse_base_keeps_its_zeros_through_the_merge(tiny_llama, mask):
    model = _sparse(tiny_llama())
    zeros = {n: m.weight == 0 for n, m in _linears(model).items()}
    modifier = RowSparseFinetuneModifier(finetuning_rank=8, init="kaiming", mask_base_zeros=mask)
    session = _prepared(model, ConstantPruningModifier(), modifier)
    _train_deltas(model)
    batch = _batches(3)[2]
    unmerged = _logits(model, batch)
    merged = modifier.export_state({n: t.detach().clone() for n, t in model.state_dict().items()})
    plain = type(model)(model.config).eval()
    plain.load_state_dict(merged, strict=True)
    torch.testing.assert_close(_logits(plain, batch), unmerged, rtol=0, atol=1e-5)
    name = "model.layers.0.mlp.up_proj"
    assert session.records[name]["mask_base_zeros"] is (mask is None)
    kept = all(bool((merged[f"{n}.weight"][z] == 0).all()) for n, z in zeros.items())
    assert kept is (mask is None)  # on by default beside ConstantPruningModifier; off: lost


def test_kaiming_init_is_seeded_and_changes_the_function(tiny_llama):
    a, b = tiny_llama(), tiny_llama()
    batch = _batches(1)[0]
    before = _logits(a, batch)
    for model in (a, b):
        _prepared(model, RowSparseFinetuneModifier(finetuning_rank=4, init="kaiming", seed=3))
    name = "model.layers.0.mlp.gate_proj"
    assert torch.equal(a.get_submodule(name).row_delta, b.get_submodule(name).row_delta)
    bound = (1 / a.get_submodule(name).in_features) ** 0.5  # kaiming_uniform(a=√5): U(±1/√d_in)
    assert a.get_submodule(name).row_delta.abs().max() <= bound
    assert not torch.allclose(_logits(a, batch), before)


# --- bad inputs ----------------------------------------------------------------------------------
def test_a_rank_larger_than_a_module_names_the_module(tiny_llama):
    model = tiny_llama()
    with pytest.raises(RecipeError, match=r"finetuning_rank 40 is larger than the 32 output rows "
                       r"of model\.layers\.0\.self_attn\.o_proj.*clamp_rank"):  # fmt: skip
        _prepared(model, RowSparseFinetuneModifier(finetuning_rank=40, importance="l2"))
    model = tiny_llama()
    _prepared(model, RowSparseFinetuneModifier(finetuning_rank=40, importance="l2", clamp_rank=True))
    assert model.model.layers[0].self_attn.o_proj.row_delta.shape[0] == 32
    assert model.model.layers[0].mlp.up_proj.row_delta.shape[0] == 40


@pytest.mark.parametrize(
    "fields,message",
    [
        ("finetuning_rank: 8\n      finetuning_ratio: 0.1", "both of finetuning_rank and finetuning_ratio"),
        ("importance: l2", "neither of finetuning_rank and finetuning_ratio"),
        ("finetuning_ratio: 1.5", "finetuning_ratio"),
        ("finetuning_rank: 8\n      importance: fisher", "importance"),
    ],
)
def test_recipe_errors(fields, message):
    text = f"""
stage:
  run_type: finetune
  rowsparse_modifiers:
    RowSparseFinetuneModifier:
      {fields}
"""
    with pytest.raises(RecipeError, match=message):
        load_recipe(text)


def test_reference_spellings_are_accepted():
    stage = load_recipe("""
stage:
  run_type: finetune
  rowsparse_modifiers:
    RowSparseFinetuneModifier: {finetuning_rank: 64, importance: ZOtaylor, param_dtype: bf16}
""").stages[0]
    modifier = stage.modifiers[0]
    assert (modifier.importance, modifier.param_dtype) == ("zo_taylor", "bfloat16")


def test_data_dependent_importance_without_batches_and_qkv_only_targets_are_refused(tiny_llama):
    session = LifecycleSession(tiny_llama(), [RowSparseFinetuneModifier(finetuning_rank=4)],
                               run_type="finetune")  # fmt: skip
    with pytest.raises(ReciPruneError, match="importance l2 or magnitude"):
        session.prepare()
    qkv_only = RowSparseFinetuneModifier(finetuning_rank=4, targets=[r"re:.*\.[qkv]_proj$"])
    with pytest.raises(RecipeError, match="finetune_attn_as_linear"):
        _prepared(tiny_llama(), qkv_only)


# --- end to end -----------------------------------------------------------------------------------
RECIPE = """
rowsparse_stage:
  run_type: finetune
  training:
    dataset: asdiv
    max_seq_length: 160
    per_device_train_batch_size: 2
    learning_rate: 5.0e-2
    lr_scheduler_type: constant
    max_grad_norm: 1.0
    eval_samples: 8
  rowsparse_modifiers:
    RowSparseFinetuneModifier:
      finetuning_rank: 8
      importance: zo_taylor
      n_estimate: 4
"""


def _finetune(recipe: Path, model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    from conftest import finetune_cli as finetune

    return finetune(recipe, model, out, *extra)


def _check_only_chosen_rows_moved(start: dict, out: Path) -> dict[str, list[int]]:
    final = load_file(str(out / "model.safetensors"))
    deltas = load_file(str(out / DELTAS_FILE))
    assert final.keys() == start.keys()  # the plain architecture: nothing added survives
    chosen = {}
    for name, tensor in start.items():
        module = name.removesuffix(".weight")
        if f"{module}.row_index" not in deltas:
            assert torch.equal(final[name], tensor), f"{name} moved but has no delta"
            continue
        rows = deltas[f"{module}.row_index"].tolist()
        moved = (final[name] != tensor).any(dim=1).nonzero().flatten().tolist()
        assert moved and set(moved) <= set(rows), name
        chosen[module] = rows
    assert len(chosen) == 8 and all(len(r) == 8 for r in chosen.values())
    return chosen


def _heldout_loss(model_dir: Path, tokenizer) -> float:
    """The start model's loss on the examples `reciprune finetune --seed 7 --eval-samples 8`
    holds out (the same split the run's final eval loss uses)."""
    from transformers import LlamaForCausalLM

    from reciprune.data.training import load_training_data

    with pytest.warns(UserWarning, match="dropped"):
        data = load_training_data("asdiv", tokenizer, max_seq_length=160, seed=7)
    _, heldout = data.split(8, seed=7)
    batch = heldout.collate(list(range(len(heldout))))
    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return float(causal_lm_loss(logits, batch["labels"])[0])


def test_finetune_trains_only_the_chosen_rows_on_one_and_two_processes(
    tmp_path, tiny_llama, tiny_tokenizer
):
    start_dir = tmp_path / "start"
    # A wider init than the default 0.02, so that 8 trainable rows per module move the logits
    # within a few steps (the LM head stays frozen).
    tiny_llama(seed=1, initializer_range=0.1).save_pretrained(start_dir)
    tiny_tokenizer.save_pretrained(start_dir)
    start = load_file(str(start_dir / "model.safetensors"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    common = ["--max-steps", "12", "--seed", "7"]
    one = _finetune(recipe, start_dir, tmp_path / "one", *common, "--gradient-accumulation-steps", "2")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _finetune(recipe, start_dir, tmp_path / "two", *common, "--nproc-per-node", "2")
    assert two.returncode == 0, two.stderr[-3000:]

    rows_one = _check_only_chosen_rows_moved(start, tmp_path / "one")
    rows_two = _check_only_chosen_rows_moved(start, tmp_path / "two")
    assert rows_one == rows_two
    m1 = json.loads((tmp_path / "one" / "reciprune_manifest.json").read_text())
    m2 = json.loads((tmp_path / "two" / "reciprune_manifest.json").read_text())
    assert m1["world_size"] == 1 and m2["world_size"] == 2
    curve1, curve2 = m1["loss_curve"], m2["loss_curve"]
    assert len(curve1) == len(curve2) == 12
    first, last = sum(r["loss"] for r in curve1[:3]) / 3, sum(r["loss"] for r in curve1[-3:]) / 3
    assert last < 0.95 * first, f"the training loss did not fall: {first:.4f} -> {last:.4f}"
    before, after = _heldout_loss(start_dir, tiny_tokenizer), m1["eval_curve"][-1]["eval_loss"]
    assert after < 0.92 * before, f"the held-out loss did not fall: {before:.4f} -> {after:.4f}"
    for a, b in zip(curve1, curve2, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3), a["step"]
    assert m2["eval_curve"][-1]["eval_loss"] == pytest.approx(after, rel=2e-3)
