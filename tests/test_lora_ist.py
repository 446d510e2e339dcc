"""LoRA/DoRA through PEFT and IST (importance-aware sparse tuning): merges against PEFT's, the
layer draws and score updates against the paper's equations, the modifiers driven the way the
training loop drives them, and `reciprune finetune` end to end on 1 and 2 (FSDP2) processes."""

from __future__ import annotations

import json
import math
import subprocess
from itertools import combinations
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from torch import nn

from reciprune.algorithms.ist import (
    layer_count,
    rollout_rewards,
    sample_layers_to_suppress,
    sample_layers_to_update,
    sample_suppression_rollouts,
    update_importance,
)
from reciprune.core.events import EventType
from reciprune.core.session import LifecycleSession, TrainingContext
from reciprune.errors import RecipeError, ReciPruneError
from reciprune.modifiers import ISTModifier, LoRAModifier, Modifier
from reciprune.modifiers.lora import ADAPTER_CONFIG_FILE, ADAPTER_FILE
from reciprune.pipelines.finetune import causal_lm_loss
from reciprune.recipe import load_recipe


def _batch(vocab=320, B=2, T=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 7:] = 0
    ids[mask == 0] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _loss(model):
    return lambda b: causal_lm_loss(
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"]
    )[0]


def _prepared(model, *modifiers):
    session = LifecycleSession(
        model, list(modifiers), run_type="finetune", training=TrainingContext(loss=_loss(model))
    )
    session.prepare()
    session.initialize()
    return session


def _randomise_adapters(model, seed=1, std=0.3):
    """Non-zero lora_B (and a perturbed DoRA magnitude) so the adapters change the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif ".lora_magnitude_vector." in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))


# --- LoRA / DoRA ---------------------------------------------------------------------------------
@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_equals_peft_merge_and_the_unmerged_forward(tiny_llama, use_dora):
    from peft.tuners.lora import LoraLayer
    from transformers import LlamaForCausalLM

    model = tiny_llama()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    modifier = LoRAModifier(r=4, alpha=12, targets=["q_proj", "v_proj", "mlp.down_proj"],
                            use_dora=use_dora)  # fmt: skip
    _prepared(model, modifier)
    _randomise_adapters(model)
    batch = _batch()
    unmerged = _logits(model, batch)

    merged = modifier.export_state({k: v.detach().clone() for k, v in model.state_dict().items()})
    assert set(merged) == set(base)  # the plain architecture's names, adapter names dropped
    targeted = {f"model.layers.{i}.{m}.weight" for i in range(2)
                for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}  # fmt: skip
    assert {k for k in base if not torch.equal(base[k], merged[k])} == targeted

    # PEFT's own merge of each adapted layer gives the same weights
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            module.merge()
            torch.testing.assert_close(
                module.get_base_layer().weight.detach(), merged[f"{name}.weight"],
                rtol=0, atol=1e-6,
            )  # fmt: skip
    plain = LlamaForCausalLM(model.config).eval()
    plain.load_state_dict(merged, strict=True)
    torch.testing.assert_close(_logits(plain, batch), unmerged, rtol=0, atol=1e-5)


def test_the_merge_formulas_against_explicit_loops():
    from reciprune.algorithms.lora import lora_merge

    g = torch.Generator().manual_seed(0)
    W0, A = torch.randn(5, 7, generator=g), torch.randn(3, 7, generator=g)
    B = torch.randn(5, 3, generator=g)
    m, s = torch.rand(5, generator=g) + 0.5, 1.5
    lora = [[W0[i, j].item() + s * sum(B[i, k].item() * A[k, j].item() for k in range(3))
             for j in range(7)] for i in range(5)]  # fmt: skip
    torch.testing.assert_close(lora_merge(W0, A, B, s), torch.tensor(lora))
    dora = [[m[i].item() / math.sqrt(sum(v * v for v in row)) * row[j] for j in range(7)]
            for i, row in enumerate(lora)]  # fmt: skip
    torch.testing.assert_close(lora_merge(W0, A, B, s, m), torch.tensor(dora))
    # Conv1D stores [in, out]: the same merge, transposed
    transposed = lora_merge(W0.t(), A, B, s, m, transposed=True)
    torch.testing.assert_close(transposed, torch.tensor(dora).t())


@pytest.mark.parametrize("use_dora", [False, True])
def test_adapters_leave_the_outputs_unchanged_at_step_0_and_only_they_train(tiny_llama, use_dora):
    model = tiny_llama()
    batch = _batch()
    before = _logits(model, batch)
    _prepared(model, LoRAModifier(r=4, targets=["q_proj", "v_proj"], use_dora=use_dora))
    torch.testing.assert_close(_logits(model, batch), before, rtol=0, atol=1e-6)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # r·(in + out) per adapter (+ out for DoRA's magnitude): q_proj is 32 → 32, v_proj 32 → 16
    # (2 key-value heads of 8)
    q_proj = 4 * (32 + 32) + (32 if use_dora else 0)
    v_proj = 4 * (32 + 16) + (16 if use_dora else 0)
    assert sum(p.numel() for p in trainable.values()) == 2 * (q_proj + v_proj)
    assert all(".lora_" in n for n in trainable)
    assert type(model).__name__ == "LlamaForCausalLM"  # the model keeps its class


def test_targets_suffixes_regexes_and_the_linear_default(tiny_llama):
    model = tiny_llama()
    suffix = LoRAModifier(targets=["mlp.up_proj"]).resolve(model)
    assert sorted(suffix) == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    regex = LoRAModifier(targets=[r"re:model\.layers\.1\.self_attn\.[qk]_proj"]).resolve(model)
    assert sorted(regex) == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.q_proj"]
    every = LoRAModifier().resolve(model)  # default: every Linear of the decoder layers
    assert len(every) == 2 * 7 and "lm_head" not in every
    with pytest.raises(ReciPruneError, match=r"select no Linear.*'q_proj'|select no Linear"):
        LoRAModifier(targets=["qproj"]).resolve(model)
    with pytest.raises(ValidationError, match="targets is empty"):
        LoRAModifier(targets=[])
    with pytest.raises(ValidationError, match="not a valid regular expression"):
        LoRAModifier(targets=["re:(q"])
    with pytest.raises(ValidationError, match="greater than 0"):
        LoRAModifier(r=0)


@pytest.mark.parametrize("use_dora", [False, True])
def test_saved_adapter_files_load_with_peft_on_the_base_model(tmp_path, tiny_llama, use_dora):
    from peft import PeftModel

    model = tiny_llama()
    modifier = LoRAModifier(r=4, alpha=8, targets=["q_proj", "o_proj"], use_dora=use_dora)
    _prepared(model, modifier)
    _randomise_adapters(model)
    batch = _batch()
    trained = _logits(model, batch)
    files = modifier.export_files({k: v.detach().clone() for k, v in model.state_dict().items()})
    assert set(files) == {ADAPTER_FILE, ADAPTER_CONFIG_FILE}
    folder = tmp_path / "adapter"  # PEFT's file names, in a folder of their own
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(files[ADAPTER_FILE])
    (folder / "adapter_config.json").write_bytes(files[ADAPTER_CONFIG_FILE])
    assert json.loads(files[ADAPTER_CONFIG_FILE])["use_dora"] is use_dora
    loaded = PeftModel.from_pretrained(tiny_llama(), folder).eval()
    torch.testing.assert_close(_logits(loaded, batch), trained, rtol=0, atol=1e-5)


# --- IST: the algorithm --------------------------------------------------------------------------
def test_layer_counts_round_half_up_and_keep_at_least_one_layer():
    assert layer_count(32, 0.25) == 8 and layer_count(32, 0.5) == 16
    assert layer_count(6, 0.25) == 2  # 1.5 rounds up
    assert layer_count(2, 0.25) == 1 and layer_count(3, 0.1) == 1
    assert layer_count(4, 1.0) == 4


def test_importance_update_equals_the_equation_written_as_loops():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, generator=g, dtype=torch.float64)
    sets = [torch.tensor([0, 2, 5]), torch.tensor([1, 2, 3]), torch.tensor([3, 4, 5])]
    losses = torch.tensor([2.1, 1.7, 2.6], dtype=torch.float64)
    eta = 10.0
    R = [math.exp(-loss) for loss in losses.tolist()]
    r = [x - sum(R) / len(R) for x in R]
    expected = s.tolist()
    for k, layers in enumerate(sets):
        for ell in layers.tolist():
            p = 1 / (1 + math.exp(-s[ell].item()))  # σ at the scores before the update
            expected[ell] += eta * r[k] * p * (1 - p)
    expected = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(update_importance(s, sets, losses, eta), expected)
    torch.testing.assert_close(rollout_rewards(losses), torch.tensor(r, dtype=torch.float64))
    assert abs(sum(r)) < 1e-12


def test_a_layer_whose_suppression_lowers_the_loss_gets_a_higher_score():
    # Sign convention (the paper's, and the authors' code): s is raised for the layers suppressed in
    # rollouts with a lower-than-average loss, i.e. a layer whose suppression helps is suppressed
    # more (P ∝ σ(s)) and updated less (P ∝ σ(−s)).
    s = torch.zeros(4, dtype=torch.float64)
    sets = [torch.tensor([0]), torch.tensor([1]), torch.tensor([2])]
    losses = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)  # suppressing layer 0 helps most
    new = update_importance(s, sets, losses, 10.0)
    assert new[0] > 0 > new[2] and new[0] > new[1] > new[2]
    assert new[3] == 0  # never suppressed: unchanged
    # the harmful-to-keep layer 0 is now the most likely suppressed and the least likely updated
    assert torch.sigmoid(new).argmax() == 0 and torch.sigmoid(-new).argmin() == 0


def test_sampling_frequencies_match_the_sigmoid_weights():
    s = torch.tensor([-1.5, 0.0, 0.5, 2.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    draws = 20000
    for sample, weights in ((sample_layers_to_update, torch.sigmoid(-s)),
                            (sample_layers_to_suppress, torch.sigmoid(s))):  # fmt: skip
        # one layer: P(ℓ) = w_ℓ / Σw
        counts = torch.zeros(4)
        for _ in range(draws):
            counts[sample(s, 1, g)] += 1
        p = (weights / weights.sum()).float()
        sd = torch.sqrt(p * (1 - p) / draws)
        assert bool(((counts / draws - p).abs() < 5 * sd).all()), (counts / draws, p)
        # two layers without replacement: P({i, j}) = w_i/W · w_j/(W − w_i) + w_j/W · w_i/(W − w_j)
        W = weights.sum().item()
        w = weights.tolist()
        pairs = {}
        for _ in range(draws):
            key = tuple(sample(s, 2, g).tolist())
            pairs[key] = pairs.get(key, 0) + 1
        for i, j in combinations(range(4), 2):
            exact = w[i] / W * w[j] / (W - w[i]) + w[j] / W * w[i] / (W - w[j])
            sd = math.sqrt(exact * (1 - exact) / draws)
            assert abs(pairs.get((i, j), 0) / draws - exact) < 5 * sd, ((i, j), exact)


def test_rollouts_draw_distinct_sets_while_there_are_enough():
    g = torch.Generator().manual_seed(3)
    s = torch.tensor([3.0, 3.0, -3.0, -3.0])  # draws concentrate on {0, 1}
    for _ in range(20):
        sets = sample_suppression_rollouts(s, 2, 3, g)
        assert len({tuple(t.tolist()) for t in sets}) == 3
    two = sample_suppression_rollouts(torch.zeros(2), 1, 3, g)  # only 2 different sets exist
    assert len(two) == 3 and {tuple(t.tolist()) for t in two} == {(0,), (1,)}


# --- IST: the modifier, driven as the training loop drives it ------------------------------------
def _train_steps(session, model, steps, *, batches=1, check=None):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        session.advance_to(step)
        for a in range(batches):
            batch = _batch(seed=100 * step + a)
            session.event(EventType.BATCH_START, batch=batch)
            loss = session.training.loss(batch)
            event = session.event(EventType.LOSS_COMPUTED, loss=loss, batch=batch)
            (event.loss / batches).backward()
            session.event(EventType.BATCH_END, batch=batch)
        session.event(EventType.OPTIMIZER_PRE_STEP)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}
        optimizer.step()
        if check is not None:
            check(step, before)
        session.event(EventType.OPTIMIZER_POST_STEP)
        optimizer.zero_grad(set_to_none=True)


def _layer(name):
    return int(name.split(".")[2])


def test_each_step_exactly_round_L_update_ratio_layers_get_gradients_and_updates(tiny_llama):
    L = 8
    model = tiny_llama(num_hidden_layers=L)
    ist = ISTModifier(update_ratio=0.25, importance_interval=3, seed=5)
    session = _prepared(model, LoRAModifier(r=2, targets=["q_proj", "v_proj"]), ist)
    assert ist.num_update == round(L * 0.25) == 2
    lora = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    drawn = []

    def check(step, before):
        chosen = ist.trained_layers()
        with_grad = {_layer(n) for n, p in lora.items() if p.grad is not None}
        moved = {_layer(n) for n, p in lora.items() if not torch.equal(before[n], p.detach())}
        assert len(chosen) == 2 and with_grad == set(chosen), (step, chosen, with_grad)
        # every adapter tensor of a drawn layer has a gradient; only drawn layers move
        assert all(p.grad is not None for n, p in lora.items() if _layer(n) in chosen)
        assert moved <= set(chosen) and moved, (step, moved, chosen)
        drawn.append(tuple(chosen))

    _train_steps(session, model, 8, batches=2, check=check)
    assert len(drawn) == 8 and len(set(drawn)) > 2  # the draw changes from step to step
    assert not ist.scores.eq(0).all()  # two importance updates ran (after steps 3 and 6)
    session.finalize()
    assert all(p.requires_grad for p in lora.values())  # every adapter trainable again


def test_draws_are_a_function_of_seed_and_step(tiny_llama):
    def draws(seed):
        ist = ISTModifier(seed=seed)
        _prepared(tiny_llama(num_hidden_layers=8), LoRAModifier(r=2, targets=["q_proj"]), ist)
        return [sorted(ist.layers_to_update(s)) for s in range(6)]

    assert draws(1) == draws(1) != draws(2)


def test_a_harmful_layer_adapter_gets_a_rising_score(tiny_llama):
    L, harmful = 4, 2
    model = tiny_llama(num_hidden_layers=L)
    # A task the base model solves: its own greedy next tokens, with sharpened logits, so the loss
    # starts near 0 and the rewards exp(−loss) differ clearly between rollouts.
    with torch.no_grad():
        model.lm_head.weight.mul_(50)
    batches = []
    for seed in range(12):
        batch = _batch(seed=seed)
        labels = batch["labels"].clone()
        labels[:, 1:] = _logits(model, batch).argmax(-1)[:, :-1]
        batches.append({**batch, "labels": labels.masked_fill(batch["attention_mask"] == 0, -100)})
    ist = ISTModifier(importance_interval=1, rollouts=3, suppress_ratio=0.5, seed=0)
    session = _prepared(model, LoRAModifier(r=4, targets=["Linear"]), ist)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # adapters only in layer 2, random ones that spoil its output
        for name, p in model.named_parameters():
            if f"layers.{harmful}." in name and ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    with ist._suppressed({harmful}):
        helped = session.training.loss(batches[0]).item()
    assert helped < 0.5 * session.training.loss(batches[0]).item()  # suppressing layer 2 helps
    history = [ist.scores]
    for step in range(6):  # importance updates only, on 2 micro-batches each: no optimizer steps
        session.advance_to(step)
        for a in range(2):
            session.event(EventType.BATCH_START, batch=batches[2 * step + a])
        session.event(EventType.OPTIMIZER_POST_STEP)
        history.append(ist.scores)
    harm = [h[harmful].item() for h in history]
    assert all(b >= a for a, b in zip(harm, harm[1:], strict=False)) and harm[-1] > harm[0] + 1.0
    final = history[-1]
    assert final[harmful] == final.max() and (final[torch.arange(L) != harmful] < 0).all(), final
    # a higher score means fewer updates: the harmful layer is now the least likely to train
    assert torch.sigmoid(-final).argmin().item() == harmful


@pytest.mark.parametrize("use_dora", [False, True])
def test_suppression_scales_the_adapter_output_and_is_undone_exactly(tiny_llama, use_dora):
    model = tiny_llama(num_hidden_layers=3)
    ist = ISTModifier(suppress_factor=0.25)
    _prepared(model, LoRAModifier(r=4, targets=["q_proj", "down_proj"], use_dora=use_dora), ist)
    _randomise_adapters(model)
    batch = _batch()
    before = _logits(model, batch)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with ist._suppressed({0, 2}):
        suppressed = _logits(model, batch)
    torch.testing.assert_close(_logits(model, batch), before, rtol=0, atol=0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    # reference: lora_B of layers 0 and 2 multiplied by the factor (the adapter output s·B·A·x)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name and _layer(name) in (0, 2):
                p.mul_(0.25)
    torch.testing.assert_close(suppressed, _logits(model, batch), rtol=0, atol=1e-5)
    assert not torch.allclose(suppressed, before, atol=1e-3)


class _OutputDelta(Modifier):
    """Test modifier: a trainable vector added to each decoder layer's o_proj output."""

    run_types: ClassVar[tuple[str, ...]] = ("finetune",)
    adds_layer_parameters: ClassVar[bool] = True

    def on_prepare(self, session):
        for p in session.model.parameters():
            p.requires_grad_(False)
        for layer in session.model.model.layers:
            proj = layer.self_attn.o_proj
            proj.register_parameter("delta", nn.Parameter(torch.full((proj.out_features,), 0.5)))
            session.register_hook(self, proj, lambda m, a, out: out + m.delta)


def test_suppression_scales_other_delta_parameters_in_place(tiny_llama):
    model = tiny_llama(num_hidden_layers=2)
    ist = ISTModifier(suppress_factor=0.25)
    _prepared(model, _OutputDelta(), ist)
    batch = _batch()
    before = _logits(model, batch)
    with ist._suppressed({1}):
        suppressed = _logits(model, batch)
        assert torch.equal(model.model.layers[1].self_attn.o_proj.delta, torch.full((32,), 0.125))
    assert torch.equal(model.model.layers[1].self_attn.o_proj.delta, torch.full((32,), 0.5))
    torch.testing.assert_close(_logits(model, batch), before, rtol=0, atol=0)
    assert not torch.allclose(suppressed, before, atol=1e-4)


class _FreezesEverything(Modifier):
    run_types: ClassVar[tuple[str, ...]] = ("finetune",)
    adds_layer_parameters: ClassVar[bool] = True

    def on_prepare(self, session):
        for p in session.model.parameters():
            p.requires_grad_(False)


def test_ist_without_per_layer_trainable_parameters_is_a_clear_error(tiny_llama):
    alone = """
finetune_stage:
  run_type: finetune
  modifiers:
    ISTModifier: {}
"""
    with pytest.raises(RecipeError, match="no modifier before it in its stage adds per-layer"):
        load_recipe(alone)
    after = """
finetune_stage:
  run_type: finetune
  ist_modifiers:
    ISTModifier: {}
  lora_modifiers:
    LoRAModifier: {}
"""
    with pytest.raises(RecipeError, match="put a LoRAModifier .* before it"):
        load_recipe(after)
    ok = load_recipe("""
finetune_stage:
  run_type: finetune
  lora_modifiers:
    LoRAModifier: {}
  ist_modifiers:
    ISTModifier: {}
""")
    assert [m.type_name() for m in ok.stages[0].modifiers] == ["LoRAModifier", "ISTModifier"]
    # against the model (a session built without a recipe): no adapters, or none in the layers
    with pytest.raises(RecipeError, match="put a LoRAModifier"):
        _prepared(tiny_llama(), ISTModifier())
    with pytest.raises(ReciPruneError, match="no decoder layer of LlamaForCausalLM has trainable"):
        _prepared(tiny_llama(), _FreezesEverything(), ISTModifier())
    with pytest.raises(ValidationError, match="greater than or equal to 2"):
        ISTModifier(rollouts=1)
    with pytest.raises(ValidationError, match="less than 1"):
        ISTModifier(suppress_ratio=1.0)


def test_scores_survive_a_resume_through_state_dict(tiny_llama):
    model = tiny_llama(num_hidden_layers=4)
    ist = ISTModifier(importance_interval=1)
    session = _prepared(model, LoRAModifier(r=2), ist)
    _randomise_adapters(model)
    _train_steps(session, model, 3)
    state = ist.state_dict()
    fresh = ISTModifier(importance_interval=1)
    _prepared(tiny_llama(num_hidden_layers=4), LoRAModifier(r=2), fresh)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.scores, ist.scores) and not bool(ist.scores.eq(0).all())
    assert all(fresh.layers_to_update(s) == ist.layers_to_update(s) for s in range(5))


# --- end to end: `reciprune finetune` on 1 and 2 processes ---------------------------------------
LORA_RECIPE = """
finetune_stage:
  run_type: finetune
  training:
    dataset: asdiv
    max_seq_length: 96
    per_device_train_batch_size: 2
    learning_rate: 1.0e-2
    lr_scheduler_type: constant
    eval_samples: 4
  adapter_modifiers:
    LoRAModifier:
      r: 4
      alpha: 8
      targets: ["q_proj", "v_proj"]
"""
IST_RECIPE = LORA_RECIPE + """
  ist_modifiers:
    ISTModifier:
      importance_interval: 2
"""


def _finetune(recipe: Path, model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    from conftest import finetune_cli as finetune

    return finetune(recipe, model, out, "--max-steps", "6", "--seed", "3", *extra)


@pytest.mark.parametrize("recipe_text", [LORA_RECIPE, IST_RECIPE], ids=["lora", "lora+ist"])
def test_finetune_one_process_equals_two_fsdp_processes_and_saves_the_plain_model(
    tmp_path, tiny_llama, tiny_tokenizer, recipe_text
):
    base_dir = tmp_path / "base"
    tiny_llama(num_hidden_layers=4).save_pretrained(base_dir)
    tiny_tokenizer.save_pretrained(base_dir)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text)
    one = _finetune(recipe, base_dir, tmp_path / "one", "--gradient-accumulation-steps", "2")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _finetune(recipe, base_dir, tmp_path / "two", "--nproc-per-node", "2")
    assert two.returncode == 0, two.stderr[-3000:]
    curves = [json.loads((tmp_path / o / "reciprune_manifest.json").read_text())["loss_curve"]
              for o in ("one", "two")]  # fmt: skip
    assert len(curves[0]) == len(curves[1]) == 6
    for a, b in zip(*curves, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3), a["step"]
    assert curves[0][-1]["loss"] < curves[0][0]["loss"]

    base = load_file(str(base_dir / "model.safetensors"))
    targeted = {f"model.layers.{i}.self_attn.{m}.weight"
                for i in range(4) for m in ("q_proj", "v_proj")}  # fmt: skip
    for out in ("one", "two"):
        saved = load_file(str(tmp_path / out / "model.safetensors"))
        assert set(saved) == set(base)  # the plain architecture
        changed = {k for k in base if not torch.equal(base[k], saved[k])}
        if recipe_text is LORA_RECIPE:
            assert changed == targeted
        else:  # a layer IST never drew keeps its weights
            assert changed and changed <= targeted
        adapter = load_file(str(tmp_path / out / ADAPTER_FILE))
        assert len(adapter) == 2 * len(targeted)
        assert json.loads((tmp_path / out / ADAPTER_CONFIG_FILE).read_text())["r"] == 4
    one_w = load_file(str(tmp_path / "one" / "model.safetensors"))
    two_w = load_file(str(tmp_path / "two" / "model.safetensors"))
    for key in targeted:
        torch.testing.assert_close(one_w[key], two_w[key], rtol=1e-3, atol=1e-5)


def test_mask_keeping_modifiers_never_target_the_adapters_own_linears(tiny_llama):
    from reciprune.modifiers import ConstantPruningModifier

    model = tiny_llama()
    constant = ConstantPruningModifier(targets=["Linear"])
    _prepared(model, LoRAModifier(r=4), constant)
    names = list(constant.targeted_modules())
    assert names and not [n for n in names if "lora_" in n]
    assert all(n.endswith("base_layer") for n in names)  # the model's own (frozen) weights


def test_ist_accepts_row_sparse_and_sparse_delta_stages():
    for adapter in ("RowSparseFinetuneModifier: {finetuning_rank: 2}",
                    "SparseDeltaModifier: {density: 0.01}"):  # fmt: skip
        recipe = load_recipe(
            f"stage:\n  run_type: finetune\n  a_modifiers:\n    {adapter}\n"
            "  b_modifiers:\n    ISTModifier: {}\n"
        )
        assert recipe.stages[0].modifiers[-1].type_name() == "ISTModifier"
