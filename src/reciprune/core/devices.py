"""Where a job computes and in which dtype: `--device` and `--dtype` resolved before weights load."""

from __future__ import annotations

import re
from typing import Any

import torch

from reciprune.errors import ReciPruneError

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


def resolve_device(spec: str) -> torch.device:
    """`auto` (the first CUDA device when there is one, else the CPU), `cpu`, `cuda`, `cuda:N`;
    a device that is not there is a clear error."""
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if match is None:
        raise ReciPruneError(f"--device {spec}: use auto, cpu, cuda or cuda:N (e.g. cuda:1).")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise ReciPruneError(
            f"--device {spec}: no CUDA device is visible here (torch {torch.__version__}, {build}). "
            "Run with --device cpu (or auto), or on a machine with a GPU and a CUDA build of torch."
        )
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise ReciPruneError(
            f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s), "
            f"numbered from 0. Pick one of cuda:0 … cuda:{torch.cuda.device_count() - 1}."
        )
    return torch.device("cuda", index)


def checkpoint_dtype(config: Any) -> torch.dtype | None:
    """The dtype the checkpoint's weights are stored in (config `dtype`/`torch_dtype`), if any."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, torch.dtype):
        return value
    return DTYPES.get(str(value).removeprefix("torch.")) if value else None


def resolve_dtype(spec: str, device: torch.device, config: Any = None) -> torch.dtype:
    """`auto`: the checkpoint's own dtype on a GPU (float32 when it records none), float32 on
    the CPU (its half-precision kernels are slow); otherwise the named dtype."""
    if spec != "auto":
        return DTYPES[spec]
    if device.type == "cpu":
        return torch.float32
    return checkpoint_dtype(config) or torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    """The most memory torch allocated on `device` since the last reset (MB); None on CPU."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
