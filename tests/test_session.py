"""Lifecycle session: event gating, loss terms, hook ownership, shared input statistics."""

from __future__ import annotations

import torch
from torch import nn

from reciprune.core.events import Event, EventType
from reciprune.core.session import LifecycleSession
from reciprune.modifiers import ConstantPruningModifier, MagnitudePruningModifier, Modifier
from reciprune.modifiers.wanda import WandaModifier
from reciprune.pipelines.oneshot import run_oneshot


class Recorder(Modifier):
    """Records (event type, global step) of every event it receives."""

    def model_post_init(self, _context: object) -> None:
        self._seen: list[tuple[EventType, int]] = []

    def on_event(self, session: LifecycleSession, event: Event) -> None:
        self._seen.append((event.type, event.global_step))
        if event.type == EventType.LOSS_COMPUTED:
            event.loss = event.loss + 1.0


class Hooker(Modifier):
    """Registers a forward, a forward-pre and a gradient hook on every Linear."""

    def on_initialize(self, session: LifecycleSession) -> None:
        for module in session.model.modules():
            if isinstance(module, nn.Linear):
                session.register_hook(self, module, lambda *_: None)
                session.register_hook(self, module, lambda *_: None, kind="forward_pre")
                session.register_tensor_hook(self, module.weight, lambda g: g)


def _all_hooks(model: nn.Module) -> int:
    count = 0
    for module in model.modules():
        count += len(module._forward_hooks) + len(module._forward_pre_hooks)
        count += len(module._backward_hooks) + len(getattr(module, "_backward_pre_hooks", {}))
    for param in model.parameters():
        count += len(param._backward_hooks or {})
    return count


def _drive_steps(session: LifecycleSession, steps: range) -> None:
    for step in steps:
        session.advance_to(step)
        session.event(EventType.BATCH_START)
        session.event(EventType.BATCH_END)


def test_every_event_carries_the_global_step_and_start_end_gate_it(tiny_llama):
    early, window = Recorder(), Recorder(start=2, end=4)
    session = LifecycleSession(tiny_llama(), [early, window], total_steps=6)
    session.initialize()
    _drive_steps(session, range(6))
    session.finalize()
    assert [s for t, s in early._seen if t == EventType.BATCH_START] == [0, 1, 2, 3, 4, 5]
    assert [s for t, s in window._seen if t == EventType.BATCH_START] == [2, 3]
    # initialize and finalize reach every modifier whatever its window
    assert window._seen[0] == (EventType.INITIALIZE, 0)
    assert window._seen[-1] == (EventType.FINALIZE, 5)


def test_fractional_start_end_resolve_against_total_steps(tiny_llama):
    half = Recorder(start=0.5, end=0.8)
    session = LifecycleSession(tiny_llama(), [half], total_steps=10)
    session.initialize()
    _drive_steps(session, range(10))
    assert [s for t, s in half._seen if t == EventType.BATCH_START] == [5, 6, 7]


def test_a_modifier_adds_a_loss_term(tiny_llama):
    session = LifecycleSession(tiny_llama(), [Recorder(), Recorder()])
    session.initialize()
    event = session.event(EventType.LOSS_COMPUTED, loss=torch.tensor(0.5))
    assert event.loss.item() == 2.5


def test_no_hook_survives_finalize(tiny_llama):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:, :4] = 0
    ids = torch.randint(0, model.config.vocab_size, (4, 16))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    assert _all_hooks(model) == 0
    modifiers = [ConstantPruningModifier(), Hooker(), WandaModifier(sparsity=0.3)]
    session = LifecycleSession(model, modifiers, run_type="finetune")
    session.initialize()
    assert session.num_hooks > 0 and _all_hooks(model) > 0
    session.finalize()
    assert session.num_hooks == 0 and _all_hooks(model) == 0
    run_oneshot(model, [WandaModifier(sparsity=0.3)], batches, progress=False)
    assert _all_hooks(model) == 0


def test_modules_reading_one_input_share_statistics_equal_to_naive_xtx(tiny_llama):
    model = tiny_llama()
    layer = model.model.layers[0]
    hidden = torch.randn(3, 10, model.config.hidden_size)
    position = torch.arange(10).unsqueeze(0).expand(3, -1)
    rotary = model.model.rotary_emb(hidden, position)
    session = LifecycleSession(model, [])
    session.initialize()
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    for module in linears.values():
        session.statistics.track(module, hessian=True)
    naive_inputs: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
    handles = [
        m.register_forward_pre_hook(lambda _m, a, n=n: naive_inputs[n].append(a[0].detach()))
        for n, m in linears.items()
    ]
    session.statistics.attach(layer)
    with torch.no_grad():
        for part in (hidden[:2], hidden[2:]):
            layer(part, position_embeddings=tuple(r[: len(part)] for r in rotary))
    for handle in handles:
        handle.remove()
    groups = sorted(
        sorted(n for n, m in linears.items() if any(m is g for g in group))
        for group in session.statistics.sharing()
    )
    assert groups == [
        ["mlp.down_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
    ]
    for name, module in linears.items():
        X = torch.cat([x.reshape(-1, x.shape[-1]) for x in naive_inputs[name]]).double()
        H = 2.0 / 3 * (X.T @ X)
        torch.testing.assert_close(session.statistics.hessian(module).double(), H, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            session.statistics.sq_norm(module).double(), (X**2).sum(0), rtol=1e-5, atol=1e-5
        )


def _sgd_steps(model: nn.Module, session: LifecycleSession, steps: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    for step in range(steps):
        session.advance_to(step)
        session.event(EventType.BATCH_START)
        loss = model(input_ids=ids, labels=ids).loss
        loss = session.event(EventType.LOSS_COMPUTED, loss=loss).loss
        loss.backward()
        session.event(EventType.OPTIMIZER_PRE_STEP)
        optimizer.step()
        optimizer.zero_grad()
        session.event(EventType.OPTIMIZER_POST_STEP)
        session.event(EventType.BATCH_END)


def test_constant_pruning_keeps_every_zero_while_other_weights_train(tiny_llama):
    model = tiny_llama().train()
    weight = model.model.layers[1].self_attn.q_proj.weight
    with torch.no_grad():
        weight[weight.abs() < weight.abs().median()] = 0
    zeros, before = weight == 0, weight.detach().clone()
    session = LifecycleSession(model, [ConstantPruningModifier()], run_type="finetune")
    session.initialize()
    _sgd_steps(model, session, 5)
    session.finalize()
    assert bool((weight[zeros] == 0).all())
    assert not torch.equal(weight[~zeros], before[~zeros])


def test_magnitude_schedule_in_training_rises_cubically_to_the_target(tiny_llama):
    model = tiny_llama().train()
    modifier = MagnitudePruningModifier(sparsity=0.6, init_sparsity=0.0, start=0, end=4)
    session = LifecycleSession(model, [modifier], run_type="finetune", total_steps=8)
    session.initialize()
    weight = model.model.layers[0].mlp.down_proj.weight
    seen = []
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    for step in range(8):
        session.advance_to(step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        session.event(EventType.OPTIMIZER_POST_STEP)
        seen.append((weight == 0).float().mean().item())
    expected = [0.6 + (0.0 - 0.6) * (1 - min(t, 4) / 4) ** 3 for t in range(8)]
    # int(numel * s) weights are pruned: within one weight of the schedule
    assert all(abs(a - b) <= 1 / weight.numel() for a, b in zip(seen, expected, strict=True))
    assert seen[-1] > 0.59 and all(b >= a for a, b in zip(seen, seen[1:], strict=False))
