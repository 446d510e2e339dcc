"""SpIEL sparse deltas: drop-and-grow against naive loops, candidate gradients against plain
autograd, no dense gradient kept, merged export, recipe errors, and `reciprune finetune` end to end
on 1 process and on 2 (FSDP)."""

from __future__ import annotations

import copy
import gc
import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load, load_file

from reciprune.algorithms.spiel import drop_and_grow, drop_rate, split_budget, top_candidates
from reciprune.core.events import EventType
from reciprune.core.session import LifecycleSession
from reciprune.errors import RecipeError, ReciPruneError
from reciprune.modifiers import SparseDeltaModifier
from reciprune.pipelines.finetune import causal_lm_loss
from reciprune.recipe import load_recipe

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --- naive references -------------------------------------------------------------------------
def naive_drop_and_grow(indices, values, candidates, scores, k):
    """Explicit loops: slots sorted by (|value|, slot), eligible candidates by (−score, position)."""
    active = set(indices.tolist())
    eligible = [j for j in range(len(candidates)) if int(candidates[j]) not in active]
    k = min(k, len(indices), len(eligible))
    slots = sorted(range(len(values)), key=lambda i: (abs(float(values[i])), i))[:k]
    grown = sorted(eligible, key=lambda j: (-float(scores[j]), j))[:k]
    new_indices, new_values = indices.tolist(), values.tolist()
    for slot, j in zip(slots, grown, strict=True):
        new_indices[slot] = int(candidates[j])
        new_values[slot] = 0.0
    return new_indices, new_values, slots, grown


def naive_merge(weight, indices, values):
    merged = weight.detach().clone().reshape(-1)
    for i, v in zip(indices.tolist(), values.tolist(), strict=True):
        merged[i] += v
    return merged.reshape(weight.shape)


# --- the algorithm ------------------------------------------------------------------------------
def test_the_budget_is_split_in_proportion_to_size_and_sums_exactly() -> None:
    sizes = [1024, 512, 512, 2048, 7]
    counts = split_budget(sizes, total_params=10_000, density=0.137)
    assert sum(counts) == 1370  # ⌊0.137 · 10000⌋
    for n, k in zip(sizes, counts, strict=True):
        assert abs(k - 1370 * n / sum(sizes)) < 1 and 0 <= k <= n
    assert split_budget(sizes, 10_000, num_tunable_weights=41) == [10, 5, 5, 21, 0]
    assert sum(split_budget([3, 3, 3], 9, num_tunable_weights=9)) == 9
    with pytest.raises(ValueError, match="exceeds the 4103 weights"):
        split_budget(sizes, 10_000, density=0.5)
    with pytest.raises(ValueError, match="must be positive"):
        split_budget(sizes, 10, density=0.01)
    with pytest.raises(ValueError, match="exactly one"):
        split_budget(sizes, 10, density=0.1, num_tunable_weights=3)


def test_the_drop_rate_decays_linearly_to_zero() -> None:
    assert drop_rate(0, 100, 0.2) == pytest.approx(0.2)
    assert drop_rate(25, 100, 0.2) == pytest.approx(0.15)
    assert drop_rate(100, 100, 0.2) == 0.0 and drop_rate(120, 100, 0.2) == 0.0


@pytest.mark.parametrize("seed", range(6))
def test_drop_and_grow_equals_the_naive_loop(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    numel, n = 300, 40
    indices = torch.randperm(numel, generator=g)[:n]
    values = torch.randn(n, generator=g)
    values[3] = values[7]  # a tie: the lower slot goes first
    # candidates: mostly untuned positions, some tuned ones (never grown)
    untuned = torch.tensor(sorted(set(range(numel)) - set(indices.tolist())))
    candidates = torch.cat([untuned[torch.randperm(len(untuned), generator=g)[:30]], indices[:8]])
    scores = torch.rand(len(candidates), generator=g)
    for k in (0, 5, 17, 40):  # 40 > the 30 eligible candidates
        got = drop_and_grow(indices, values, candidates, scores, k)
        ref_indices, ref_values, ref_slots, ref_grown = naive_drop_and_grow(
            indices, values, candidates, scores, k
        )
        assert got.indices.tolist() == ref_indices
        assert got.values.tolist() == ref_values
        assert got.slots.tolist() == ref_slots and got.grown.tolist() == ref_grown
        assert got.indices.numel() == n == len(set(got.indices.tolist()))


def test_the_number_of_tuned_entries_never_changes_through_many_regrowths() -> None:
    g = torch.Generator().manual_seed(0)
    numel, n = 500, 60
    indices = torch.randperm(numel, generator=g)[:n]
    values = torch.randn(n, generator=g)
    changed = 0
    for _ in range(200):
        candidates = torch.randperm(numel, generator=g)[:80]  # tuned ones among them too
        scores = torch.randn(80, generator=g).abs()
        k = int(torch.randint(0, n + 1, (), generator=g))
        result = drop_and_grow(indices, values, candidates, scores, k)
        assert result.indices.numel() == n and len(set(result.indices.tolist())) == n
        assert int((result.indices != indices).sum()) == result.slots.numel()
        changed += result.slots.numel()
        indices = result.indices
        values = result.values + 0.1 * torch.randn(n, generator=g)
    assert changed > 1000  # the set really moved


def test_candidates_are_the_largest_untuned_gradients() -> None:
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(12, 10, generator=g)
    indices = torch.topk(grad.reshape(-1).abs(), 5).indices  # the largest are all tuned
    got = top_candidates(grad, indices, 7)
    order = sorted(range(120), key=lambda p: -abs(float(grad.reshape(-1)[p])))
    expected = sorted([p for p in order if p not in set(indices.tolist())][:7])
    assert got.tolist() == expected


# --- the modifier, driven as the trainer drives it -------------------------------------------
def _batches(seed: int, count: int, B: int = 2, T: int = 7) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(2, 320, (B, T), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def _loss(model, batch) -> torch.Tensor:
    return causal_lm_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"])[0]


def _session(model, modifier, total_steps=100, lr=1e-2):
    session = LifecycleSession(model, [modifier], run_type="finetune", total_steps=total_steps)
    session.prepare()
    session.initialize()
    params = [p for p in model.parameters() if p.requires_grad]
    session.start_training(torch.optim.AdamW(params, lr=lr, weight_decay=0.0))
    return session


def _micro_batch(session, model, batch, accumulation: int) -> None:
    session.event(EventType.BATCH_START, batch=batch)
    loss = _loss(model, batch)
    session.event(EventType.LOSS_COMPUTED, loss=loss, batch=batch)
    (loss / accumulation).backward()
    session.event(EventType.BATCH_END, batch=batch)


def _deltas(model) -> dict[str, torch.nn.Module]:
    """The modules that carry sparse deltas, by name."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "delta_indices")}


def _randomize_values(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in _deltas(model).values():
            module.delta_values.copy_(0.05 * torch.randn(module.delta_values.shape, generator=g))


def test_only_the_deltas_train_and_the_budget_is_placed_by_size(tiny_llama) -> None:
    model = tiny_llama()
    total = sum(p.numel() for p in model.parameters())
    modifier = SparseDeltaModifier(density=0.1, targets=["re:.*(q|k|down)_proj"])
    _session(model, modifier)
    deltas = _deltas(model)
    assert sorted(deltas) == sorted(
        f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "self_attn.k_proj",
                                                              "mlp.down_proj")
    )  # fmt: skip
    sizes = [m.weight.numel() for m in deltas.values()]
    counts = [m.delta_indices.numel() for m in deltas.values()]
    assert counts == split_budget(sizes, total, density=0.1) and sum(counts) == int(0.1 * total)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("delta_values") for n in trainable)
    for module in deltas.values():
        assert module.delta_indices.dtype == torch.long
        assert module.delta_values.dtype == torch.float32
        assert len(set(module.delta_indices.tolist())) == module.delta_indices.numel()
    # the same seed draws the same indices (a resumed run and every process prepare alike)
    again = tiny_llama()
    _session(again, SparseDeltaModifier(density=0.1, targets=["re:.*(q|k|down)_proj"]))
    for name, module in _deltas(again).items():
        assert torch.equal(module.delta_indices, deltas[name].delta_indices)


def test_candidate_gradients_equal_plain_autograd_summed_over_the_micro_batches(tiny_llama):
    """(c): the summed candidate gradients (and their squares per step) equal the naive dense
    ∂L/∂W' of a plain model with W' = W + S(η, φ), and ∂L/∂φ is that gradient at η."""
    model = tiny_llama()
    reference = copy.deepcopy(model).train()
    model.train()
    modifier = SparseDeltaModifier(
        num_tunable_weights=600, reselection_steps=3, selection_accumulation_steps=2
    )
    session = _session(model, modifier, lr=0.0)  # lr 0: φ stays what we set
    _randomize_values(model, 1)
    deltas = _deltas(model)
    with torch.no_grad():
        for name, module in deltas.items():
            W = reference.get_submodule(name).weight
            W.copy_(naive_merge(W, module.delta_indices, module.delta_values))
    for p in reference.parameters():
        p.requires_grad_(p.dim() == 2)

    tuned = {n: set(m.delta_indices.tolist()) for n, m in deltas.items()}  # the reselection moves them
    batches = _batches(seed=2, count=4)
    step_grads: list[dict[str, torch.Tensor]] = []
    first_micro: dict[str, torch.Tensor] = {}
    for step in range(2):
        session.advance_to(step)
        for a in range(2):
            batch = batches[2 * step + a]
            _micro_batch(session, model, batch, accumulation=2)
            (_loss(reference, batch) / 2).backward()
            if step == 0 and a == 0:
                first_micro = {n: reference.get_submodule(n).weight.grad.clone() for n in deltas}
            for name, module in deltas.items():  # ∂L/∂φ accumulated so far = dense grad at η
                dense = reference.get_submodule(name).weight.grad.reshape(-1)
                torch.testing.assert_close(
                    module.delta_values.grad, dense[module.delta_indices], rtol=1e-4, atol=1e-7
                )
        session.event(EventType.OPTIMIZER_PRE_STEP)
        step_grads.append({n: reference.get_submodule(n).weight.grad.clone() for n in deltas})
        if step == 1:
            stats = modifier.state_dict()["stats"]
        session.optimizer.step()
        session.event(EventType.OPTIMIZER_POST_STEP)
        session.optimizer.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)

    assert sorted(stats) == sorted(deltas)
    for name in deltas:
        candidates = stats[name]["candidates"]
        flat = first_micro[name].reshape(-1)
        order = sorted(range(flat.numel()), key=lambda p: -abs(float(flat[p])))
        expected = sorted([p for p in order if p not in tuned[name]][: len(tuned[name])])
        assert candidates.tolist() == expected, name
        summed = sum(g[name].reshape(-1)[candidates] for g in step_grads)
        squares = sum(g[name].reshape(-1)[candidates] ** 2 for g in step_grads)
        torch.testing.assert_close(stats[name]["sum"], summed, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(stats[name]["sq"], squares, rtol=1e-4, atol=1e-10)
        assert float(stats[name]["steps"]) == 2
    session.finalize()


def test_no_dense_weight_sized_tensor_is_kept(tiny_llama) -> None:
    """(d): during a selection micro-batch, nothing weight-sized is saved for backward except the
    frozen base weights themselves (no dense W' or S(η, φ)); after backward the base weights have
    no .grad, φ's gradient has φ's size, the modifier holds candidate statistics of k entries per
    module, and no tensor object of any targeted weight's size is alive besides the weights."""
    model = tiny_llama()
    model.train()
    modifier = SparseDeltaModifier(density=0.1, reselection_steps=4, selection_accumulation_steps=2)
    session = _session(model, modifier)
    _randomize_values(model, 3)
    deltas = _deltas(model)
    weights = {m.weight.data_ptr(): m.weight for m in deltas.values()}
    weight_shapes = {tuple(m.weight.shape) for m in deltas.values()}
    weight_sizes = {m.weight.numel() for m in deltas.values()}
    saved_weight_sized = []

    def pack(t):
        if tuple(t.shape) in weight_shapes or tuple(t.shape[::-1]) in weight_shapes:
            saved_weight_sized.append(t.data_ptr() in weights)
        return t

    def weight_sized() -> dict[int, torch.Tensor]:
        return {id(o): o for o in gc.get_objects()
                if issubclass(type(o), torch.Tensor) and o.numel() in weight_sizes}  # fmt: skip

    gc.collect()
    before = weight_sized()
    batch = _batches(seed=4, count=1)[0]  # 2 × 7 tokens: no activation has a weight's shape
    session.advance_to(0)
    session.event(EventType.BATCH_START, batch=batch)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _loss(model, batch)
    session.event(EventType.LOSS_COMPUTED, loss=loss, batch=batch)
    loss.backward()
    session.event(EventType.BATCH_END, batch=batch)
    assert saved_weight_sized and all(saved_weight_sized)

    for name, param in model.named_parameters():
        if name.endswith("delta_values"):
            assert param.grad is not None and param.grad.shape == param.shape
        else:
            assert param.grad is None and not param.requires_grad, name
    stats = modifier.state_dict()["stats"]
    assert sorted(stats) == sorted(deltas)  # the backward did collect
    for name, module in deltas.items():
        for key, tensor in stats[name].items():
            assert tensor.numel() <= module.delta_indices.numel(), (name, key)
    del stats, loss
    gc.collect()
    new = [t for key, t in weight_sized().items() if key not in before]
    assert not new, [tuple(t.shape) for t in new]
    session.finalize()


def test_reselections_drop_the_smallest_grow_the_best_and_seed_adam(tiny_llama) -> None:
    """(a, b) in training: at every reselection exactly ⌊ζ·k⌋ slots change (k stays constant),
    the dropped slots are the smallest |φ| and the grown entries the largest accumulated |grad|
    among untuned candidates (naive loop), the new φ are 0 and AdamW's moments of the new
    entries are the bias-scaled mean gradient and mean squared gradient."""
    model = tiny_llama()
    model.train()
    R, S, T = 3, 2, 40
    modifier = SparseDeltaModifier(
        density=0.08, reselection_steps=R, selection_accumulation_steps=S, reselection_rate=0.6
    )
    session = _session(model, modifier, total_steps=T, lr=3e-3)
    optimizer = session.optimizer
    deltas = _deltas(model)
    sizes = {name: m.delta_indices.numel() for name, m in deltas.items()}
    batches = _batches(seed=5, count=8)
    reselections = 0
    for step in range(T):
        session.advance_to(step)
        for a in range(2):
            _micro_batch(session, model, batches[(2 * step + a) % 8], accumulation=2)
        session.event(EventType.OPTIMIZER_PRE_STEP)
        stats = modifier.state_dict()["stats"]
        optimizer.step()
        before = {n: (m.delta_indices.clone(), m.delta_values.detach().clone())
                  for n, m in deltas.items()}  # fmt: skip
        session.event(EventType.OPTIMIZER_POST_STEP)
        optimizer.zero_grad(set_to_none=True)
        completed = step + 1
        if completed % R != S or completed >= T:
            for name, module in deltas.items():  # no reselection: nothing moved
                assert torch.equal(module.delta_indices, before[name][0])
            continue
        reselections += 1
        rate = 1.0 if completed == S else 0.6 * (1 - completed / T)
        for name, module in deltas.items():
            old_indices, old_values = before[name]
            n = sizes[name]
            ref_indices, ref_values, slots, grown = naive_drop_and_grow(
                old_indices, old_values, stats[name]["candidates"], stats[name]["sum"].abs(),
                int(rate * n),
            )  # fmt: skip
            assert module.delta_indices.numel() == n == len(set(module.delta_indices.tolist()))
            assert len(slots) == int(rate * n)  # enough candidates: exactly ⌊ζ·k⌋ change
            assert module.delta_indices.tolist() == ref_indices, (name, completed)
            assert module.delta_values.tolist() == ref_values
            state = optimizer.state[module.delta_values]
            t = float(state["step"])
            mean = stats[name]["sum"][grown] / S
            mean_sq = stats[name]["sq"][grown] / S
            torch.testing.assert_close(state["exp_avg"][slots], (1 - 0.9**t) * mean)
            torch.testing.assert_close(state["exp_avg_sq"][slots], (1 - 0.999**t) * mean_sq)
    assert reselections == len(range(S, T, R))  # 13 reselections
    session.finalize()


def test_bf16_autocast_and_bf16_deltas_give_the_gradient_of_a_plain_bf16_model(tiny_llama):
    """One process in bf16 trains under autocast: the deltas' gradient is still ∂L/∂W' at η."""
    model, reference = tiny_llama(), tiny_llama()
    modifier = SparseDeltaModifier(density=0.1, param_dtype="bfloat16")
    session = _session(model, modifier)
    _randomize_values(model, 8)
    for p in reference.parameters():
        p.requires_grad_(p.dim() == 2)
    with torch.no_grad():
        for name, module in _deltas(model).items():
            W = reference.get_submodule(name).weight
            W.copy_(naive_merge(W, module.delta_indices, module.delta_values.float()))
    batch = _batches(seed=9, count=1)[0]
    session.event(EventType.BATCH_START, batch=batch)  # step 0: a selection step
    for net in (model, reference):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = _loss(net, batch)
        loss.backward()
    assert sorted(modifier.state_dict()["stats"]) == sorted(_deltas(model))
    for name, module in _deltas(model).items():
        assert module.delta_values.grad.dtype == torch.bfloat16
        dense = reference.get_submodule(name).weight.grad.reshape(-1)[module.delta_indices]
        error = (module.delta_values.grad.float() - dense).abs().max()
        assert error <= 0.02 * dense.abs().max(), name  # bf16 rounding: about 1% here
    session.finalize()


def test_the_merged_export_equals_the_unmerged_forward(tiny_llama) -> None:
    """(e): export_state folds W += S(η, φ) and drops the added names; the plain model it loads
    into gives the hooked model's logits within 1e-5; export_files holds the same deltas."""
    model = tiny_llama()
    modifier = SparseDeltaModifier(density=0.1)
    session = _session(model, modifier)
    _randomize_values(model, 6)
    ids = _batches(seed=7, count=1, T=12)[0]["input_ids"]
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    files = modifier.export_files(state)
    merged_state = modifier.export_state(state)
    plain = tiny_llama()
    assert sorted(merged_state) == sorted(plain.state_dict())
    plain.load_state_dict(merged_state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, unmerged, rtol=0, atol=1e-5)
        base = tiny_llama()
        assert (base(input_ids=ids).logits - unmerged).abs().max() > 1e-3  # the deltas matter
    saved = load(files["sparse_deltas.safetensors"])
    for name, module in _deltas(model).items():
        assert torch.equal(saved[f"{name}.indices"], module.delta_indices)
        assert torch.equal(saved[f"{name}.values"], module.delta_values.detach())
        assert saved[f"{name}.shape"].tolist() == list(module.weight.shape)
        torch.testing.assert_close(
            merged_state[f"{name}.weight"],
            naive_merge(module.weight, module.delta_indices, module.delta_values),
        )
    session.finalize()
    assert session.num_hooks == 0


# --- bad inputs ---------------------------------------------------------------------------------
def _recipe(fields: str) -> str:
    return f"""
spiel_stage:
  run_type: finetune
  modifiers:
    SparseDeltaModifier:
{fields}
"""


@pytest.mark.parametrize(
    "fields,message",
    [
        ("      density: 0.0", "density 0.0 is outside \\(0, 1\\]"),
        ("      density: -0.1", "density -0.1 is outside \\(0, 1\\]"),
        ("      density: 1.5", "density 1.5 is outside \\(0, 1\\]"),
        ("      density: 0.1\n      num_tunable_weights: 100", "both of density and num_tun"
         "able_weights given"),
        ("      reselection_steps: 10", "neither of density and num_tunable_weights given"),
        ("      num_tunable_weights: 0", "num_tunable_weights"),
        ("      density: 0.1\n      reselection_steps: 4\n      selection_accumulation_steps: 5",
         "selection_accumulation_steps \\(5\\) is more than reselection_steps \\(4\\)"),
        ("      density: 0.1\n      reselection_rate: 1.5", "reselection_rate"),
    ],
)  # fmt: skip
def test_bad_fields_are_recipe_errors(fields: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe(_recipe(fields))


def test_direct_construction_validates_too_and_accepts_the_reference_field_name() -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        SparseDeltaModifier()
    assert SparseDeltaModifier(density=1.0).density == 1.0
    legacy = SparseDeltaModifier.model_validate({"density": 0.01, "initial_reselection_rate": 0.3})
    assert legacy.reselection_rate == 0.3


def test_a_budget_larger_than_the_targets_is_refused_before_training(tiny_llama) -> None:
    model = tiny_llama()
    session = LifecycleSession(model, [SparseDeltaModifier(density=0.9)], run_type="finetune")
    with pytest.raises(ReciPruneError, match="exceeds the .* weights of the targeted modules"):
        session.prepare()


# --- end to end -------------------------------------------------------------------------------
E2E_RECIPE = """
spiel_stage:
  run_type: finetune
  training:
    dataset: asdiv
    max_seq_length: 160
    per_device_train_batch_size: 2
    learning_rate: 1.0e-2
    lr_scheduler_type: constant
    eval_samples: 8
  sparse_modifiers:
    SparseDeltaModifier:
      density: 0.05
      reselection_steps: 2
      selection_accumulation_steps: 1
      reselection_rate: 0.5
"""


def _finetune(recipe: Path, model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    from conftest import finetune_cli as finetune

    return finetune(recipe, model, out, "--max-steps", "6", "--seed", "7", *extra)


def test_finetune_one_and_two_processes_agree_and_save_the_plain_model(
    tmp_path, tiny_llama, tiny_tokenizer
) -> None:
    """(g): 6 steps with a reselection after steps 1, 3 and 5; 1 process with 2 accumulation
    steps and 2 FSDP processes give the same losses and the same deltas; the checkpoint is the
    plain Llama, and each module changed in at most its budget of entries."""
    model_dir = tmp_path / "model"
    base = tiny_llama(seed=1)
    base.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(E2E_RECIPE)
    one = _finetune(recipe, model_dir, tmp_path / "one", "--gradient-accumulation-steps", "2")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _finetune(recipe, model_dir, tmp_path / "two", "--nproc-per-node", "2")
    assert two.returncode == 0, two.stderr[-3000:]

    curves = [json.loads((tmp_path / o / "reciprune_manifest.json").read_text())["loss_curve"]
              for o in ("one", "two")]  # fmt: skip
    assert len(curves[0]) == len(curves[1]) == 6
    for a, b in zip(*curves, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3), a["step"]

    original = base.state_dict()
    total = sum(p.numel() for p in base.parameters())
    names = [f"model.layers.{i}.{'self_attn' if p.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{p}"
             for i in range(2) for p in PROJ]  # fmt: skip
    budget = dict(zip(names, split_budget([original[f"{n}.weight"].numel() for n in names],
                                          total, density=0.05), strict=True))  # fmt: skip
    deltas = {}
    for out in ("one", "two"):
        saved = load_file(str(tmp_path / out / "model.safetensors"))
        assert sorted(saved) == sorted(original)  # the plain architecture, nothing added
        deltas[out] = load_file(str(tmp_path / out / "sparse_deltas.safetensors"))
        for name in names:
            indices = deltas[out][f"{name}.indices"]
            values = deltas[out][f"{name}.values"]
            assert indices.numel() == budget[name] == len(set(indices.tolist()))
            w0, w1 = original[f"{name}.weight"], saved[f"{name}.weight"]
            assert int((w1 != w0).sum()) <= budget[name], name
            torch.testing.assert_close(w1, naive_merge(w0, indices, values), rtol=0, atol=1e-7)
        assert not (tmp_path / f"{out}.checkpoints").exists()
    fresh = copy.deepcopy(base)  # the first, random indices: every one was replaced
    LifecycleSession(fresh, [SparseDeltaModifier(density=0.05)], run_type="finetune").prepare()
    for name, module in _deltas(fresh).items():
        kept = set(module.delta_indices.tolist()) & set(deltas["two"][f"{name}.indices"].tolist())
        assert len(kept) < budget[name] / 2, name
    moved = 0
    for name in names:  # the same choice on 1 and 2 processes
        a, b = deltas["one"][f"{name}.indices"], deltas["two"][f"{name}.indices"]
        assert torch.equal(a, b), name
        torch.testing.assert_close(deltas["two"][f"{name}.values"],
                                   deltas["one"][f"{name}.values"], rtol=1e-2, atol=1e-4)  # fmt: skip
        moved += int((deltas["one"][f"{name}.values"] != 0).sum())
    assert moved > 0
    assert math.isfinite(curves[0][-1]["loss"])


def test_on_a_sparse_base_no_delta_ever_lands_on_a_pruned_weight(tiny_llama) -> None:
    """With a ConstantPruningModifier in the stage (mask_base_zeros on by default), the first
    indices and every grown index avoid the base's zeros, so the merged model keeps them all."""
    from reciprune.algorithms import magnitude_prune
    from reciprune.modifiers import ConstantPruningModifier

    model = tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.copy_(magnitude_prune(module.weight, 0.5)[0])
    zeros = {n: m.weight == 0 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    model.train()
    R, S, T = 2, 1, 12
    modifier = SparseDeltaModifier(
        density=0.05, reselection_steps=R, selection_accumulation_steps=S, reselection_rate=0.6
    )
    session = LifecycleSession(
        model, [ConstantPruningModifier(targets=["Linear"]), modifier], run_type="finetune",
        total_steps=T,
    )  # fmt: skip
    session.prepare()
    session.initialize()
    params = [p for p in model.parameters() if p.requires_grad]
    session.start_training(torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0))
    deltas = _deltas(model)
    seen: dict[str, set[int]] = {name: set() for name in deltas}
    batches = _batches(seed=3, count=4)
    for step in range(T):
        session.advance_to(step)
        _micro_batch(session, model, batches[step % 4], accumulation=1)
        session.event(EventType.OPTIMIZER_PRE_STEP)
        session.optimizer.step()
        session.event(EventType.OPTIMIZER_POST_STEP)
        session.optimizer.zero_grad(set_to_none=True)
        for name, module in deltas.items():
            seen[name] |= set(module.delta_indices.tolist())
    session.finalize()
    for name, indices in seen.items():
        flat_zeros = zeros[name].reshape(-1)
        assert len(indices) > deltas[name].delta_indices.numel()  # reselections grew new ones
        assert not any(bool(flat_zeros[i]) for i in indices), name
    state = modifier.export_state({k: v.detach().clone() for k, v in model.state_dict().items()})
    for name, mask in zeros.items():
        assert bool((state[f"{name}.weight"][mask] == 0).all()), name
