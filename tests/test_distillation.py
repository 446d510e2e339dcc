"""Distillation: the losses against naive loops, and the modifier driven the way training drives it."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from reciprune.algorithms import magnitude_prune
from reciprune.algorithms.distillation import (
    COMPARISONS,
    cosine_loss,
    kl_divergence_loss,
    mse_loss,
    square_head_loss,
)
from reciprune.core.events import EventType
from reciprune.core.session import LifecycleSession
from reciprune.errors import ReciPruneError
from reciprune.modifiers import OutputDistillationModifier, get_modifier_class

# ---------------------------------------------------------------------------------------------
# naive references: explicit loops over tokens, padding skipped


def _tokens(mask):
    B, T = mask.shape
    return [(b, i) for b in range(B) for i in range(T) if mask[b, i]]


def naive_square_head(s, t, mask):
    num = den = 0.0
    for b, i in _tokens(mask):
        for h in range(s.shape[-1]):
            num += (t[b, i, h].item() - s[b, i, h].item()) ** 2
            den += t[b, i, h].item() ** 2
    return num / den


def naive_kl(s, t, mask, T=1.0):
    total, tokens = 0.0, _tokens(mask)
    for b, i in tokens:
        zs = [x / T for x in s[b, i].tolist()]
        zt = [x / T for x in t[b, i].tolist()]
        log_zs = math.log(sum(math.exp(z) for z in zs))
        log_zt = math.log(sum(math.exp(z) for z in zt))
        for a, c in zip(zs, zt, strict=True):
            log_q, log_p = a - log_zs, c - log_zt
            total += math.exp(log_p) * (log_p - log_q)
    return total / len(tokens) * T * T


def naive_mse(s, t, mask):
    total, tokens = 0.0, _tokens(mask)
    for b, i in tokens:
        total += sum((x - y) ** 2 for x, y in zip(s[b, i].tolist(), t[b, i].tolist(), strict=True))
    return total / (len(tokens) * s.shape[-1])


def naive_cosine(s, t, mask):
    total, tokens = 0.0, _tokens(mask)
    for b, i in tokens:
        x, y = s[b, i].tolist(), t[b, i].tolist()
        dot = sum(a * c for a, c in zip(x, y, strict=True))
        total += 1 - dot / (math.sqrt(sum(a * a for a in x)) * math.sqrt(sum(c * c for c in y)))
    return total / len(tokens)


NAIVE = {
    "square_head": naive_square_head,
    "kl_divergence": naive_kl,
    "mse": naive_mse,
    "cosine": naive_cosine,
}


def _padded_pair(seed=0, B=2, T=5, H=6):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(B, T, H, generator=g), torch.randn(B, T, H, generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 3:] = 0
    mask[1, 4:] = 0
    # padding positions hold huge values: counting any of them would dominate every loss
    s[mask == 0] = 1e3
    t[mask == 0] = -1e3
    return s, t, mask


@pytest.mark.parametrize("name", sorted(COMPARISONS))
def test_each_loss_equals_the_naive_loop_and_ignores_padding(name):
    s, t, mask = _padded_pair()
    got = COMPARISONS[name](s, t, mask)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(NAIVE[name](s, t, mask), rel=1e-5)
    # a bool mask means the same; bf16 inputs are compared in fp32
    assert COMPARISONS[name](s, t, mask.bool()).item() == pytest.approx(got.item(), rel=1e-6)
    s16, t16 = s.bfloat16(), t.bfloat16()
    low = COMPARISONS[name](s16, t16, mask)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(NAIVE[name](s16.float(), t16.float(), mask), rel=1e-5)


def test_no_mask_counts_every_token():
    s, t, _ = _padded_pair()
    s, t = s[:, :3], t[:, :3]
    full = torch.ones(2, 3, dtype=torch.long)
    for name, fn in COMPARISONS.items():
        assert fn(s, t).item() == pytest.approx(NAIVE[name](s, t, full), rel=1e-5)


@pytest.mark.parametrize("T", [0.5, 2.0, 4.0])
def test_kl_divergence_is_teacher_to_student_times_t_squared(T):
    s, t, mask = _padded_pair(seed=1)
    assert kl_divergence_loss(s, t, mask, temperature=T).item() == pytest.approx(
        naive_kl(s, t, mask, T), rel=1e-5
    )
    # direction: KL(p_teacher || q_student), not the reverse
    assert kl_divergence_loss(s, t, mask).item() != pytest.approx(kl_divergence_loss(t, s, mask).item())


def test_losses_vanish_when_student_equals_teacher_and_only_the_student_gets_gradients():
    s, t, mask = _padded_pair(seed=2)
    for fn in (square_head_loss, kl_divergence_loss, mse_loss, cosine_loss):
        assert fn(t.clone(), t, mask).item() == pytest.approx(0.0, abs=1e-6)
        student = s.clone().requires_grad_()
        teacher = t.clone().requires_grad_()
        fn(student, teacher, mask).backward()
        assert student.grad is not None and teacher.grad is None
        assert bool((student.grad[mask == 0] == 0).all())  # padding gets no gradient


# ---------------------------------------------------------------------------------------------
# chunked fp32 computation: values and gradients against float64 references, bounded memory


def reference64(name, s, t, mask, temperature=1.0):
    """The loss from its formula in float64 over the selected non-padding rows."""
    keep = torch.ones(s.shape[:-1], dtype=torch.bool) if mask is None else mask.bool()
    s, t = s.double()[keep], t.double()[keep]
    if name == "square_head":
        return (t - s).square().sum() / t.square().sum()
    if name == "mse":
        return (s - t).square().mean()
    if name == "cosine":
        return (1 - (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))).mean()
    T = temperature
    log_p, log_q = (t / T).log_softmax(-1), (s / T).log_softmax(-1)
    return T * T * (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def _value_and_grad(fn, s, t, mask, upstream=1.7, **kwargs):
    """fn's value and its gradient w.r.t. the student under an upstream gradient."""
    student, teacher = s.clone().requires_grad_(), t.clone()
    loss = fn(student, teacher, mask, **kwargs)
    (upstream * loss).backward()
    assert torch.equal(student.detach(), s) and torch.equal(teacher, t)  # inputs untouched
    return loss, student.grad


def _reference_value_and_grad(name, s, t, mask, upstream=1.7, **kwargs):
    student = s.double().requires_grad_()
    loss = reference64(name, student, t, mask, **kwargs)
    (grad,) = torch.autograd.grad(upstream * loss, student)
    return loss, grad


def _ragged(seed=3, B=3, T=7, D=10, dtype=torch.float32):
    """21 tokens of 3 sequences padded at 5, 7 and 2 tokens; padding holds huge values."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(B, T, D, generator=g)
    s = t + 0.5 * torch.randn(B, T, D, generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 2:] = 0
    s[mask == 0], t[mask == 0] = 1e3, -1e3
    return s.to(dtype), t.to(dtype), mask


@pytest.mark.parametrize("chunk_size", [1, 4, 5, None])  # 21 tokens: chunks cut sequences
@pytest.mark.parametrize("name", sorted(COMPARISONS))
def test_value_and_student_gradient_equal_the_float64_reference_for_any_chunking(name, chunk_size):
    s, t, mask = _ragged()
    kwargs = {"temperature": 2.0} if name == "kl_divergence" else {}
    for m in (mask, None):
        if m is None:  # no mask: every position counts, so no huge padding values
            s, t = s[:, :2], t[:, :2]
        loss, grad = _value_and_grad(COMPARISONS[name], s, t, m, chunk_size=chunk_size, **kwargs)
        ref_loss, ref_grad = _reference_value_and_grad(name, s, t, m, **kwargs)
        assert loss.dtype == torch.float32 and grad.dtype == torch.float32
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
        scale = ref_grad.abs().max().item()
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6 * scale)
        if m is not None:
            assert bool((grad[m == 0] == 0).all())


def test_a_bf16_square_head_term_equals_the_float32_reference_within_bf16_tolerance():
    """bf16 keeps 8 significant bits, so rounding moves each input by up to 2⁻⁹ relative. With
    the student within ~0.2 of unit-scale teacher values, one (t − s)² moves by up to
    ~2⁻⁷·|t|/|t − s| ≈ 4%, but these errors are independent and of either sign over the
    M = 2¹⁶ elements, so the sums, and the ratio, move by ~4%/√M ≈ 2e-4 (measured 1e-4);
    rel 1e-2 leaves a wide margin. Each gradient element 2(s − t)/Σt² carries its own
    rounding of s − t, ~1% (measured 1.2% in norm), hence 5e-2 in norm."""
    g = torch.Generator().manual_seed(7)
    t = torch.randn(4, 64, 256, generator=g)
    s = t + 0.2 * torch.randn(4, 64, 256, generator=g)
    mask = torch.ones(4, 64, dtype=torch.long)
    mask[1, 40:] = 0
    ref_loss, ref_grad = _reference_value_and_grad("square_head", s, t, mask)
    for student in (s.bfloat16(), s):  # bf16 student and teacher; fp32 student, bf16 teacher
        loss, grad = _value_and_grad(square_head_loss, student, t.bfloat16(), mask, chunk_size=100)
        assert loss.dtype == torch.float32 and grad.dtype == student.dtype
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-2)
        error = (grad.double() - ref_grad).norm() / ref_grad.norm()
        assert error.item() < 5e-2


@pytest.mark.parametrize("name", sorted(COMPARISONS))
def test_autograd_saves_no_fp32_copy_of_the_outputs(name):
    """Saved for backward: the bf16 student and teacher themselves, plus ≤ 8 bytes a token."""
    s, t, mask = _ragged(B=4, T=32, D=64, dtype=torch.bfloat16)
    student = s.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        loss = COMPARISONS[name](student, t, mask, chunk_size=16)
    outputs = {student.untyped_storage().data_ptr(), t.untyped_storage().data_ptr()}
    own = [x for x in saved if x.untyped_storage().data_ptr() in outputs]
    extra = [x for x in saved if x.untyped_storage().data_ptr() not in outputs]
    assert len(own) == 2 and all(x.dtype == torch.bfloat16 for x in own)
    assert sum(x.numel() * x.element_size() for x in extra) <= 8 * mask.numel()
    loss.backward()
    assert student.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("name", sorted(COMPARISONS))
def test_no_fp32_tensor_larger_than_one_chunk_is_made_forward_or_backward(name):
    """Every fp32 temporary of bf16 outputs spans at most chunk_size tokens."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestFloat32(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for x in out if isinstance(out, tuple | list) else (out,):
                if isinstance(x, torch.Tensor) and x.dtype == torch.float32:
                    self.largest = max(self.largest, x.numel())
            return out

    s, t, mask = _ragged(B=4, T=32, D=64, dtype=torch.bfloat16)
    student = s.clone().requires_grad_()
    with LargestFloat32() as mode:
        COMPARISONS[name](student, t, mask, chunk_size=16).backward()
    assert 0 < mode.largest <= 16 * 64
    assert student.grad is not None


# ---------------------------------------------------------------------------------------------
# the modifier, driven as the training pipeline drives it


def _frozen(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _models(tiny_llama, layers=3, identity_norm=True, **teacher_overrides):
    """A student and a frozen teacher (different seeds). With `identity_norm` the final norm is
    removed so HF's last hidden state is the last layer's raw output, like the others."""
    student = tiny_llama(seed=1, num_hidden_layers=layers)
    teacher = _frozen(tiny_llama(seed=0, num_hidden_layers=layers, **teacher_overrides))
    if identity_norm:
        student.model.norm = nn.Identity()
        teacher.model.norm = nn.Identity()
    return student, teacher


def _batch(vocab=320, B=2, T=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 5:] = 0  # right padding
    ids[mask == 0] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _step(session, student, batch):
    """One micro-batch as the pipeline runs it; returns (task loss, event after LOSS_COMPUTED)."""
    session.event(EventType.BATCH_START, batch=batch)
    out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    task = nn.functional.cross_entropy(logits, batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    event = session.event(EventType.LOSS_COMPUTED, loss=task, batch=batch)
    return task, event


def _reference_layers(student, teacher, batch):
    """Per-layer naive SquareHead from HF's hidden states (hidden_states[i + 1] = layer i)."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        s_hs = student(**kwargs, output_hidden_states=True).hidden_states
        t_hs = teacher(**kwargs, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"]
    return [naive_square_head(s, t, mask) for s, t in zip(s_hs[1:], t_hs[1:], strict=True)]


def _session(student, modifier, teacher, total_steps=10):
    session = LifecycleSession(
        student, [modifier], teacher=teacher, run_type="finetune", total_steps=total_steps
    )
    session.initialize()
    return session


def test_square_head_loss_is_task_plus_sum_over_layers_of_the_naive_reference(tiny_llama):
    student, teacher = _models(tiny_llama, layers=3)
    batch = _batch()
    modifier = OutputDistillationModifier(orig_scale=0.7)
    session = _session(student, modifier, teacher)
    task, event = _step(session, student, batch)
    per_layer = _reference_layers(student, teacher, batch)
    # distill_scale 1.0 with square_head becomes N = 3 (SparseML): 3 · mean = the sum over layers
    assert modifier.effective_distill_scale == 3.0
    expected = 0.7 * task.item() + sum(per_layer)
    assert event.loss.item() == pytest.approx(expected, rel=1e-5)
    assert event.metrics["task_loss"] == pytest.approx(task.item())
    assert event.metrics["distill_loss"] == pytest.approx(sum(per_layer) / 3, rel=1e-5)
    session.finalize()


@pytest.mark.parametrize(
    "comparison,distill_scale,expected_scale",
    [
        ("square_head", 1.0, 3.0),  # SparseML: exactly 1.0 means "the number of layers"
        ("square_head", 0.5, 0.5),
        ("square_head", 2.0, 2.0),
        ("mse", 1.0, 1.0),
    ],
)
def test_distill_scale_semantics(tiny_llama, comparison, distill_scale, expected_scale):
    student, teacher = _models(tiny_llama, layers=3)
    batch = _batch()
    modifier = OutputDistillationModifier(comparison=comparison, distill_scale=distill_scale)
    session = _session(student, modifier, teacher)
    task, event = _step(session, student, batch)
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        s_hs = student(**kwargs, output_hidden_states=True).hidden_states[1:]
        t_hs = teacher(**kwargs, output_hidden_states=True).hidden_states[1:]
    naive = NAIVE[comparison]
    mean = sum(naive(s, t, batch["attention_mask"]) for s, t in zip(s_hs, t_hs, strict=True)) / 3
    assert modifier.effective_distill_scale == expected_scale
    assert event.loss.item() == pytest.approx(task.item() + expected_scale * mean, rel=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_logits_with_kl_divergence_match_the_naive_reference(tiny_llama, tied):
    student = tiny_llama(seed=1, tie_word_embeddings=tied)
    teacher = _frozen(tiny_llama(seed=0, tie_word_embeddings=tied))
    batch = _batch()
    modifier = OutputDistillationModifier(
        targets=["logits"], comparison="kl_divergence", temperature=2.0, distill_scale=0.3
    )
    session = _session(student, modifier, teacher)
    task, event = _step(session, student, batch)
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        s_logits, t_logits = student(**kwargs).logits, teacher(**kwargs).logits
    reference = naive_kl(s_logits, t_logits, batch["attention_mask"], T=2.0)
    assert event.loss.item() == pytest.approx(task.item() + 0.3 * reference, rel=1e-5)


def test_regex_targets_select_full_module_names(tiny_llama):
    student, teacher = _models(tiny_llama, layers=3)
    batch = _batch()
    modifier = OutputDistillationModifier(targets=[r"re:model\.layers\.[02]$"], distill_scale=2.0)
    session = _session(student, modifier, teacher)
    task, event = _step(session, student, batch)
    per_layer = _reference_layers(student, teacher, batch)
    expected = task.item() + 2.0 * (per_layer[0] + per_layer[2]) / 2
    assert event.loss.item() == pytest.approx(expected, rel=1e-5)


def test_gradients_reach_the_student_only(tiny_llama):
    student, teacher = _models(tiny_llama, layers=2)
    modifier = OutputDistillationModifier(orig_scale=0.0)
    session = _session(student, modifier, teacher)
    _, event = _step(session, student, _batch())
    event.loss.backward()
    grads = [p.grad for n, p in student.named_parameters() if "layers.0." in n]
    assert all(g is not None for g in grads) and any(bool(g.abs().sum() > 0) for g in grads)
    assert all(p.grad is None for p in teacher.parameters())


def test_gradient_checkpointing_recompute_gives_the_same_loss_and_gradients(tiny_llama):
    results = []
    for checkpointing in (False, True):
        student, teacher = _models(tiny_llama, layers=2)
        student.train()
        if checkpointing:
            student.activation_checkpointing_enable()
        # a submodule inside a checkpointed layer runs its hooks again during backward
        modifier = OutputDistillationModifier(targets=["model.layers.0.mlp", "model.layers.1"])
        session = _session(student, modifier, teacher)
        _, event = _step(session, student, _batch())
        event.loss.backward()  # with checkpointing, the layers' forwards run again here
        session.event(EventType.BATCH_END)
        session.finalize()
        results.append((event.loss.item(), [p.grad.clone() for p in student.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_start_end_gate_the_distillation_term_and_the_teacher_forward(tiny_llama):
    student, teacher = _models(tiny_llama, layers=2)
    teacher_calls = []
    handle = teacher.register_forward_hook(lambda *_: teacher_calls.append(1))
    session = _session(student, OutputDistillationModifier(start=2, end=4), teacher, total_steps=6)
    added = []
    for step in range(6):
        session.advance_to(step)
        task, event = _step(session, student, _batch(seed=step))
        session.event(EventType.BATCH_END)
        added.append(event.loss.item() != pytest.approx(task.item()) and bool(event.metrics))
    handle.remove()
    assert added == [False, False, True, True, False, False]
    assert len(teacher_calls) == 2
    session.finalize()


def test_every_hook_is_removed_at_finalize(tiny_llama):
    student, teacher = _models(tiny_llama, layers=2)
    targets = ["re:model.layers.\\d+$", "logits"]
    session = _session(student, OutputDistillationModifier(targets=targets), teacher)
    assert session.num_hooks == 2 * 3
    _step(session, student, _batch())
    session.event(EventType.BATCH_END)
    session.finalize()
    assert session.num_hooks == 0
    for model in (student, teacher):
        assert all(not m._forward_hooks for m in model.modules())


# ---------------------------------------------------------------------------------------------
# errors, raised at initialize (before training starts)


def _initialize(student, teacher, **fields):
    LifecycleSession(
        student, [OutputDistillationModifier(**fields)], teacher=teacher, run_type="finetune"
    ).initialize()


def test_no_teacher_says_how_to_give_one(tiny_llama):
    with pytest.raises(ReciPruneError, match="--distill-teacher PATH or self"):
        _initialize(tiny_llama(), None)


def test_a_target_matching_nothing_names_the_student_modules(tiny_llama):
    student, teacher = _models(tiny_llama, layers=2)
    with pytest.raises(ReciPruneError, match=r"'model\.layer\.0' matches no module.*model\.layers\.0"):
        _initialize(student, teacher, targets=["model.layer.0"])


def test_a_target_missing_in_the_teacher_gives_the_teachers_depth(tiny_llama):
    student = tiny_llama(seed=1, num_hidden_layers=3)
    teacher = _frozen(tiny_llama(seed=0, num_hidden_layers=2))
    with pytest.raises(ReciPruneError, match=r"no module 'model\.layers\.2'.*It has 2 decoder layers"):
        _initialize(student, teacher)


def test_a_teacher_with_another_vocabulary_cannot_be_compared_on_logits(tiny_llama):
    student, teacher = tiny_llama(), _frozen(tiny_llama(vocab_size=300))
    with pytest.raises(ReciPruneError, match=r"300 entries \(vocabulary\).*320"):
        _initialize(student, teacher, targets=["logits"])


def test_a_teacher_of_another_width_cannot_be_compared_on_hidden_states(tiny_llama):
    student, teacher = tiny_llama(), _frozen(tiny_llama(hidden_size=48))
    with pytest.raises(ReciPruneError, match=r"48 features \(hidden size\).*32"):
        _initialize(student, teacher)


def test_the_student_cannot_be_its_own_teacher(tiny_llama):
    student = tiny_llama()
    with pytest.raises(ReciPruneError, match="separate frozen copy"):
        _initialize(student, student)


def test_field_validation_and_sparseml_fields():
    assert get_modifier_class("OutputDistillationModifier") is OutputDistillationModifier
    with pytest.raises(ValidationError, match="comparison"):
        OutputDistillationModifier(comparison="l2_distance")
    with pytest.raises(ValidationError, match="temperature applies to comparison 'kl_divergence'"):
        OutputDistillationModifier(temperature=2.0)
    with pytest.raises(ValidationError, match="greater than 0"):
        OutputDistillationModifier(comparison="kl_divergence", temperature=0.0)
    with pytest.raises(ValidationError, match="not a valid regular expression"):
        OutputDistillationModifier(targets=["re:model.layers.(\\d+$"])
    # SparseML recipes: a single target string, no-op transforms, its memory option
    sparseml = OutputDistillationModifier.model_validate(
        {
            "targets": "re:model.layers.\\d+$",
            "comparison": "square_head",
            "transforms": "identity",
            "offload_layer_output": True,
        }
    )
    assert sparseml.targets == ["re:model.layers.\\d+$"]
    kl = OutputDistillationModifier.model_validate(
        {"comparison": "kl_divergence", "transforms": ["softmax"], "comparison_args": {"temperature": 3}}
    )
    assert kl.temperature == 3.0
    with pytest.raises(ValidationError, match="'transforms: 'normalize'' has no equivalent"):
        OutputDistillationModifier.model_validate({"transforms": "normalize"})


# ---------------------------------------------------------------------------------------------
# training sanity


def test_distilling_a_half_pruned_copy_from_its_dense_teacher_lowers_the_distillation_loss(
    tiny_llama,
):
    teacher = _frozen(tiny_llama(num_hidden_layers=2))
    student = copy.deepcopy(teacher).train()
    for p in student.parameters():
        p.requires_grad_(True)
    with torch.no_grad():
        for layer in student.model.layers:
            for module in layer.modules():
                if isinstance(module, nn.Linear):
                    module.weight.copy_(magnitude_prune(module.weight, 0.5)[0])
    session = _session(student, OutputDistillationModifier(orig_scale=0.0), teacher, total_steps=20)
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-4, weight_decay=0.0)
    seen = []
    for step in range(20):
        session.advance_to(step)
        _, event = _step(session, student, _batch(B=4, T=16, seed=step % 4))
        event.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        session.event(EventType.BATCH_END)
        seen.append(event.metrics["distill_loss"])
    session.finalize()
    assert seen[0] > 0
    assert sum(seen[-4:]) / 4 < 0.5 * sum(seen[:4]) / 4
