"""Quantization-aware training: QuantizationModifier in finetune stages.

The straight-through gradients equal a naive reference; training changes the float weights while
the model computes on their fake-quantized values; the saved checkpoint reloads in plain
transformers with the trained model's logits; 2:4 survives; a oneshot GPTQ stage followed by a
QAT stage keeps GPTQ's scales; two FSDP processes train like one.

Round-trip tolerance: 1e-5 absolute on fp32 logits, as in test_quantization (the reloaded
weights are the trained ones rounded on the same scales; only kernels may reorder sums).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from reciprune.algorithms.qat import qat_linear
from reciprune.cli import main
from reciprune.core.events import EventType
from reciprune.core.session import LifecycleSession
from reciprune.errors import RecipeError
from reciprune.export.formats import CheckpointContents
from reciprune.export.save import save_checkpoint
from reciprune.models import load_model
from reciprune.modifiers import ConstantPruningModifier, QuantizationModifier
from reciprune.pipelines.finetune_job import _gather_plain_model

ROUND_TRIP_ATOL = 1e-5
REPO = Path(__file__).resolve().parents[1]


def _args(**fields):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(**fields)


def _w4_group(group_size: int) -> dict:
    weights = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": group_size}
    return {"g": {"weights": weights}}


SCHEMES = {  # id: modifier fields, compressed-tensors format of the saved checkpoint
    "W4A16-g32": ({"config_groups": _w4_group(32)}, "pack-quantized"),
    "W8A8": ({"scheme": "W8A8"}, "int-quantized"),
    "FP8_DYNAMIC": ({"scheme": "FP8_DYNAMIC"}, "float-quantized"),
}


# naive references ------------------------------------------------------------------------------
def _naive_symmetric(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Symmetric int quantization of each run of `group` values of the last dimension, written
    from the formulas: s = max|x| / ((q_max − q_min) / 2), Q = s · clamp(round(x / s))."""
    q_min, q_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    out = torch.empty_like(x)
    flat, result = x.reshape(-1, x.shape[-1]), out.view(-1, x.shape[-1])
    for r in range(flat.shape[0]):
        for g in range(0, flat.shape[1], group):
            v = flat[r, g : g + group]
            s = v.abs().max() / ((q_max - q_min) / 2)
            result[r, g : g + group] = s * torch.clamp(torch.round(v / s), q_min, q_max)
    return out


# the straight-through linear -------------------------------------------------------------------
@pytest.mark.parametrize("inputs", [False, True], ids=["weights-only", "int8-token-inputs"])
def test_ste_gradients_equal_the_float_linear_gradients_at_the_quantized_values(inputs):
    from reciprune.algorithms.observers import observe_weight

    torch.manual_seed(0)
    W = torch.randn(6, 16, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    x = torch.randn(2, 3, 16, requires_grad=True)
    upstream = torch.randn(2, 3, 6)
    w_args = _args(num_bits=4, type="int", strategy="group", group_size=8)
    x_args = _args(num_bits=8, type="int", strategy="token", dynamic=True) if inputs else None
    scale, zero = observe_weight(W.detach(), w_args)
    y = qat_linear(x, W, b, scale, zero, w_args, x_args)
    (y * upstream).sum().backward()

    # Reference: the float linear evaluated at W_q (and x_q) as leaves of their own.
    W_q = _naive_symmetric(W.detach(), 4, 8).requires_grad_()
    x_q = (_naive_symmetric(x.detach(), 8, 16) if inputs else x.detach().clone()).requires_grad_()
    b_ref = b.detach().clone().requires_grad_()
    y_ref = F.linear(x_q, W_q, b_ref)
    (y_ref * upstream).sum().backward()
    assert torch.allclose(y, y_ref, atol=1e-6, rtol=0)
    assert torch.allclose(W.grad, W_q.grad, atol=1e-6, rtol=0)
    assert torch.allclose(x.grad, x_q.grad, atol=1e-6, rtol=0)
    assert torch.allclose(b.grad, b_ref.grad, atol=1e-6, rtol=0)
    assert not torch.equal(W_q.detach(), W.detach())  # the forward really is quantized


# training in a finetune session ----------------------------------------------------------------
def _batches(count: int, generator_seed: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(generator_seed)
    return [torch.randint(0, 320, (2, 16), generator=generator) for _ in range(count)]


def _train(model, modifiers, steps: int = 4, lr: float = 1e-2) -> LifecycleSession:
    """A finetune session driven like the Trainer: prepare, initialize, AdamW steps with the
    optimizer events (so ConstantPruningModifier masks), finalize is left to the caller."""
    session = LifecycleSession(model, modifiers, run_type="finetune")
    session.prepare()
    session.initialize()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for step, ids in enumerate(_batches(steps)):
        session.advance_to(step)
        loss = F.cross_entropy(model(ids).logits[:, :-1].reshape(-1, 320), ids[:, 1:].reshape(-1))
        loss.backward()
        session.event(EventType.OPTIMIZER_PRE_STEP)
        optimizer.step()
        session.event(EventType.OPTIMIZER_POST_STEP)
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return session


def _linears(model) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


def test_training_moves_the_float_weights_and_the_model_computes_on_their_quantized_values(tiny_llama):
    model = tiny_llama()
    before = {n: m.weight.detach().clone() for n, m in _linears(model).items()}
    modifier = QuantizationModifier(config_groups=_w4_group(16))
    _train(model, [modifier])
    ids = _batches(1, generator_seed=9)[0]
    with torch.no_grad():
        logits = model(ids).logits

    # Reference: a plain copy whose decoder weights are the trained ones rounded with the
    # naive formula on scales of the *starting* weights (they are fixed when the stage starts).
    reference = tiny_llama()
    reference.load_state_dict(model.state_dict())
    for name, module in _linears(reference).items():
        start = before[name]
        scale = start.unflatten(-1, (-1, 16)).abs().amax(-1, keepdim=True) / 7.5
        codes = torch.clamp(torch.round(module.weight.detach().unflatten(-1, (-1, 16)) / scale), -8, 7)
        module.weight.data = (codes * scale).flatten(-2)
        assert not torch.equal(_linears(model)[name].weight, start), f"{name} did not train"
    with torch.no_grad():
        assert torch.allclose(logits, reference(ids).logits, atol=1e-5, rtol=0)
    assert set(model.state_dict()) == set(tiny_llama().state_dict())  # plain parameter names


@pytest.mark.parametrize("case", list(SCHEMES))
def test_qat_export_reloads_in_transformers_with_the_trained_logits(case, tiny_llama, tmp_path):
    fields, expected_format = SCHEMES[case]
    model = tiny_llama()
    session = _train(model, [QuantizationModifier(**fields)])
    ids = _batches(1, generator_seed=9)[0]
    with torch.no_grad():
        trained = model(ids).logits
    session.finalize()
    plain, _ = _gather_plain_model(model, session)
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, trained, atol=ROUND_TRIP_ATOL, rtol=0)
    out = save_checkpoint(plain, None, tmp_path / "out", recipe_yaml="", manifest={},
                          contents=CheckpointContents(quantized=True))

    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert saved["format"] == expected_format and "lm_head" in saved["ignore"]
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, trained, atol=ROUND_TRIP_ATOL, rtol=0)
    for name, module in _linears(reloaded).items():  # on the grid, in range
        args = module.quantization_scheme.weights
        scale = module.weight_scale
        if args.strategy == "group":
            codes = module.weight.unflatten(-1, (-1, args.group_size)) / scale.unsqueeze(-1)
        else:
            codes = module.weight / scale
        if args.type == "float":
            assert torch.allclose(codes, codes.to(torch.float8_e4m3fn).float(), rtol=1e-5, atol=0)
            continue
        bound = 2 ** (args.num_bits - 1)
        assert torch.allclose(codes, codes.round(), atol=1e-3), name
        assert codes.round().min() >= -bound and codes.round().max() <= bound - 1, name


def test_sparse_qat_keeps_every_2of4_zero_through_training_and_export(tiny_llama, tmp_path):
    model = tiny_llama()
    with torch.no_grad():
        for module in _linears(model).values():
            groups = module.weight.view(module.weight.shape[0], -1, 4)
            smallest = groups.abs().argsort(dim=-1)[..., :2]
            groups.scatter_(-1, smallest, 0.0)
    zeros = {n: m.weight == 0 for n, m in _linears(model).items()}
    modifiers = [ConstantPruningModifier(), QuantizationModifier(config_groups=_w4_group(32))]
    session = _train(model, modifiers, steps=5)
    session.finalize()
    plain, _ = _gather_plain_model(model, session)
    out = save_checkpoint(plain, None, tmp_path / "out", recipe_yaml="", manifest={},
                          contents=CheckpointContents(quantized=True))
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        reloaded(_batches(1)[0])  # the packed weights are unpacked on the first forward
    for name, module in _linears(reloaded).items():
        W = module.weight
        assert bool((W[zeros[name]] == 0).all()), f"{name}: a pruned weight came back"
        assert bool(((W == 0).view(W.shape[0], -1, 4).sum(-1) >= 2).all()), name
        assert not torch.equal(W, _linears(tiny_llama())[name].weight)


# errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"scheme": "W8A8", "algorithm": "gptq"}, "GPTQ needs calibration"),
        ({"scheme": "FP8"}, "static input scales"),
        ({"scheme": "W8A8", "start": 2}, "remove start/end"),
    ],
)
def test_what_a_finetune_stage_cannot_do_is_refused_before_training(tiny_llama, fields, says):
    session = LifecycleSession(tiny_llama(), [QuantizationModifier(**fields)], run_type="finetune")
    with pytest.raises(RecipeError, match=says):
        session.prepare()


def test_quantization_beside_lora_is_refused_when_the_recipe_loads():
    from reciprune.recipe import load_recipe

    text = (
        "train:\n  run_type: finetune\n  lora_modifiers:\n    LoRAModifier: {r: 4}\n"
        "  quantization_modifiers:\n    QuantizationModifier: {scheme: W8A8}\n"
    )
    with pytest.raises(RecipeError, match="beside LoRAModifier"):
        load_recipe(text)


# a oneshot stage, then QAT ---------------------------------------------------------------------
TWO_STAGES = """
quantization_stage:
  run_type: oneshot
  quantization_modifiers:
    QuantizationModifier:
      algorithm: gptq
      config_groups:
        g: {weights: {num_bits: 4, type: int, strategy: group, group_size: 32}}
qat_stage:
  run_type: finetune
  training:
    dataset: asdiv
    max_seq_length: 160
    per_device_train_batch_size: 2
    max_steps: 4
    learning_rate: 1.0e-2
    eval_samples: 4
  quantization_modifiers:
    QuantizationModifier:
      config_groups:
        g: {weights: {num_bits: 4, type: int, strategy: group, group_size: 32}}
"""


@pytest.fixture(scope="module")
def two_stage_run(tmp_path_factory, tiny_tokenizer) -> Path:
    """`reciprune run` of TWO_STAGES on a tiny Llama (in this process)."""
    from conftest import TINY_LLAMA_CONFIG
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("two_stage")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY_LLAMA_CONFIG)).save_pretrained(root / "model")
    tiny_tokenizer.save_pretrained(root / "model")
    (root / "recipe.yaml").write_text(TWO_STAGES)
    args = ["run", "--recipe", str(root / "recipe.yaml"), "--model", str(root / "model"),
            "--output-dir", str(root / "out"), "--dataset", "asdiv", "--num-calibration-samples",
            "4", "--calibration-seq-length", "32", "--no-eval-ppl", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    return root / "out"


def test_the_qat_stage_starts_exactly_where_the_gptq_stage_ended(two_stage_run):
    oneshot = two_stage_run / "quantization_stage"
    model, _, _ = load_model(str(oneshot), dequantize=True)
    assert not hasattr(model.config, "quantization_config")
    assert all(m.weight.requires_grad and not hasattr(m, "weight_scale") for m in _linears(model).values())
    modifier = QuantizationModifier(config_groups=_w4_group(32))
    session = LifecycleSession(model, [modifier], run_type="finetune")
    session.prepare()
    session.initialize()
    stored = load_file(str(oneshot / "model.safetensors"))
    for name in _linears(model):  # GPTQ's scales, not re-observed ones
        assert torch.equal(modifier._qat[name][0], stored[f"{name}.weight_scale"]), name
        assert session.records[name]["observer"] == "checkpoint"
    ids = _batches(1, generator_seed=9)[0]
    reference = AutoModelForCausalLM.from_pretrained(oneshot).eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_a_oneshot_stage_then_a_qat_stage_runs_and_saves_a_trained_quantized_model(two_stage_run):
    oneshot, qat = two_stage_run / "quantization_stage", two_stage_run / "qat_stage"
    config = json.loads((qat / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    manifest = json.loads((qat / "reciprune_manifest.json").read_text())
    assert len(manifest["loss_curve"]) == 4 and manifest["checkpoint"]["format"] == "pack-quantized"
    before, after = load_file(str(oneshot / "model.safetensors")), load_file(str(qat / "model.safetensors"))
    scales = [k for k in before if k.endswith("weight_scale")]
    assert scales and all(torch.equal(before[k], after[k]) for k in scales)  # one grid throughout
    packed = [k for k in before if k.endswith("weight_packed")]
    assert any(not torch.equal(before[k], after[k]) for k in packed)  # the codes trained
    reloaded = AutoModelForCausalLM.from_pretrained(qat).eval()
    with torch.no_grad():
        assert torch.isfinite(reloaded(_batches(1)[0]).logits).all()


# two processes ---------------------------------------------------------------------------------
QAT_RECIPE = """
qat_stage:
  run_type: finetune
  training:
    dataset: asdiv
    max_seq_length: 160
    per_device_train_batch_size: 2
    learning_rate: 3.0e-3
    lr_scheduler_type: constant
    eval_samples: 0
  quantization_modifiers:
    QuantizationModifier: {scheme: W8A8}
"""


def test_fsdp_two_processes_train_qat_like_one(tmp_path, tiny_llama, tiny_tokenizer):
    from conftest import finetune_cli as _finetune

    model, recipe = tmp_path / "model", tmp_path / "recipe.yaml"
    tiny_llama().save_pretrained(model)
    tiny_tokenizer.save_pretrained(model)
    recipe.write_text(QAT_RECIPE)
    runs = ("one", "two")
    steps = ("--max-steps", "5", "--seed", "5")
    # One process in this one; the torchrun one must be a subprocess.
    assert main(["finetune", "--recipe", str(recipe), "--model", str(model), "--output-dir",
                 str(tmp_path / "one"), "--no-progress", "--no-eval-ppl", *steps,
                 "--gradient-accumulation-steps", "2"]) == 0  # fmt: skip
    two = _finetune(recipe, model, tmp_path / "two", *steps, "--nproc-per-node", "2")
    assert two.returncode == 0, two.stderr[-3000:]
    curves = [json.loads((tmp_path / o / "reciprune_manifest.json").read_text())["loss_curve"] for o in runs]
    assert len(curves[0]) == len(curves[1]) == 5
    for a, b in zip(*curves, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3), a["step"]
    assert curves[0][-1]["loss"] < curves[0][0]["loss"]
    ids = _batches(1)[0]
    logits = []
    for out in runs:
        assert json.loads((tmp_path / out / "config.json").read_text())["quantization_config"]["format"] == "int-quantized"
        with torch.no_grad():
            logits.append(AutoModelForCausalLM.from_pretrained(tmp_path / out).eval()(ids).logits)
    assert torch.allclose(logits[0], logits[1], atol=2e-2, rtol=0)
