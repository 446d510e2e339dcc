"""Reload a freshly written compressed checkpoint as any user would, and compare it with the model.

A packed or compressed checkpoint is not the model's own tensors: a wrong ignore list, a module
the format does not know or a packing bug gives a folder that loads with a warning (or none) and
computes something else. So before the output folder is renamed into place it is loaded with
plain `AutoModelForCausalLM.from_pretrained` and must give back the in-memory model's weights bit
for bit and its logits; otherwise the save fails and nothing is written.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging as hf_logging

from reciprune.errors import ReciPruneError

#: Tokens of the logits check; few, so the check costs one short forward per model.
PROBE_TOKENS = 16
#: Relative tolerance of the logits check: both models hold the same weights, so only the
#: order of floating-point operations may differ (another device, another kernel).
LOGITS_RTOL = 1e-4


def _probe_ids(model: PreTrainedModel) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.get_text_config().vocab_size, (1, PROBE_TOKENS),
                         generator=generator)  # fmt: skip


@torch.no_grad()
def _logits(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(ids.to(device), use_cache=False).logits.float().cpu()


def _weight_mismatches(model: PreTrainedModel, reloaded: PreTrainedModel) -> list[str]:
    """What differs between the two models' parameters and buffers (names, shapes, values)."""
    expected = model.state_dict()
    found = reloaded.state_dict()
    # A tensor the checkpoint does not store must be zeros: the zero point of a symmetric
    # scheme is dropped on save and comes back as zeros.
    problems = [f"{name} is missing" for name, tensor in expected.items()
                if name not in found and bool(tensor.any())]  # fmt: skip
    for name, tensor in expected.items():
        other = found.get(name)
        if other is None:
            continue
        if other.shape != tensor.shape or other.dtype != tensor.dtype:
            problems.append(f"{name} is {tuple(other.shape)} {other.dtype}, "
                            f"expected {tuple(tensor.shape)} {tensor.dtype}")  # fmt: skip
        elif not torch.equal(other, tensor.to(other.device)):
            diff = (other.float() - tensor.to(other.device).float()).abs().max().item()
            problems.append(f"{name} differs (largest difference {diff:.3g})")
    return problems


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No load report from the check: a mismatch is reported with its cause below."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def verify_reload(model: PreTrainedModel, folder: Path, format_name: str) -> None:
    """Raise a ReciPruneError unless `folder` reloads to `model`'s weights and logits.

    `model` must be able to run a forward (a compressed-tensors model decompresses itself on its
    first forward, which is what a reloaded one does too). The reload is on the CPU, in the
    model's dtype: it costs one more copy of the weights in memory.
    """
    from compressed_tensors.offload import as_single_threaded

    ids = _probe_ids(model)
    expected = _logits(model, ids)
    # Under torch.distributed compressed-tensors shares a load's decompression between the
    # processes, but only the main process saves and checks: it would wait for the others.
    with warnings.catch_warnings(), as_single_threaded(), _quiet_transformers():
        warnings.simplefilter("ignore")  # a mismatch is reported below, with its cause
        try:
            reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=model.dtype).eval()
            found = _logits(reloaded, ids)  # decompresses a compressed-tensors model, as `model` was
        except Exception as error:  # noqa: BLE001 - whatever the loader raises, the folder is unusable
            # A loader that does not support this format for this model type.
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            raise ReciPruneError(
                f"the {format_name} checkpoint does not load with AutoModelForCausalLM "
                f"({reason}). Nothing was written. --save-format dense stores the weights as "
                "floats, which every loader reads; please report the model type and recipe."
            ) from error
    problems = _weight_mismatches(model, reloaded)
    scale = expected.abs().max().item() or 1.0
    gap = (found - expected).abs().max().item() if found.shape == expected.shape else float("inf")
    if not torch.isfinite(found).all() or gap > LOGITS_RTOL * scale:
        problems.append(f"logits differ by up to {gap:.3g} (largest logit {scale:.3g})")
    del reloaded
    if problems:
        listed = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ReciPruneError(
            f"the {format_name} checkpoint does not reload as saved: loaded with "
            f"AutoModelForCausalLM it gives other weights or logits than the compressed model "
            f"({listed}). Nothing was written. This is a bug in the export of this model type or "
            "scheme: please report it with the recipe; --save-format dense stores weights as "
            "floats meanwhile."
        )
