"""Shared fixtures: tiny seeded models and a tiny offline tokenizer.

Fixtures
- `tiny_llama(**overrides) -> LlamaForCausalLM`: factory fixture. Builds a seeded (seed 0 unless
  `seed=` is passed) 2-layer Llama in eval mode from `TINY_LLAMA_CONFIG` updated with `overrides`
  (any `LlamaConfig` field, e.g. `num_hidden_layers=3`, `tie_word_embeddings=True`). Its default
  `vocab_size` equals `len(tiny_tokenizer)` (`TINY_VOCAB`), so the two can be used together.
- `tiny_tokenizer`: session-scoped byte-level BPE tokenizer (`TINY_VOCAB` tokens) trained with the
  `tokenizers` package on embedded BoolQ passages (no network). eos = bos = `<|endoftext|>`,
  pad = `<pad>`, and a minimal chat template so `apply_chat_template` works.
  Treat it as read-only: it is shared by every test in the session.
- `tiny_model_dir`: a saved folder of a 2-layer `tiny_llama` with `tiny_tokenizer`.
- `text_files`: (calibration, held-out) text files of embedded BoolQ passages (60 and 20).

`HF_HUB_OFFLINE=1` is set for the whole test session: nothing may come from the Hub.
torch runs on 1 intra-op thread (override with RECIPRUNE_TEST_THREADS): tiny models gain nothing
from more, and on a busy 2-core machine a second thread makes each forward ~100x slower.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Set before transformers is imported anywhere, so no test can reach the Hub by accident.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase  # noqa: E402

torch.set_num_threads(int(os.environ.get("RECIPRUNE_TEST_THREADS", "1")))

TINY_VOCAB = 320

TINY_LLAMA_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": TINY_VOCAB,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": 1,
}

_CHAT_TEMPLATE = (
    "{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}"
)


@pytest.fixture
def tiny_llama() -> Callable[..., LlamaForCausalLM]:
    """Factory: `tiny_llama(seed=0, **config_overrides)` -> seeded tiny LlamaForCausalLM (eval)."""

    def make(seed: int = 0, **overrides: Any) -> LlamaForCausalLM:
        torch.manual_seed(seed)
        config = LlamaConfig(**{**TINY_LLAMA_CONFIG, **overrides})
        return LlamaForCausalLM(config).eval()

    return make


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer of `TINY_VOCAB` tokens trained offline on BoolQ passages."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from reciprune.data.embedded import embedded_calibration_texts

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(embedded_calibration_texts()[:300], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<pad>",
    )
    tokenizer.chat_template = _CHAT_TEMPLATE
    assert len(tokenizer) == TINY_VOCAB
    return tokenizer


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_llama, tiny_tokenizer) -> Path:
    folder = tmp_path / "tiny-llama"
    tiny_llama(num_hidden_layers=2).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def text_files(tmp_path) -> tuple[Path, Path]:
    from reciprune.data.embedded import embedded_calibration_texts, embedded_heldout_texts

    calibration, heldout = tmp_path / "calib.txt", tmp_path / "heldout.txt"
    calibration.write_text("\n\n".join(embedded_calibration_texts()[:60]))
    heldout.write_text("\n\n".join(embedded_heldout_texts()[:20]))
    return calibration, heldout


# --- the command line in a subprocess (finetune end-to-end tests) ---------------------------------
TESTS_DIR = Path(__file__).resolve().parent


def subprocess_env() -> dict[str, str]:
    """This environment with one thread per process and no Hub access."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def run_reciprune(*args: str, kill_after_step: int | None = None) -> subprocess.CompletedProcess:
    """`python -m reciprune ARGS` in a subprocess; with `kill_after_step`, the process SIGKILLs
    itself right after that (0-based) optimizer step (tests/kill_after_step.py)."""
    command = [sys.executable, "-m", "reciprune", *args]
    if kill_after_step is not None:
        command = [sys.executable, str(TESTS_DIR / "kill_after_step.py"), str(kill_after_step), *args]
    return subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=600)


def finetune_cli(recipe: Path, model: Path, out: Path, *extra: str, **kwargs: Any):
    """`reciprune finetune --recipe R --model M --output-dir O` quietly, without perplexity."""
    return run_reciprune(
        "finetune", "--recipe", str(recipe), "--model", str(model), "--output-dir", str(out),
        "--no-progress", "--no-eval-ppl", *extra, **kwargs,
    )  # fmt: skip
