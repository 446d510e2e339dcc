"""Recipes: every form parses to the same Recipe, bad recipes fail with their location first."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import GPT2Config, LlamaConfig

from reciprune.errors import RecipeError
from reciprune.modifiers import (
    ConstantPruningModifier,
    SparseGPTModifier,
    WandaModifier,
)
from reciprune.recipe import Recipe, Stage, apply_overrides, describe_plan, load_recipe

BAD_RECIPES = sorted((Path(__file__).parent / "bad_recipes").glob("*.yaml"))

SEED = r"""
pruning_stage:
  obcq_modifiers:
    SparseGPTModifier:
      sparsity: 0.5
      block_size: 128
      sequential_update: False
      quantize: False
      percdamp: 0.01
      targets: ["re:model.layers.\\d+$"]
"""

SEED_EXPLICIT = r"""
stages:
  - name: pruning_stage
    run_type: oneshot
    modifiers:
      - type: SparseGPTModifier
        sparsity: 0.5
        block_size: 128
        dampening_frac: 0.01
        targets: ["re:model.layers.\\d+$"]
"""

TUTORIAL = """
sparsity_stage:
  run_type: oneshot
  sparsity_modifiers:
    SparseGPTModifier:
      sparsity: 0.5
      mask_structure: "2:4"
      sequential_update: false
finetuning_stage:
  run_type: train
  pruning_modifiers:
    ConstantPruningModifier:
      targets: ['re:.*q_proj.weight', 're:.*k_proj.weight', 're:.*down_proj.weight']
      start: 0
another_training_stage:
  pruning_modifiers:
    ConstantPruningModifier:
      start: 0
"""


def tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )


def expected_substrings(path: Path) -> list[str]:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# expect:"), f"{path.name} needs an '# expect:' first line"
    return [part.strip() for part in first.removeprefix("# expect:").split(" | ")]


# bad recipes -----------------------------------------------------------------------------------
def test_there_are_enough_bad_recipes() -> None:
    assert len(BAD_RECIPES) >= 18


@pytest.mark.parametrize("path", BAD_RECIPES, ids=[p.stem for p in BAD_RECIPES])
def test_bad_recipe_fails_with_location_and_advice(path: Path) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    for expected in expected_substrings(path):
        assert expected in message, f"{expected!r} not in: {message}"
    assert "\n" not in message, "one paragraph"
    assert "pydantic" not in message and "For further information" not in message


def test_missing_file_is_a_recipe_error(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe("hf:org/recipe.yaml")  # one line with ':' that is no file is still a path


# good recipes ----------------------------------------------------------------------------------
def test_seed_recipe_parses_as_written_and_equals_its_explicit_form(tmp_path: Path) -> None:
    path = tmp_path / "seed.yaml"
    path.write_text(SEED, encoding="utf-8")
    recipe = load_recipe(path)
    assert recipe == load_recipe(SEED_EXPLICIT)
    (stage,) = recipe.stages
    assert (stage.name, stage.run_type) == ("pruning_stage", "oneshot")
    (modifier,) = stage.modifiers
    assert isinstance(modifier, SparseGPTModifier)
    assert modifier.dampening_frac == 0.01  # percdamp
    assert modifier.targets == [r"re:model.layers.\d+$"]


def test_shipped_recipes_parse() -> None:
    root = Path(__file__).parents[1] / "recipes"
    paths = sorted(root.glob("*/*.yaml"))
    for path in paths:
        assert load_recipe(path).stages, path


def test_tutorial_shape_keeps_stage_order_and_run_types() -> None:
    recipe = load_recipe(TUTORIAL)
    assert [s.name for s in recipe.stages] == [
        "sparsity_stage",
        "finetuning_stage",
        "another_training_stage",
    ]
    assert [s.run_type for s in recipe.stages] == ["oneshot", "finetune", "finetune"]
    assert recipe.stages[0].modifiers[0].mask_structure == "2:4"
    constant = recipe.stages[1].modifiers[0]
    assert isinstance(constant, ConstantPruningModifier)
    assert constant.start == 0 and constant.targets[0] == "re:.*q_proj.weight"


def test_plain_list_forms_make_one_default_stage() -> None:
    as_mapping = load_recipe("modifiers:\n  - type: WandaModifier\n    sparsity: 0.4\n")
    as_list = load_recipe("- type: WandaModifier\n  sparsity: 0.4\n")
    as_groups = load_recipe("pruning_modifiers:\n  WandaModifier: {sparsity: 0.4}\n")
    expected = Recipe(
        stages=[Stage(name="default", run_type="oneshot", modifiers=[WandaModifier(sparsity=0.4)])]
    )
    assert as_mapping == as_list == as_groups == expected


def test_run_type_is_inferred_from_modifiers_and_name() -> None:
    recipe = load_recipe(
        "prune:\n  m_modifiers:\n    MagnitudePruningModifier: {}\n"
        "train_stage:\n  m_modifiers:\n    MagnitudePruningModifier: {}\n"
    )
    assert [s.run_type for s in recipe.stages] == ["oneshot", "finetune"]


def test_group_as_list_of_single_key_mappings() -> None:
    recipe = load_recipe(
        "s:\n  obcq_modifiers:\n    - SparseGPTModifier: {sparsity: 0.3}\n"
        "    - type: WandaModifier\n"
    )
    assert [type(m) for m in recipe.stages[0].modifiers] == [SparseGPTModifier, WandaModifier]


@pytest.mark.parametrize(
    "text",
    [
        SEED,
        TUTORIAL,
        "s:\n  g_modifiers:\n    WandaModifier: {mask_structure: '1:4'}\n",
        "s:\n  g_modifiers:\n    SparseGPTModifier:\n      sparsity: {'re:.*mlp.*': 0.6, default: 0.4}\n",
        "s:\n  g_modifiers:\n    MagnitudePruningModifier: {sparsity: [0.3, 0.5], end: -1}\n",
    ],
)
def test_to_yaml_round_trips(text: str) -> None:
    recipe = load_recipe(text)
    dumped = recipe.to_yaml()
    assert load_recipe(dumped) == recipe
    assert dumped.startswith("stages:")


def test_to_yaml_says_every_field() -> None:
    dumped = load_recipe(SEED).to_yaml()
    for name in SparseGPTModifier.model_fields:
        assert f"{name}:" in dumped


def test_stage_lookup_and_select() -> None:
    recipe = load_recipe(TUTORIAL)
    assert recipe.stage("finetuning_stage").run_type == "finetune"
    assert recipe.select("finetuning_stage").stages == [recipe.stage("finetuning_stage")]
    assert recipe.select(None) is recipe
    with pytest.raises(RecipeError, match="sparsity_stage, finetuning_stage, another_training"):
        recipe.stage("nope")


# overrides -------------------------------------------------------------------------------------
def test_overrides_change_fields_and_are_validated() -> None:
    recipe = load_recipe(SEED, ["pruning_stage.SparseGPTModifier.sparsity=0.6"])
    assert recipe.stages[0].modifiers[0].sparsity == 0.6
    short = load_recipe(SEED, ["SparseGPTModifier.targets=[Linear]", "SparseGPTModifier.end=-1"])
    assert short.stages[0].modifiers[0].targets == ["Linear"]
    # a new-name override replaces the legacy spelling written in the file
    renamed = load_recipe(SEED, ["SparseGPTModifier.dampening_frac=0.05"])
    assert renamed.stages[0].modifiers[0].dampening_frac == 0.05
    again = apply_overrides(recipe, ["pruning_stage.SparseGPTModifier.block_size=64"])
    assert again.stages[0].modifiers[0].block_size == 64
    assert again.stages[0].modifiers[0].sparsity == 0.6


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("nope.SparseGPTModifier.sparsity=0.5", "no stage named 'nope'"),
        ("sparsity_stage.WandaModifier.sparsity=0.5", "Its modifiers are: SparseGPTModifier"),
        ("SparseGPTModifier.sparsity=0.5", "say which one"),
        ("sparsity_stage.SparseGPTModifier.sparsity", "stage.Modifier.field=value"),
        ("sparsity_stage.SparseGPTModifier.sparsity=[0.5", "not valid YAML"),
    ],
)
def test_bad_overrides_say_what_exists(override: str, expected: str) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(TUTORIAL, [override])
    assert str(info.value).startswith("--set ")
    assert expected in str(info.value)


def test_override_with_bad_value_names_the_path_and_the_override() -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(SEED, ["SparseGPTModifier.sparsity=1.5"])
    message = str(info.value)
    assert "pruning_stage › obcq_modifiers › SparseGPTModifier › sparsity:" in message
    assert "--set 'SparseGPTModifier.sparsity=1.5'" in message


# plan ------------------------------------------------------------------------------------------
def test_plan_lists_targeted_modules_and_parameter_share() -> None:
    plan = describe_plan(load_recipe(SEED), tiny_llama_config())
    assert "Stage 1/1 'pruning_stage' (oneshot)" in plan
    assert "7 modules × 2 layers: self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj" in plan
    # per layer: q 32·32 + k 32·16 + v 32·16 + o 32·32 + gate/up/down 3 · 32·64 = 9,216
    assert "18,432 weights" in plan
    assert "26,784 parameters" in plan  # embeddings 2 · 128·32 + layers + norms
    assert "68.8% of the model's parameters" in plan
    assert "block_size" not in plan  # left at its default


def test_plan_without_config_lists_stages_and_changed_settings() -> None:
    plan = describe_plan(load_recipe(TUTORIAL), None)
    assert "Stage 2/3 'finetuning_stage' (finetune)" in plan
    assert "mask_structure=2:4" in plan


def test_plan_groups_layers_that_differ() -> None:
    recipe = load_recipe(
        "s:\n  g_modifiers:\n    WandaModifier:\n      ignore: ['re:model.layers.1.mlp.*']\n"
    )
    plan = describe_plan(recipe, tiny_llama_config())
    assert "7 modules × 1 layer (0): self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj" in plan
    assert "4 modules × 1 layer (1): self_attn.{q,k,v,o}_proj" in plan


def test_plan_targets_gpt2_conv1d_through_linear() -> None:
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=128, bos_token_id=0, eos_token_id=0
    )
    plan = describe_plan(load_recipe("- type: WandaModifier\n"), config)
    assert "4 modules × 2 layers: attn.c_{attn,proj}, mlp.c_{fc,proj}" in plan


def test_plan_rejects_targets_that_match_nothing() -> None:
    recipe = load_recipe("s:\n  g_modifiers:\n    WandaModifier: {targets: [LlamaAtention]}\n")
    with pytest.raises(RecipeError) as info:
        describe_plan(recipe, tiny_llama_config())
    message = str(info.value)
    assert message.startswith("stage 's' › WandaModifier › targets: 'LlamaAtention' matches no")
    assert "LlamaAttention" in message


def test_plan_rejects_a_sparsity_list_of_the_wrong_length() -> None:
    recipe = load_recipe("s:\n  g_modifiers:\n    WandaModifier: {sparsity: [0.5, 0.5, 0.5]}\n")
    with pytest.raises(RecipeError, match="3 values but the model has 2 decoder layers"):
        describe_plan(recipe, tiny_llama_config())


def test_parse_and_plan_never_load_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", refuse)
    recipe = load_recipe(SEED, ["SparseGPTModifier.sparsity=0.6"])
    assert "7 modules" in describe_plan(recipe, tiny_llama_config())
