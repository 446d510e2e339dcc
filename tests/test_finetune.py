"""`reciprune finetune` / `run`: batches, loss, masks kept, resume after kill -9, FSDP on 2 processes.

The end-to-end tests run the real command line in subprocesses (torchrun for 2 processes) on a
tiny Llama saved with the tiny tokenizer, training on the packaged ASDiv problems.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import finetune_cli as _finetune
from conftest import run_reciprune as _reciprune
from safetensors.torch import load_file

from reciprune.errors import ReciPruneError
from reciprune.pipelines.finetune import BatchPlan, causal_lm_loss, plan_batches
from reciprune.recipe.training import TrainingConfig

TARGETS = ["re:.*self_attn.q_proj", "re:.*self_attn.k_proj", "re:.*self_attn.v_proj",
           "re:.*self_attn.o_proj", "re:.*mlp.gate_proj", "re:.*mlp.up_proj",
           "re:.*mlp.down_proj"]  # fmt: skip

SPARSE_DISTILL_RECIPE = f"""
sparse_finetune_stage:
  run_type: finetune
  training:
    dataset: asdiv
    max_seq_length: 160
    per_device_train_batch_size: 2
    learning_rate: 3.0e-3
    lr_scheduler_type: constant
    max_grad_norm: 1.0
    eval_samples: 8
  constant_modifiers:
    ConstantPruningModifier:
      targets: {TARGETS}
  distillation_modifiers:
    OutputDistillationModifier:
      comparison: square_head
      orig_scale: 1.0
      distill_scale: 1.0
"""

CONSTANT_RECIPE = """
finetune_stage:
  run_type: finetune
  training:
    dataset: asdiv
    max_seq_length: 160
    per_device_train_batch_size: 2
    learning_rate: 3.0e-3
    eval_samples: 8
  constant_modifiers:
    ConstantPruningModifier:
      targets: ["Linear"]
"""


# --- units ------------------------------------------------------------------------------------
def test_one_process_with_accumulation_sees_the_micro_batches_of_two_processes() -> None:
    one = BatchPlan(per_device=2, accumulation=2, world_size=1, num_examples=37, seed=3)
    two = BatchPlan(per_device=2, accumulation=1, world_size=2, num_examples=37, seed=3)
    assert one.global_batch == two.global_batch == 4 and one.steps_per_epoch == 9
    for step in (0, 5, 9, 20):  # 9 and 20 are in later epochs: a new permutation
        single = [one.micro_batch(step, a, 0) for a in range(2)]
        double = [two.micro_batch(step, 0, r) for r in range(2)]
        assert single == double
        assert len(set(sum(single, []))) == 4
    epoch0 = sum((one.micro_batch(s, a, 0) for s in range(9) for a in range(2)), [])
    assert len(set(epoch0)) == 36  # an epoch never repeats an example
    assert one.micro_batch(0, 0, 0) != one.micro_batch(9, 0, 0)


def test_batch_plan_errors_name_the_numbers() -> None:
    config = TrainingConfig(per_device_train_batch_size=4, global_batch_size=12)
    with pytest.raises(ReciPruneError, match="not divisible by 2 processes × 4"):
        plan_batches(config, 100, world_size=2)
    assert plan_batches(config, 100, world_size=3).accumulation == 1
    with pytest.raises(ReciPruneError, match="fewer than one global batch of 8"):
        plan_batches(TrainingConfig(per_device_train_batch_size=8), 5, world_size=1)


def test_causal_lm_loss_is_the_mean_over_label_tokens_of_the_next_token_nll() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, 1], [-100, 2, 6, -100, -100]])
    loss, count = causal_lm_loss(logits, labels)
    terms = []
    for b in range(2):
        for t in range(1, 5):  # token t is predicted from position t-1
            if labels[b, t] != -100:
                terms.append(-F.log_softmax(logits[b, t - 1], -1)[labels[b, t]])
    assert count == len(terms) == 5
    torch.testing.assert_close(loss, torch.stack(terms).mean())


# --- end to end ---------------------------------------------------------------------------------
@pytest.fixture
def model_dirs(tmp_path: Path, tiny_llama, tiny_tokenizer) -> dict[str, Path]:
    """A dense tiny Llama (the teacher) and a 50%-magnitude-pruned copy (the student)."""
    dense = tiny_llama(seed=1)
    dense_dir = tmp_path / "dense"
    dense.save_pretrained(dense_dir)
    tiny_tokenizer.save_pretrained(dense_dir)
    with torch.no_grad():
        for layer in dense.model.layers:
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    w = module.weight
                    w[w.abs() <= w.abs().flatten().kthvalue(w.numel() // 2).values] = 0
    sparse_dir = tmp_path / "sparse"
    dense.save_pretrained(sparse_dir)
    tiny_tokenizer.save_pretrained(sparse_dir)
    return {"dense": dense_dir, "sparse": sparse_dir}


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "reciprune_manifest.json").read_text())


def _zeros(folder: Path) -> dict[str, torch.Tensor]:
    state = load_file(str(folder / "model.safetensors"))
    return {k: v == 0 for k, v in state.items() if k.endswith("proj.weight")}


def _assert_zeros_kept(start: Path, end: Path) -> None:
    before, after = _zeros(start), _zeros(end)
    assert before.keys() == after.keys() and before
    for name, mask in before.items():
        assert mask.float().mean() > 0.45, name
        assert bool(after[name][mask].all()), f"{name}: a pruned weight moved"


@pytest.fixture(scope="module")
def tuned_dirs(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    """The seed tutorial's first two steps on a tiny Llama: a dense model fine-tuned on ASDiv
    (by `reciprune finetune` without a recipe), and a 50%-magnitude-pruned copy of it."""
    from conftest import TINY_LLAMA_CONFIG
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tuned")
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(**TINY_LLAMA_CONFIG)).save_pretrained(root / "init")
    tiny_tokenizer.save_pretrained(root / "init")
    dense = _reciprune(
        "finetune", "--model", str(root / "init"), "--output-dir", str(root / "dense"),
        "--dataset", "asdiv", "--max-seq-length", "160", "--per-device-train-batch-size", "4",
        "--learning-rate", "3e-3", "--max-steps", "40", "--eval-samples", "8", "--no-progress",
        "--no-eval-ppl",
    )  # fmt: skip
    assert dense.returncode == 0, dense.stderr[-3000:]
    curve = _manifest(root / "dense")["loss_curve"]
    assert curve[-1]["loss"] < 0.8 * curve[0]["loss"], "the dense fine-tune did not learn"
    model = LlamaForCausalLM.from_pretrained(root / "dense")
    with torch.no_grad():
        for module in model.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight
                w[w.abs() <= w.abs().flatten().kthvalue(w.numel() // 2).values] = 0
    model.save_pretrained(root / "sparse")
    tiny_tokenizer.save_pretrained(root / "sparse")
    return {"dense": root / "dense", "sparse": root / "sparse"}


def test_fsdp_two_processes_keep_every_zero_and_match_one_process(tmp_path, tuned_dirs) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(SPARSE_DISTILL_RECIPE)
    common = ["--distill-teacher", str(tuned_dirs["dense"]), "--max-steps", "20", "--seed", "7"]
    one = _finetune(recipe, tuned_dirs["sparse"], tmp_path / "one", *common,
                    "--gradient-accumulation-steps", "2")  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two = _finetune(recipe, tuned_dirs["sparse"], tmp_path / "two", *common,
                    "--nproc-per-node", "2")  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    for out in ("one", "two"):
        _assert_zeros_kept(tuned_dirs["sparse"], tmp_path / out)
    m1, m2 = _manifest(tmp_path / "one"), _manifest(tmp_path / "two")
    assert m1["world_size"] == 1 and m2["world_size"] == 2
    curve1, curve2 = m1["loss_curve"], m2["loss_curve"]
    assert len(curve1) == len(curve2) == 20
    for key in ("task_loss", "distill_loss"):
        first = sum(r[key] for r in curve1[:3]) / 3
        last = sum(r[key] for r in curve1[-3:]) / 3
        assert last < 0.9 * first, f"{key} did not fall: {first:.4f} -> {last:.4f}"
        for a, b in zip(curve1, curve2, strict=True):
            assert b[key] == pytest.approx(a[key], rel=2e-3), (key, a["step"])
    assert (tmp_path / "two" / "loss_curve.png").stat().st_size > 1000
    assert not (tmp_path / "two.checkpoints").exists()


def test_resume_after_kill_9_continues_with_the_same_losses(tmp_path, model_dirs) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(CONSTANT_RECIPE)
    args = ["--max-steps", "10", "--save-steps", "4", "--seed", "3", "--lr-scheduler-type",
            "cosine", "--warmup-steps", "2"]  # fmt: skip
    full = _finetune(recipe, model_dirs["sparse"], tmp_path / "full", *args)
    assert full.returncode == 0, full.stderr[-3000:]

    # killed after 6 steps: one save (4)
    killed = _finetune(recipe, model_dirs["sparse"], tmp_path / "resumed", *args, kill_after_step=5)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "resumed").exists()
    checkpoints = sorted((tmp_path / "resumed.checkpoints").glob("step-*"))
    assert [p.name for p in checkpoints] == ["step-0000004"]

    again = _finetune(recipe, model_dirs["sparse"], tmp_path / "resumed", *args)
    assert again.returncode != 0 and "--resume" in again.stderr  # refuses to start over silently
    resumed = _finetune(recipe, model_dirs["sparse"], tmp_path / "resumed", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _manifest(tmp_path / "full")["loss_curve"], _manifest(tmp_path / "resumed")["loss_curve"]
    assert [r["step"] for r in b] == list(range(1, 11))
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), x["step"]
        assert y["lr"] == pytest.approx(x["lr"], rel=1e-9)
    _assert_zeros_kept(model_dirs["sparse"], tmp_path / "resumed")
    full_state = load_file(str(tmp_path / "full" / "model.safetensors"))
    resumed_state = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    for name, tensor in full_state.items():
        torch.testing.assert_close(resumed_state[name], tensor, rtol=1e-5, atol=1e-6)


# --- bad inputs: each a clear error before training starts, nothing written ------------------
DISTILL_ONLY = """
finetune_stage:
  run_type: finetune
  distillation_modifiers:
    OutputDistillationModifier:
      targets: {targets}
"""


def _bad_finetune(tmp_path, capsys, model: Path, *extra: str, recipe: str | None = None) -> str:
    from reciprune.cli import main

    args = ["finetune", "--model", str(model), "--output-dir", str(tmp_path / "out"),
            "--no-progress", "--no-eval-ppl", "--max-steps", "2", "--eval-samples", "2",
            "--max-seq-length", "160", "--per-device-train-batch-size", "2"]  # fmt: skip
    if recipe is not None:
        (tmp_path / "recipe.yaml").write_text(recipe)
        args += ["--recipe", str(tmp_path / "recipe.yaml")]
    assert main([*args, *extra]) == 2
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.checkpoints").exists()
    return " ".join(capsys.readouterr().err.split())


@pytest.fixture
def tiny_dir(tmp_path, tiny_llama, tiny_tokenizer):
    def save(name: str, **overrides) -> Path:
        folder = tmp_path / name
        tiny_llama(**overrides).save_pretrained(folder)
        tiny_tokenizer.save_pretrained(folder)
        return folder

    return save


def test_a_shallower_teacher_than_the_targets_need_is_refused(tmp_path, capsys, tiny_dir):
    student, teacher = tiny_dir("student", num_hidden_layers=2), tiny_dir("teacher", num_hidden_layers=1)
    err = _bad_finetune(tmp_path, capsys, student, "--dataset", "asdiv", "--distill-teacher",
                        str(teacher), recipe=DISTILL_ONLY.format(targets="null"))  # fmt: skip
    assert "has no module 'model.layers.1'" in err and "1 decoder layers" in err


def test_a_teacher_with_another_vocabulary_is_refused_for_logits(tmp_path, capsys, tiny_dir):
    student, teacher = tiny_dir("student"), tiny_dir("teacher", vocab_size=400)
    err = _bad_finetune(tmp_path, capsys, student, "--dataset", "asdiv", "--distill-teacher",
                        str(teacher), recipe=DISTILL_ONLY.format(targets="[logits]"))  # fmt: skip
    assert "400 entries (vocabulary)" in err and "same tokenizer" in err


def test_a_distillation_recipe_without_a_teacher_says_how_to_give_one(tmp_path, capsys, tiny_dir):
    err = _bad_finetune(tmp_path, capsys, tiny_dir("student"), "--dataset", "asdiv",
                        recipe=DISTILL_ONLY.format(targets="null"))  # fmt: skip
    assert "--distill-teacher" in err


def test_a_dataset_missing_the_columns_of_its_format_is_refused(tmp_path, capsys, tiny_dir):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"question": "What is 2 + 2?", "solution": "4"}\n' * 20)
    err = _bad_finetune(tmp_path, capsys, tiny_dir("model"), "--dataset", str(data),
                        "--data-format", "question_answer")  # fmt: skip
    assert "lacks the column 'answer'" in err and "columns: question, solution" in err


def test_an_empty_dataset_is_refused(tmp_path, capsys, tiny_dir):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    err = _bad_finetune(tmp_path, capsys, tiny_dir("model"), "--dataset", str(data))
    assert "empty.jsonl" in err and "is empty: it has no rows" in err


def test_a_sequence_length_below_two_is_refused(tmp_path, capsys, tiny_dir):
    err = _bad_finetune(tmp_path, capsys, tiny_dir("model"), "--dataset", "asdiv",
                        "--max-seq-length", "1")  # fmt: skip
    assert "--max-seq-length (Tokens per training sequence)" in err and "greater than or equal to 2" in err


def test_a_global_batch_the_processes_cannot_share_is_refused_before_they_start(
    tmp_path, capsys, tiny_dir, monkeypatch
):

    def no_launch(*args, **kwargs):
        raise AssertionError("torchrun was started")

    monkeypatch.setattr(subprocess, "call", no_launch)
    err = _bad_finetune(tmp_path, capsys, tiny_dir("model"), "--dataset", "asdiv",
                        "--global-batch-size", "6", "--nproc-per-node", "4")  # fmt: skip
    assert "global batch size 6 is not divisible by 4 processes × 2" in err


# --- the prepare / export contract of modifiers that add parameters ----------------------------
@pytest.fixture
def row_gain_modifier():
    """A modifier that trains a per-row gain g of one Linear (h = (1 + g) ⊙ Wx) and freezes the
    rest: it adds a parameter in on_prepare and folds it into W (diag(1 + g) W) at export."""
    from typing import ClassVar

    from safetensors.torch import save

    from reciprune.modifiers.base import Modifier
    from reciprune.modifiers.registry import _REGISTRY, register_modifier

    class RowGainModifier(Modifier):
        """Test modifier: one trainable gain per output row of one Linear."""

        module: str = "model.layers.0.mlp.down_proj"
        run_types: ClassVar[tuple[str, ...]] = ("finetune",)

        def on_prepare(self, session) -> None:
            for param in session.model.parameters():
                param.requires_grad_(False)
            linear = session.model.get_submodule(self.module)
            linear.register_parameter("row_gain", torch.nn.Parameter(torch.zeros(linear.out_features)))
            session.register_hook(self, linear, lambda m, args, out: out * (1 + m.row_gain))

        def export_files(self, state):
            return {"row_gain.safetensors": save({"gain": state[f"{self.module}.row_gain"]})}

        def export_state(self, state):
            gain = state.pop(f"{self.module}.row_gain")
            weight = state[f"{self.module}.weight"]
            state[f"{self.module}.weight"] = weight * (1 + gain)[:, None].to(weight.dtype)
            return state

    register_modifier(RowGainModifier)
    yield RowGainModifier
    _REGISTRY.pop("RowGainModifier")


def test_a_modifier_adds_parameters_before_training_and_folds_them_in_at_export(
    tmp_path, tiny_dir, row_gain_modifier
):
    from safetensors.torch import load as load_bytes

    from reciprune.cli import main

    start = tiny_dir("model")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("gain_stage:\n  run_type: finetune\n  gain_modifiers:\n    RowGainModifier: {}\n")
    out = tmp_path / "out"
    args = ["finetune", "--recipe", str(recipe), "--model", str(start), "--output-dir", str(out),
            "--dataset", "asdiv", "--max-seq-length", "160", "--per-device-train-batch-size", "2",
            "--learning-rate", "0.05", "--max-steps", "6", "--eval-samples", "2", "--no-progress",
            "--no-eval-ppl"]  # fmt: skip
    assert main(args) == 0
    before, after = load_file(str(start / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()  # the plain architecture: no added name survives
    name = "model.layers.0.mlp.down_proj.weight"
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [name]
    gain = load_bytes((out / "row_gain.safetensors").read_bytes())["gain"]
    assert gain.abs().max() > 0
    torch.testing.assert_close(after[name], before[name] * (1 + gain)[:, None])
