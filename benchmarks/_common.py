"""Helpers shared by the benchmark scripts (finetune_bench.py, peft_bench.py).

The scripts run as `python benchmarks/NAME.py` (and re-invoke themselves as child processes the
same way), so this folder is on sys.path and they import this module as `_common`; each inserts
its own folder first, so that holds from any working directory and under `python -P` too.
Nothing here imports torch at module level: the parent processes that only launch runs stay light.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

#: Written last into a prepared model folder: a folder without it is rebuilt.
PREPARED = "bench_model.json"


# --- model folders ------------------------------------------------------------------------------
def tiny_model():
    """A seeded random Llama of SmolLM2's shape family, small: hidden 256, 4 layers, MLP 688,
    4 heads / 2 KV heads, SmolLM2's vocabulary and tied embeddings."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=49152,  # the SmolLM2 tokenizer's, so the packaged data tokenizes as for SmolLM2
        max_position_embeddings=2048,
        tie_word_embeddings=True,  # as SmolLM2
    )
    return LlamaForCausalLM(config).eval()


def save_prepared(model: Any, tokenizer: Any, folder: Path, info: dict) -> None:
    """Save `model` and `tokenizer` to `folder`, then the PREPARED marker holding `info`."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / PREPARED).write_text(json.dumps(info) + "\n", encoding="utf-8")


def is_prepared(folder: Path) -> bool:
    """Whether `save_prepared` finished writing `folder`."""
    return (folder / PREPARED).is_file()


def add_llama_7b_shape(parser: Any, work: Path) -> None:
    """--work, --device and the random Llama's shape, Llama-2-7B's by default (4 layers)."""
    parser.add_argument("--work", type=Path, default=work)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32000)


def random_llama_with_rows(
    work: Path,
    *,
    layers: int,
    hidden: int,
    intermediate: int,
    heads: int,
    vocab: int,
    rows: int,
    seq_len: int,
    device: str = "cpu",
) -> tuple[Path, Path]:
    """WORK/model: a seeded random bf16 Llama (untied head) with a word-level tokenizer of
    `vocab` words; WORK/rows: `rows` × `seq_len` random token ids saved with
    `datasets.save_to_disk` (column `input_ids`). Built once; nothing is downloaded."""
    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    model_dir, data_dir = work / "model", work / "rows"
    wanted = {"layers": layers, "hidden": hidden, "intermediate": intermediate, "heads": heads,
              "vocab": vocab, "rows": rows, "seq_len": seq_len}  # fmt: skip
    marker = model_dir / PREPARED
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return model_dir, data_dir
    words = {"<unk>": 0, "<pad>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    backend = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                        pad_token="<pad>", eos_token="</s>")  # fmt: skip
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, vocab_size=vocab,
                         max_position_embeddings=max(4096, seq_len),
                         tie_word_embeddings=False, pad_token_id=1, eos_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    del model
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (rows, seq_len), generator=generator)
    Dataset.from_dict({"input_ids": ids.tolist()}).save_to_disk(str(data_dir))
    marker.write_text(json.dumps(wanted) + "\n", encoding="utf-8")
    return model_dir, data_dir


# --- runs ---------------------------------------------------------------------------------------
def run_checked(cmd: list[str], env: dict[str, str]) -> None:
    """Run `cmd`; on failure print it and the tail of its output, then exit with its status."""
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).splitlines()[-40:]
        print(f"FAILED (exit status {done.returncode}): {' '.join(cmd)}", file=sys.stderr)
        print("\n".join(tail), file=sys.stderr)
        sys.exit(done.returncode or 1)


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def thread_env(threads: int) -> dict[str, str]:
    """This environment with each child process pinned to `threads` threads (torchrun keeps a
    value that is already set)."""
    env = os.environ.copy()
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
    )
    return env


# --- a run's figures ----------------------------------------------------------------------------
def read_manifest(output: Path) -> dict:
    """The reciprune_manifest.json of the run that wrote `output`."""
    return json.loads((output / "reciprune_manifest.json").read_text(encoding="utf-8"))


def steady_steps(curve: list[dict], warmup: int) -> list[dict]:
    """The loss curve's optimizer steps after the first `warmup` (all of them if too few)."""
    return curve[warmup:] if len(curve) > warmup else curve


def tokens_per_second(steps: list[dict]) -> float:
    """Σ tokens / Σ seconds over `steps` (records of the loss curve)."""
    return sum(r["tokens"] for r in steps) / max(sum(r["seconds"] for r in steps), 1e-9)
