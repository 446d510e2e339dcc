"""Layer-wise oneshot pipeline: architectures, and equality with naive whole-model references."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from reciprune.algorithms.sparsegpt import sparsegpt_prune
from reciprune.core.targets import is_linear_like, weight_matrix
from reciprune.modifiers import MagnitudePruningModifier, SparseGPTModifier, WandaModifier
from reciprune.pipelines.oneshot import run_oneshot

COMMON = dict(vocab_size=96, max_position_embeddings=64)
DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, **COMMON)
ARCHITECTURES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**DECODER)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**DECODER)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(head_dim=8, **DECODER)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**DECODER)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                               vocab_size=96)),
    "opt": lambda: OPTForCausalLM(OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                            num_attention_heads=4, word_embed_proj_dim=32,
                                            **COMMON)),
}


def _batches(vocab: int, samples: int = 6, length: int = 16, batch: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (samples, length), generator=generator)
    return [
        {"input_ids": ids[i : i + batch], "attention_mask": torch.ones_like(ids[i : i + batch])}
        for i in range(0, samples, batch)
    ]


def _decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    from reciprune.core.layers import find_decoder_layers

    layers_name, _ = find_decoder_layers(model)
    return {n: m for n, m in model.named_modules() if is_linear_like(m) and n.startswith(layers_name)}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_sparsegpt_prunes_every_decoder_linear_of_each_architecture(arch, structure):
    torch.manual_seed(0)
    model = ARCHITECTURES[arch]().eval()
    batches = _batches(model.config.vocab_size)
    head_before = model.get_output_embeddings().weight.detach().clone()
    modifier = SparseGPTModifier(mask_structure=structure, block_size=16)
    result = run_oneshot(model, [modifier], batches, progress=False)
    linears = _decoder_linears(model)
    assert set(result.records) == set(linears) and len(linears) >= 4
    for name, module in linears.items():
        W = weight_matrix(module)
        assert (W == 0).float().mean().item() == pytest.approx(0.5, abs=0.02), name
        if structure == "2:4":
            groups = (W != 0).reshape(W.shape[0], -1, 4).sum(-1)
            assert int(groups.max()) <= 2, name
    assert torch.equal(model.get_output_embeddings().weight, head_before)  # lm_head untouched
    with torch.no_grad():
        assert torch.isfinite(model(**batches[0]).logits).all()


def _naive_sequential(model: nn.Module, batches, prune) -> None:
    """Reference: for each decoder layer in turn, rerun the WHOLE model to collect each Linear's
    inputs (so earlier layers are already pruned), then prune that layer's Linears."""
    from reciprune.core.layers import find_decoder_layers

    _, layers = find_decoder_layers(model)
    for layer in layers:
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        inputs: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
        handles = [
            m.register_forward_pre_hook(lambda _m, a, seen=inputs[n]: seen.append(a[0].detach()))
            for n, m in linears.items()
        ]
        with torch.no_grad():
            for batch in batches:
                model(**batch)
        for handle in handles:
            handle.remove()
        for name, module in linears.items():
            X = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs[name]])
            with torch.no_grad():
                module.weight.copy_(prune(module.weight.detach().clone(), X, len(batches) * 2))


def _naive_wanda(W: torch.Tensor, X: torch.Tensor, _n: int) -> torch.Tensor:
    score = W.abs() * X.norm(dim=0)
    k = int(W.shape[1] * 0.5)
    for row in range(W.shape[0]):
        order = sorted(range(W.shape[1]), key=lambda j: float(score[row, j]))
        W[row, order[:k]] = 0
    return W


def test_layerwise_wanda_equals_naive_whole_model_reference(tiny_llama):
    reference, model = tiny_llama(seed=3), tiny_llama(seed=3)
    batches = _batches(model.config.vocab_size, samples=8, length=24)
    _naive_sequential(reference, batches, _naive_wanda)
    run_oneshot(model, [WandaModifier(sparsity=0.5)], batches, progress=False)
    for (name, a), (_, b) in zip(_decoder_linears(reference).items(), _decoder_linears(model).items(), strict=True):
        assert torch.equal(a.weight == 0, b.weight == 0), name
        torch.testing.assert_close(a.weight, b.weight)


def test_layerwise_sparsegpt_uses_the_hessian_of_the_already_pruned_model(tiny_llama):
    reference, model = tiny_llama(seed=4), tiny_llama(seed=4)
    batches = _batches(model.config.vocab_size, samples=8, length=24)

    def prune(W, X, n_sequences):
        H = 2.0 / n_sequences * (X.T.double() @ X.double())
        return sparsegpt_prune(W, H.float(), 0.5, blocksize=16)[0]

    _naive_sequential(reference, batches, prune)
    run_oneshot(model, [SparseGPTModifier(sparsity=0.5, block_size=16)], batches, progress=False)
    for (name, a), (_, b) in zip(_decoder_linears(reference).items(), _decoder_linears(model).items(), strict=True):
        mismatch = (a.weight == 0) != (b.weight == 0)
        assert mismatch.float().mean().item() < 0.005, name  # fp32 ties at the threshold only
        torch.testing.assert_close(a.weight[~mismatch], b.weight[~mismatch], atol=1e-4, rtol=1e-3)


def test_targets_ignore_and_per_layer_sparsity(tiny_llama):
    model = tiny_llama(num_hidden_layers=3)
    batches = _batches(model.config.vocab_size)
    modifier = WandaModifier(
        sparsity={"0": 0.25, "re:.*mlp.*": 0.75, "default": 0.5},
        targets=["re:model.layers.\\d+$"],
        ignore=["re:.*self_attn.o_proj", "model.layers.2.mlp.down_proj"],
    )
    run_oneshot(model, [modifier], batches, progress=False)
    sparsity = {n: (m.weight == 0).float().mean().item() for n, m in _decoder_linears(model).items()}
    assert sparsity["model.layers.0.mlp.up_proj"] == 0.25  # the layer index wins over the regex
    assert sparsity["model.layers.1.mlp.up_proj"] == 0.75
    assert sparsity["model.layers.1.self_attn.q_proj"] == 0.5
    assert sparsity["model.layers.1.self_attn.o_proj"] == 0.0
    assert sparsity["model.layers.2.mlp.down_proj"] == 0.0


def test_magnitude_oneshot_needs_no_data_and_prunes_each_matrix(tiny_llama):
    model = tiny_llama()
    before = {n: m.weight.detach().clone() for n, m in _decoder_linears(model).items()}
    result = run_oneshot(model, [MagnitudePruningModifier(sparsity=0.5)], None, progress=False)
    assert "capture" not in result.timings
    for name, module in _decoder_linears(model).items():
        kept = module.weight != 0
        assert kept.float().mean().item() == 0.5, name
        original = before[name].abs()
        assert original[kept].min() >= original[~kept].max(), name  # one threshold per matrix


def test_recorded_reconstruction_error_equals_direct_output_error(tiny_llama):
    dense, model = tiny_llama(seed=5), tiny_llama(seed=5)
    batches = _batches(model.config.vocab_size, samples=4, length=20)
    layer0 = {n: m for n, m in dense.model.layers[0].named_modules() if isinstance(m, nn.Linear)}
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in layer0}
    handles = [
        m.register_forward_pre_hook(lambda _m, a, seen=inputs[n]: seen.append(a[0].detach()))
        for n, m in layer0.items()
    ]
    with torch.no_grad():
        for batch in batches:
            dense(**batch)
    for handle in handles:
        handle.remove()
    estimated = run_oneshot(tiny_llama(seed=5), [WandaModifier(sparsity=0.5)], batches,
                            progress=False)  # fmt: skip
    result = run_oneshot(model, [WandaModifier(sparsity=0.5)], batches, progress=False,
                         exact_error=True)  # fmt: skip
    for name, module in layer0.items():
        X = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs[name]]).double()
        W = module.weight.detach().double()
        pruned = dict(model.named_modules())[f"model.layers.0.{name}"].weight.detach().double()
        direct = ((X @ W.T - X @ pruned.T) ** 2).sum() / ((X @ W.T) ** 2).sum()
        record = result.records[f"model.layers.0.{name}"]
        assert record["reconstruction_error"] == pytest.approx(float(direct), rel=1e-4), name
        assert 0 < record["reconstruction_error"] < 1 and record["reconstruction_error_kind"] == "exact"
        # Without exact_error Wanda keeps only column norms: the diagonal of XᵀX, Σ ΔW² ‖X_j‖².
        norms = (X**2).sum(0)
        diagonal = (((W - pruned) ** 2) * norms).sum() / ((W**2) * norms).sum()
        cheap = estimated.records[f"model.layers.0.{name}"]
        assert cheap["reconstruction_error"] == pytest.approx(float(diagonal), rel=1e-4), name
        assert cheap["reconstruction_error_kind"] == "diagonal"


def test_wanda_accumulates_no_full_xtx_unless_exact_errors_are_asked_for(tiny_llama, monkeypatch):
    from reciprune.core.statistics import InputStatistics

    sizes: list[tuple[int, ...]] = []
    real = InputStatistics.clear

    def watch(self):
        sizes.extend(tuple(g.xtx.shape) for g in self._groups if g.xtx is not None)
        real(self)

    monkeypatch.setattr(InputStatistics, "clear", watch)
    model = tiny_llama()
    batches = _batches(model.config.vocab_size, samples=2, length=12)
    run_oneshot(model, [WandaModifier(sparsity=0.5)], batches, progress=False)
    assert sizes == []
    run_oneshot(tiny_llama(), [WandaModifier(sparsity=0.5)], batches, progress=False,
                exact_error=True)  # fmt: skip
    assert sizes and all(len(s) == 2 for s in sizes)


def _per_module_sparsegpt(self, session, layer_index, modules):
    """Reference for the stacked solves: one `sparsegpt_prune` per module on its Hessian."""
    masks = {}
    n, m = self.structure_for(layer_index)
    for name, module in modules.items():
        W, masks[name] = sparsegpt_prune(
            weight_matrix(module), session.statistics.hessian(module), self.sparsity_for(layer_index, name),
            n=n, m=m, blocksize=self.block_size, percdamp=self.dampening_frac,
        )
        module.weight.data.copy_(W)
    return masks


@pytest.mark.parametrize("structure,sparsity", [
    ("unstructured", {"re:.*k_proj": 0.3, "re:.*up_proj": 0.6, "default": 0.5}),  # per module
    ("2:4", 0.5),
])
def test_sparsegpt_solves_modules_sharing_an_input_together_with_the_per_module_weights(
    structure, sparsity, tiny_llama, monkeypatch
):
    import reciprune.modifiers.sparsegpt as sparsegpt_modifier

    batches = _batches(320, samples=8, length=24)
    reference, model = tiny_llama(seed=6), tiny_llama(seed=6)
    with monkeypatch.context() as patch:
        patch.setattr(SparseGPTModifier, "prune_layer", _per_module_sparsegpt)
        expected = run_oneshot(
            reference, [SparseGPTModifier(sparsity=sparsity, mask_structure=structure, block_size=16)],
            batches, progress=False,
        )
    solves = []
    stacked = sparsegpt_modifier.sparsegpt_prune_stacked
    monkeypatch.setattr(sparsegpt_modifier, "sparsegpt_prune_stacked",
                        lambda Ws, *a, **k: solves.append(len(Ws)) or stacked(Ws, *a, **k))
    result = run_oneshot(
        model, [SparseGPTModifier(sparsity=sparsity, mask_structure=structure, block_size=16)],
        batches, progress=False,
    )
    assert solves == [3, 1, 2, 1] * 2  # q/k/v, o, gate/up, down in each layer
    for (name, a), (_, b) in zip(_decoder_linears(reference).items(), _decoder_linears(model).items(), strict=True):
        assert torch.equal(a.weight, b.weight), name
        assert result.records[name] == expected.records[name], name
