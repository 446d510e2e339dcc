"""The inner block of a column-by-column solve (SparseGPT, GPTQ), replayed as one CUDA graph.

Inside a block the columns are visited one at a time, each launching a few small kernels
(a multiply and a rank-1 update for SparseGPT; the rounding, the error and the update for
GPTQ). At 4096 columns per matrix, a GPU spends its time launching them, not computing. A CUDA
graph records a block's kernels once and replays them all with one launch.

The recorded function is the one the CPU path calls: `step(*inputs)` computes only on the
values of its inputs (no host reads such as `.item()` or boolean indexing; Python control flow
that depends on shapes and fixed settings only), so replaying it on new values stored in the
same buffers is running it again.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Step = Callable[..., Sequence[Tensor]]


class BlockGraph:
    """Calls `step(*inputs)`: eagerly, or through a CUDA graph of it when enabled: with
    `cuda_graph` True, or None on a CUDA `device`.

    Enabled, each distinct set of input shapes gets static copies of the inputs. The first
    call with those shapes runs `step` on them (the warm-up a capture needs), the second
    records `step` and replays it, later calls copy the inputs in and replay. The tensors
    returned are the recording's static outputs, rewritten by every replay: read them before
    the next call. `step` may update its inputs in place; callers pass copies they give away.

    On a CUDA device the recording is a CUDA graph. Elsewhere there is none, and a replay runs
    `step` again on the static buffers and copies its results into the static outputs: the
    same discipline, so CPU tests check that `step` is fit to be captured.

    `required` (graphs were asked for explicitly, `cuda_graph` True) lets a failed capture
    raise; otherwise it warns and the rest of the solve runs eagerly, with the same kernels.
    """

    def __init__(self, step: Step, cuda_graph: bool | None, device: torch.device) -> None:
        self.step = step
        self.enabled = device.type == "cuda" if cuda_graph is None else cuda_graph
        self.required = bool(cuda_graph)
        self.replays = 0
        self._static: dict[tuple, list[Tensor]] = {}
        self._recorded: dict[tuple, tuple[Callable[[], object], Sequence[Tensor]]] = {}

    def __call__(self, *inputs: Tensor) -> Sequence[Tensor]:
        if not self.enabled:
            return self.step(*inputs)
        key = tuple((tuple(x.shape), x.dtype, x.device) for x in inputs)
        if key not in self._static:
            self._static[key] = static = [x.clone() for x in inputs]
            return self._warm_up(static)
        static = self._static[key]
        for buffer, x in zip(static, inputs, strict=True):
            buffer.copy_(x)
        if key not in self._recorded:
            try:
                self._recorded[key] = self._record(static)
            except Exception as exc:  # a failed capture ran nothing of step
                if self.required:
                    raise
                warnings.warn(
                    f"CUDA graph capture of the solve's inner block failed ({exc}); running it "
                    "eagerly (same kernels, one launch each)",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self.enabled = False
                return self.step(*static)
        replay, outputs = self._recorded[key]
        replay()
        self.replays += 1
        return outputs

    def _warm_up(self, static: list[Tensor]) -> Sequence[Tensor]:
        """Run `step` once on the static buffers (on CUDA in a side stream, as capture needs)."""
        if not static[0].is_cuda:
            return self.step(*static)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            outputs = self.step(*static)
        torch.cuda.current_stream().wait_stream(side)
        return outputs

    def _record(self, static: list[Tensor]) -> tuple[Callable[[], object], Sequence[Tensor]]:
        """(replay, static outputs) of `step` on the static buffers; recording runs nothing."""
        if static[0].is_cuda:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = self.step(*static)
            return graph.replay, outputs
        outputs = [x.clone() for x in self.step(*[x.clone() for x in static])]

        def replay() -> None:
            for output, value in zip(outputs, self.step(*static), strict=True):
                output.copy_(value)

        return replay, outputs
