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
