"""QuantizationModifier and the weight observers: grids equal naive references, zeros survive,
and the saved compressed-tensors checkpoint reloads in plain transformers with the same logits.

Tolerance of the round trips: the reloaded model's logits equal the fake-quantized model's to
1e-5 absolute (fp32; the dequantized weights are bit-identical, only kernels may reorder sums).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from reciprune.algorithms.observers import fake_quantize_weight, mse_qparams, observe_weight
from reciprune.algorithms.reconstruction import output_error
from reciprune.cli import main
from reciprune.errors import RecipeError, ReciPruneError
from reciprune.modifiers import QuantizationModifier, SparseGPTModifier
from reciprune.pipelines.oneshot import run_oneshot

ROUND_TRIP_ATOL = 1e-5
RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "quantization"


def _args(**weights):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(**weights)


def _int4_group(group_size: int = 8, symmetric: bool = True):
    return _args(num_bits=4, type="int", strategy="group", group_size=group_size, symmetric=symmetric)


# naive references ------------------------------------------------------------------------------
def _naive_int_qparams(w: torch.Tensor, bits: int, symmetric: bool, p: float = 1.0):
    """Scale and zero point of one group of weights, written from the formulas (fp32 scalars)."""
    q_min, q_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    lo = torch.minimum(p * w.min(), torch.zeros(()))
    hi = torch.maximum(p * w.max(), torch.zeros(()))
    if symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) / ((q_max - q_min) / 2)
        zero = torch.zeros(())
    else:
        scale = (hi - lo) / (q_max - q_min)
        zero = torch.round(torch.clamp(q_min - lo / scale, q_min, q_max))
    if scale == 0:
        scale = torch.tensor(torch.finfo(torch.float32).eps)
    return scale, zero


def _naive_int_quantize(w: torch.Tensor, scale, zero, bits: int) -> torch.Tensor:
    q_min, q_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return scale * (torch.clamp(torch.round(w / scale + zero), q_min, q_max) - zero)


def _naive_group_loop(W: torch.Tensor, group_size: int, bits: int, symmetric: bool, p_of=None):
    """Per row, per group: (scales [out, groups], zeros, Q) with an explicit loop."""
    rows, cols = W.shape
    scales = torch.zeros(rows, cols // group_size)
    zeros = torch.zeros(rows, cols // group_size)
    Q = torch.zeros_like(W)
    for r in range(rows):
        for g in range(cols // group_size):
            w = W[r, g * group_size : (g + 1) * group_size]
            p = 1.0 if p_of is None else p_of(w)
            scale, zero = _naive_int_qparams(w, bits, symmetric, p)
            scales[r, g], zeros[r, g] = scale, zero
            Q[r, g * group_size : (g + 1) * group_size] = _naive_int_quantize(w, scale, zero, bits)
    return scales, zeros, Q


# observers -------------------------------------------------------------------------------------
@pytest.mark.parametrize("symmetric", [True, False])
def test_minmax_int4_groups_equal_the_naive_loop(symmetric):
    torch.manual_seed(0)
    W = torch.randn(6, 32)
    args = _int4_group(8, symmetric)
    scale, zero = observe_weight(W, args, "minmax")
    ref_scale, ref_zero, ref_Q = _naive_group_loop(W, 8, 4, symmetric)
    assert scale.shape == (6, 4) and torch.equal(scale, ref_scale)
    assert torch.equal(zero.float(), ref_zero)
    assert torch.equal(fake_quantize_weight(W, scale, zero, args), ref_Q)


def test_minmax_channel_and_tensor_scales_equal_the_naive_formulas():
    torch.manual_seed(1)
    W = torch.randn(5, 16)
    scale, _ = observe_weight(W, _args(num_bits=8, type="int", strategy="channel"), "minmax")
    assert scale.shape == (5, 1)
    for r in range(5):
        assert scale[r, 0] == W[r].abs().max() / 127.5
    fp8 = _args(num_bits=8, type="float", strategy="tensor")
    scale, _ = observe_weight(W, fp8, "minmax")
    assert scale.shape == (1,) and scale[0] == W.abs().max() / 448.0
    naive = (W / scale).to(torch.float8_e4m3fn).float() * scale
    assert torch.equal(fake_quantize_weight(W, scale, torch.zeros(1, dtype=torch.float8_e4m3fn), fp8), naive)


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_observer_equals_a_naive_shrink_search_and_never_loses_to_minmax(symmetric):
    torch.manual_seed(2)
    W = torch.randn(4, 32)
    W[0, :8] *= 6  # an outlier group, where shrinking the range pays off
    args = _int4_group(8, symmetric)

    def best_p(w: torch.Tensor) -> float:
        errors = []
        for i in range(20):  # p = 1, 0.99, ..., 0.81 (maxshrink 0.2, grid 100)
            scale, zero = _naive_int_qparams(w, 4, symmetric, 1 - i / 100)
            errors.append(float((_naive_int_quantize(w, scale, zero, 4) - w).abs().pow(2.4).sum()))
        return 1 - errors.index(min(errors)) / 100  # the first p of the minimum

    scale, zero = mse_qparams(W, args)
    ref_scale, ref_zero, _ = _naive_group_loop(W, 8, 4, symmetric, p_of=best_p)
    assert torch.equal(scale, ref_scale) and torch.equal(zero.float(), ref_zero)
    mm_scale, mm_zero = observe_weight(W, args, "minmax")

    def group_err(s, z):
        err = (fake_quantize_weight(W, s, z, args) - W).abs().pow(2.4)
        return err.reshape(4, 4, 8).sum(-1)

    assert bool((group_err(scale, zero) <= group_err(mm_scale, mm_zero) * (1 + 1e-6)).all())
    assert bool((scale < mm_scale).any())  # the search did shrink somewhere


@pytest.mark.parametrize("symmetric", [True, False])
def test_quantizing_keeps_every_zero_of_a_2of4_weight(symmetric):
    torch.manual_seed(3)
    W = torch.randn(8, 64) + 0.5  # skewed, so the asymmetric zero point is not 0
    W.view(8, 16, 4)[:, :, :2] = 0
    args = _int4_group(16, symmetric)
    for observer in ("minmax", "mse"):
        scale, zero = observe_weight(W, args, observer)
        if not symmetric:
            assert bool((zero != 0).any()) and zero.dtype == torch.int8  # an integer on the grid
        Q = fake_quantize_weight(W, scale, zero, args)
        assert bool((Q[W == 0] == 0).all())
        assert bool(((Q == 0).reshape(8, 16, 4).sum(-1) >= 2).all())


# modifier validation ---------------------------------------------------------------------------
def test_unknown_scheme_is_a_recipe_error_listing_the_schemes():
    from reciprune.recipe import load_recipe

    text = "stage:\n  quantization_modifiers:\n    QuantizationModifier:\n      scheme: W5A5\n"
    with pytest.raises(RecipeError) as info:
        load_recipe(text)
    for name in ("W4A16", "W8A16", "W8A8", "FP8", "FP8_DYNAMIC", "W5A5"):
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({}, "exactly one of scheme"),
        ({"scheme": "W4A16", "actorder": True}, "algorithm: gptq"),
        ({"config_groups": {"g": {"weights": {"num_bits": 4, "strategy": "group"}}}}, "group_size"),
        ({"config_groups": {"g": {"weights": {"num_bits": 8}, "output_activations": {}}}},
         "output activations"),
        ({"config_groups": {"g": {"weights": {"num_bits": 8},
                                  "input_activations": {"strategy": "token"}}}}, "dynamic"),
    ],
)
def test_bad_fields_say_what_to_do(fields, says):
    with pytest.raises(ValueError, match=says):
        QuantizationModifier(**fields)


def test_two_quantization_modifiers_in_one_stage_are_refused():
    from reciprune.recipe import load_recipe

    text = (
        "stage:\n  first_modifiers:\n    QuantizationModifier:\n      scheme: W8A8\n"
        "  second_modifiers:\n    QuantizationModifier:\n      scheme: W4A16\n"
    )
    with pytest.raises(RecipeError, match="one QuantizationModifier"):
        load_recipe(text)


def _group(group_size: int, **extra) -> dict:
    weights = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": group_size}
    return {"g": {"weights": weights, **extra}}


def test_group_size_not_dividing_names_the_modules_before_calibration(tiny_llama):
    model = tiny_llama()  # hidden 32 (q/k/v/o/gate/up inputs), intermediate 64 (down_proj input)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(RecipeError) as info:
        run_oneshot(model, [QuantizationModifier(config_groups=_group(64))], None, progress=False)
    message = str(info.value)
    assert "group_size 64" in message and "model.layers.0.self_attn.q_proj (in 32)" in message
    assert "ignore: ['re:.*\\.(gate_proj|k_proj|o_proj|q_proj|up_proj|v_proj)$']" in message
    assert "e.g. 32" in message and "down_proj" not in message
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # The suggested ignore works: only down_proj is quantized.
    fixed = QuantizationModifier(
        config_groups=_group(64), ignore=["re:.*\\.(gate_proj|k_proj|o_proj|q_proj|up_proj|v_proj)$"]
    )
    run_oneshot(model, [fixed], None, progress=False)
    quantized = {n for n, m in model.named_modules() if hasattr(m, "quantization_scheme")}
    assert quantized == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}


def test_recipe_check_with_a_model_config_raises_the_group_size_error(tiny_llama):
    from reciprune.recipe import describe_plan, load_recipe

    recipe = load_recipe(
        "stage:\n  quantization_modifiers:\n    QuantizationModifier:\n      scheme: W4A16\n"
    )
    with pytest.raises(RecipeError, match="group_size 128 does not divide"):
        describe_plan(recipe, tiny_llama().config)
    assert "QuantizationModifier" in describe_plan(recipe, tiny_llama(hidden_size=128, intermediate_size=256).config)
    plan = describe_plan(load_recipe(RECIPES / "sparsegpt_2of4_w4a16.yaml"), tiny_llama().config)
    assert "SparseGPTModifier: mask_structure=2:4 [uses calibration data]" in plan
    assert "algorithm=gptq, actorder=True [uses calibration data]" in plan


def test_a_pruning_modifier_after_quantization_is_refused(tiny_llama):
    modifiers = [QuantizationModifier(config_groups=_group(16)), SparseGPTModifier(sparsity=0.5)]
    with pytest.raises(RecipeError, match="put the pruning modifier first"):
        run_oneshot(tiny_llama(), modifiers, None, progress=False)


# the oneshot pipeline --------------------------------------------------------------------------
def test_rtn_needs_no_data_and_leaves_the_head_alone(tiny_llama):
    model = tiny_llama()
    head = model.lm_head.weight.clone()
    modifier = QuantizationModifier(config_groups=_group(16))
    assert not modifier.requires_data
    run_oneshot(model, [modifier], None, progress=False)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            assert str(module.quantization_status.value) == "frozen"
            codes = module.weight.unflatten(-1, (-1, 16)) / module.weight_scale.unsqueeze(-1)
            assert torch.allclose(codes, codes.round(), atol=1e-4)
            assert codes.round().min() >= -8 and codes.round().max() <= 7
    assert not hasattr(model.lm_head, "quantization_scheme") and torch.equal(model.lm_head.weight, head)


def test_the_head_is_quantized_only_when_named_and_not_when_tied(tiny_llama):
    model = tiny_llama()
    run_oneshot(model, [QuantizationModifier(config_groups=_group(16), targets=["Linear", "lm_head"])],
                None, progress=False)
    codes = _int4_codes(model.lm_head, 16)
    assert codes.min() >= -8 and codes.max() <= 7
    with pytest.raises(ReciPruneError, match="tie_word_embeddings"):
        run_oneshot(tiny_llama(tie_word_embeddings=True),
                    [QuantizationModifier(config_groups=_group(16), targets=["lm_head"])],
                    None, progress=False)


def test_static_fp8_input_scale_is_the_calibration_absmax_over_448(tiny_llama):
    model = tiny_llama(num_hidden_layers=1)
    torch.manual_seed(4)
    batches = [{"input_ids": torch.randint(0, 320, (2, 12)),
                "attention_mask": torch.ones(2, 12, dtype=torch.long)} for _ in range(3)]
    seen = []
    q_proj = model.model.layers[0].self_attn.q_proj
    weight_absmax = q_proj.weight.abs().max()
    handle = q_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].abs().max()))
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    handle.remove()
    modifier = QuantizationModifier(scheme="FP8")
    assert modifier.requires_data
    run_oneshot(model, [modifier], batches, progress=False)
    assert q_proj.input_scale.shape == (1,)
    assert q_proj.input_scale[0] == torch.stack(seen).max() / 448.0
    assert q_proj.weight_scale[0] == weight_absmax / 448.0


def _batches(count: int = 4, length: int = 16) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(6)
    return [{"input_ids": torch.randint(0, 320, (2, length), generator=generator),
             "attention_mask": torch.ones(2, length, dtype=torch.long)} for _ in range(count)]


def _int4_codes(module: torch.nn.Module, group_size: int) -> torch.Tensor:
    codes = module.weight.unflatten(-1, (-1, group_size)) / module.weight_scale.unsqueeze(-1)
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    return codes.round()


@pytest.mark.parametrize("actorder", [False, True])
def test_gptq_lowers_the_layer_error_below_rtn_on_the_same_grid_format(tiny_llama, actorder):
    dense = tiny_llama()
    layer0 = {n: m for n, m in dense.named_modules()
              if isinstance(m, torch.nn.Linear) and ".layers.0." in n}
    xtx = {n: torch.zeros(m.in_features, m.in_features) for n, m in layer0.items()}

    def accumulate(name: str):
        def hook(_module, args) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            xtx[name].add_(x.T @ x)

        return hook

    hooks = [m.register_forward_pre_hook(accumulate(n)) for n, m in layer0.items()]
    with torch.no_grad():
        for batch in _batches():
            dense(**batch)
    for hook in hooks:
        hook.remove()

    errors = {}
    for algorithm in ("rtn", "gptq"):
        model = tiny_llama()
        extra = {"actorder": actorder} if algorithm == "gptq" else {}
        modifier = QuantizationModifier(config_groups=_group(16), algorithm=algorithm, **extra)
        assert modifier.requires_data == (algorithm == "gptq")
        run_oneshot(model, [modifier], _batches(), progress=False)
        modules = dict(model.named_modules())
        # ‖(W − Q)X‖² over layer 0, whose calibration inputs are the dense model's in both runs.
        errors[algorithm] = sum(
            output_error(layer0[n].weight.detach() - modules[n].weight.detach(), xtx[n])
            for n in layer0
        )
        for name, module in modules.items():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                codes = _int4_codes(module, 16)
                assert codes.min() >= -8 and codes.max() <= 7, name
    assert errors["gptq"] < errors["rtn"]


def test_gptq_after_sparsegpt_keeps_the_2of4_zeros(tiny_llama):
    model = tiny_llama()
    modifiers = [SparseGPTModifier(mask_structure="2:4"),
                 QuantizationModifier(config_groups=_group(16), algorithm="gptq", observer="mse")]
    result = run_oneshot(model, modifiers, _batches(), progress=False)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            zeros = (module.weight == 0).reshape(module.weight.shape[0], -1, 4).sum(-1)
            assert bool((zeros >= 2).all()), name
            _int4_codes(module, 16)
            record = result.records[name]
            assert record["mask_structure"] == "2:4" and record["quantization_algorithm"] == "gptq"


def _per_module_gptq(self, session, modules):
    """Reference for the stacked solves: one `gptq_quantize` per module on its Hessian."""
    from reciprune.algorithms.gptq import gptq_quantize
    from reciprune.algorithms.observers import ObserverColumnQuantizer
    from reciprune.core.quantization_schemes import enum_value

    solved = {}
    for name, module in modules.items():
        args = self._stored[self._assigned[name][0]].weights
        W = module.weight.detach().clone()
        Q, params = gptq_quantize(
            W, session.statistics.hessian(module), ObserverColumnQuantizer(args, self.observer, W.dtype),
            blocksize=self.block_size, percdamp=self.dampening_frac, actorder=self.actorder,
            group_size=args.group_size if enum_value(args.strategy) == "group" else None,
            keep_mask=W != 0,
        )
        solved[name] = (Q, params.scale, params.zero_point)
    return solved


_INT8_CHANNEL = {"num_bits": 8, "type": "int", "strategy": "channel"}
_INT8_TENSOR = {"num_bits": 8, "type": "int", "strategy": "tensor"}
STACKED_GPTQ = {
    # modifiers before the quantization, its settings, solves per layer (rows stacked together)
    "g16-actorder-after-2of4": (
        lambda: [SparseGPTModifier(mask_structure="2:4")],
        {"config_groups": _group(16), "actorder": True, "observer": "mse", "block_size": 24},
        [3, 1, 2, 1],  # q/k/v, o, gate/up, down
    ),
    "q-in-its-own-group": (
        list,
        {"config_groups": {"q": {"targets": ["re:.*q_proj$"], "weights": _INT8_CHANNEL},
                           **_group(16, targets=["Linear"])}},
        [1, 2, 1, 2, 1],  # q and k/v share an input but not a scheme
    ),
    "per-tensor-grids": (list, {"config_groups": {"t": {"weights": _INT8_TENSOR}}}, [1] * 7),
}


def _quantized(case: str, tiny_llama) -> tuple[dict[str, torch.Tensor], dict]:
    before, settings, _ = STACKED_GPTQ[case]
    model = tiny_llama(seed=8)
    modifiers = [*before(), QuantizationModifier(algorithm="gptq", **settings)]
    result = run_oneshot(model, modifiers, _batches(), progress=False)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, result.records


@pytest.mark.parametrize("case", list(STACKED_GPTQ))
def test_gptq_solves_modules_sharing_an_input_and_a_scheme_together_with_per_module_results(
    case, tiny_llama, monkeypatch
):
    import reciprune.algorithms.gptq as gptq_algorithm

    with monkeypatch.context() as patch:
        patch.setattr(QuantizationModifier, "_gptq", _per_module_gptq)
        expected, expected_records = _quantized(case, tiny_llama)
    solves = []
    solve = gptq_algorithm.gptq_quantize_stacked
    monkeypatch.setattr(gptq_algorithm, "gptq_quantize_stacked",
                        lambda Ws, *a, **k: solves.append(len(Ws)) or solve(Ws, *a, **k))
    weights, records = _quantized(case, tiny_llama)
    assert sorted(solves) == sorted(STACKED_GPTQ[case][2] * 2)
    assert weights.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(value, weights[name]), name  # weights, scales and zero points
    assert records == expected_records


# end to end: CLI, compressed-tensors export, reload with transformers ----------------------------
def _model_dir(tmp_path, tiny_llama, tiny_tokenizer, **config) -> Path:
    folder = tmp_path / "model"
    tiny_llama(**config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def _run(recipe_text: str, model: Path, data: tuple[Path, Path], out: Path, monkeypatch) -> dict:
    """`reciprune oneshot` in-process; returns what the fake-quantized model looked like just
    before it was saved (logits on fixed ids, the decoder Linear weights)."""
    import reciprune.pipelines.oneshot as jobs

    recipe = out.parent / "recipe.yaml"
    recipe.write_text(recipe_text)
    real_save = jobs.save_checkpoint
    ids = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(5))
    seen: dict = {"ids": ids}

    def save(model, *args, **kwargs):
        with torch.no_grad():
            seen["logits"] = model(ids).logits
        seen["weights"] = {
            n: m.weight.detach().clone()
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n
        }
        return real_save(model, *args, **kwargs)

    monkeypatch.setattr(jobs, "save_checkpoint", save)
    args = ["oneshot", "--recipe", str(recipe), "--model", str(model), "--dataset", str(data[0]),
            "--num-calibration-samples", "4", "--max-seq-length", "32", "--no-eval-ppl",
            "--output-dir", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    return seen


def _quant_recipe(modifier_yaml: str) -> str:
    return "stage:\n  quantization_modifiers:\n    QuantizationModifier:\n" + modifier_yaml


def _group_yaml(bits: int, group_size: int) -> str:
    return (
        "      config_groups:\n        g:\n          weights: "
        f"{{num_bits: {bits}, type: int, strategy: group, group_size: {group_size}}}\n"
    )


ROUND_TRIPS = {
    # id: (recipe fields, model config, expected format)
    "W8A8": ("      scheme: W8A8\n", {}, "int-quantized"),
    "W4A16-g32-gptq": (_group_yaml(4, 32) + "      algorithm: gptq\n      actorder: true\n", {},
                       "pack-quantized"),
    "W4A16-g128": ("      scheme: W4A16\n      observer: mse\n",
                   {"hidden_size": 128, "intermediate_size": 256}, "pack-quantized"),
    "FP8": ("      scheme: FP8\n", {}, "float-quantized"),
    "FP8_DYNAMIC": ("      scheme: FP8_DYNAMIC\n", {}, "float-quantized"),
    "FP8-weights-only": ("      config_groups:\n        g:\n          weights: {num_bits: 8, "
                         "type: float, strategy: channel}\n", {}, "naive-quantized"),
    # Asymmetric int4: packed zero points do not reload in transformers 5, so one int8 a weight.
    "W4A16-asymmetric": ("      config_groups:\n        g:\n          weights: {num_bits: 4, "
                         "type: int, strategy: group, group_size: 16, symmetric: false}\n", {},
                         "naive-quantized"),
    # Two groups: each is saved with the names of its modules as targets.
    "int8-attention-int4-mlp": (
        "      config_groups:\n        attention:\n          targets: ['re:.*self_attn']\n"
        "          weights: {num_bits: 8, type: int, strategy: channel}\n        mlp:\n"
        "          weights: {num_bits: 4, type: int, strategy: group, group_size: 32}\n",
        {}, "pack-quantized"),
    "W8A16": ("      scheme: W8A16\n", {"hidden_size": 128, "intermediate_size": 256},
              "pack-quantized"),
}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_quantize_save_reload_gives_the_same_logits(case, tmp_path, tiny_llama, tiny_tokenizer, text_files, monkeypatch):
    fields, config, expected_format = ROUND_TRIPS[case]
    model_dir = _model_dir(tmp_path, tiny_llama, tiny_tokenizer, **config)
    out = tmp_path / "out"
    seen = _run(_quant_recipe(fields), model_dir, text_files, out, monkeypatch)

    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert saved["format"] == expected_format and saved["quant_method"] == "compressed-tensors"
    assert "lm_head" in saved["ignore"]
    if len(saved["config_groups"]) > 1:
        targets = {g["weights"]["num_bits"]: g["targets"] for g in saved["config_groups"].values()}
        assert targets[8] == [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkvo"]
        assert targets[4] == [f"model.layers.{i}.mlp.{p}_proj" for i in (0, 1) for p in ("gate", "up", "down")]
    manifest = json.loads((out / "reciprune_manifest.json").read_text())
    weight_bytes = (out / "model.safetensors").stat().st_size
    assert manifest["checkpoint"] == {"format": expected_format, "weight_bytes": weight_bytes}
    dense_bytes = sum(p.numel() * 4 for p in tiny_llama(**config).parameters())
    assert weight_bytes < dense_bytes

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits = reloaded(seen["ids"]).logits
    assert torch.allclose(logits, seen["logits"], atol=ROUND_TRIP_ATOL, rtol=0)

    # Every weight is scale · integer in range (int) or scale · an FP8 value (float).
    modules = dict(reloaded.named_modules())
    for name, before in seen["weights"].items():
        module = modules[name]
        assert torch.equal(module.weight, before), name
        args = module.quantization_scheme.weights
        scale = module.weight_scale
        zero = module.weight_zero_point.float() if not args.symmetric else torch.zeros_like(scale)
        if args.strategy == "group":
            codes = before.unflatten(-1, (-1, args.group_size)) / scale.unsqueeze(-1)
            codes = codes + zero.unsqueeze(-1)
        else:
            codes = before / scale + zero
        if args.type == "int":
            bound = 2 ** (args.num_bits - 1)
            assert torch.allclose(codes, codes.round(), atol=1e-3), name
            assert codes.round().min() >= -bound and codes.round().max() <= bound - 1, name
        else:
            on_grid = codes.to(torch.float8_e4m3fn).float()
            assert torch.allclose(codes, on_grid, rtol=1e-5, atol=0), name


def test_sparsegpt_2of4_then_w4a16_keeps_2of4_after_quantization_and_reload(tmp_path, tiny_llama, tiny_tokenizer, text_files, monkeypatch):
    recipe = (
        "stage:\n  obcq_modifiers:\n    SparseGPTModifier:\n      mask_structure: '2:4'\n"
        "  quantization_modifiers:\n    QuantizationModifier:\n      algorithm: gptq\n"
        + _group_yaml(4, 32)
    )
    model_dir = _model_dir(tmp_path, tiny_llama, tiny_tokenizer)
    out = tmp_path / "out"
    seen = _run(recipe, model_dir, text_files, out, monkeypatch)

    def two_of_four(W: torch.Tensor) -> bool:
        return bool(((W == 0).reshape(W.shape[0], -1, 4).sum(-1) >= 2).all())

    assert seen["weights"] and all(two_of_four(W) for W in seen["weights"].values())
    config = json.loads((out / "config.json").read_text())
    assert config["sparsity_config"]["sparsity_structure"] == "2:4"
    assert config["quantization_config"]["format"] == "pack-quantized"
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(seen["ids"]).logits, seen["logits"], atol=ROUND_TRIP_ATOL, rtol=0)
    modules = dict(reloaded.named_modules())
    for name in seen["weights"]:
        assert two_of_four(modules[name].weight), name
    layer = json.loads((out / "reciprune_manifest.json").read_text())["layers"]["model.layers.1.mlp.down_proj"]
    assert layer["nm"] == "2:4" and layer["quantization"] == "int4 group 32 symmetric"
