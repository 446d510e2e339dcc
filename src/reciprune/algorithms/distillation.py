"""Distillation losses between a student's and a teacher's outputs at one layer.

Each function compares `student` and `teacher` of shape [..., D] (hidden states [B, T, H] or
logits [B, T, V]) at the same positions, counts only the positions where `mask` (shape [...],
e.g. the attention mask [B, T], bool or 1/0) is set, computes in fp32 and returns a scalar
that carries the student's gradient. `mask=None` counts every position. The teacher is
treated as a constant (it is detached).

Memory: a loss is summed over `chunk_size` tokens at a time (default: as many as make 2²²
elements, 16 MiB per fp32 temporary), and its gradient is recomputed chunk by chunk from a
closed form in backward. Autograd keeps only the student and teacher outputs in their own
dtype (already alive), the mask and a few scalars — no fp32 copy of a layer's outputs lives
beyond one chunk. The gradient comes back in the student's dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

#: Elements of one fp32 chunk when `chunk_size` is not given (16 MiB).
CHUNK_ELEMENTS = 1 << 22
_TINY = torch.finfo(torch.float32).tiny

# sums(s, t, keep) -> the chunk's fp32 sums; value(sums, n) -> the loss from the totals over
# all chunks and the number n of counted tokens; grad(s, t, keep, sums, n) -> ∂L/∂s of the
# chunk in fp32 (it may be s or t, overwritten). s and t are fp32 chunks [rows, D] whose
# padding rows are zero: fresh copies that sums and grad may overwrite, which saves
# chunk-sized temporaries; keep is the chunk's mask as 1/0 floats [rows, 1].
Sums = Callable[[Tensor, Tensor, Tensor], Tensor]
Value = Callable[[Tensor, Tensor], Tensor]
Grad = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


class _Chunked(torch.autograd.Function):
    """L(s, t) and ∂L/∂s in fp32, `rows` tokens at a time, saving only s, t, the mask, scalars."""

    @staticmethod
    def forward(
        ctx: Any,
        s: Tensor,
        t: Tensor,
        keep: Tensor | None,
        rows: int,
        sums: Sums,
        value: Value,
        grad: Grad,
    ) -> Tensor:
        N = s.shape[0]
        n = keep.sum(dtype=torch.float32) if keep is not None else torch.tensor(float(N))
        n = n.to(s.device)
        # range(max(N, 1)): with no tokens at all, one empty chunk gives the zero sums
        chunks = range(0, max(N, 1), rows)
        totals = torch.stack([sums(*_chunk(s, t, keep, i, rows)) for i in chunks]).sum(0)
        ctx.save_for_backward(s, t, keep, totals, n)
        ctx.rows, ctx.grad = rows, grad
        return value(totals, n)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        s, t, keep, totals, n = ctx.saved_tensors
        out = torch.empty(s.shape, dtype=s.dtype, device=s.device)
        for i in range(0, s.shape[0], ctx.rows):
            out[i : i + ctx.rows] = ctx.grad(*_chunk(s, t, keep, i, ctx.rows), totals, n).mul_(g)
        return out, None, None, None, None, None, None


def _chunk(s: Tensor, t: Tensor, keep: Tensor | None, i: int, rows: int) -> tuple[Tensor, ...]:
    """Rows i … i+rows of s and t as new fp32 tensors with padding rows zeroed, and their mask."""
    # copy=True: the chunk is zeroed in place, and an fp32 input must not be
    s = s[i : i + rows].to(torch.float32, copy=True)
    t = t[i : i + rows].to(torch.float32, copy=True)
    if keep is None:
        return s, t, s.new_ones(s.shape[0], 1)
    pad = ~keep[i : i + rows, None]
    return s.masked_fill_(pad, 0.0), t.masked_fill_(pad, 0.0), (~pad).to(torch.float32)


def _compare(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor | None,
    chunk_size: int | None,
    sums: Sums,
    value: Value,
    grad: Grad,
) -> Tensor:
    """Check the shapes, flatten the positions (a view when contiguous) and run `_Chunked`."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"student output {tuple(student.shape)} and teacher output {tuple(teacher.shape)} "
            "differ in shape; distillation compares outputs of the same shape"
        )
    if mask is not None and mask.shape != student.shape[:-1]:
        raise ValueError(
            f"mask {tuple(mask.shape)} does not match the positions {tuple(student.shape[:-1])} "
            "of the outputs"
        )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1 token, got {chunk_size}")
    D = student.shape[-1]
    rows = chunk_size or max(1, CHUNK_ELEMENTS // max(D, 1))
    keep = None if mask is None else mask.reshape(-1).to(device=student.device, dtype=torch.bool)
    s, t = student.reshape(-1, D), teacher.detach().reshape(-1, D)
    return _Chunked.apply(s, t, keep, rows, sums, value, grad)


def square_head_loss(
    student: Tensor, teacher: Tensor, mask: Tensor | None = None, *, chunk_size: int | None = None
) -> Tensor:
    """SquareHead loss of one layer: the teacher-normalised squared error.

    Kurtic, Kuznedelev, Frantar, Goin & Alistarh, "Sparse Fine-tuning for Inference Acceleration
    of Large Language Models", 2023, Sec. 3 (eq. 1):

        L_l = Σ_{i ∈ tokens} Σ_h (t_ih − s_ih)²  /  Σ_{i ∈ tokens} Σ_h t_ih²

    with one sum over every non-padding token i of the whole batch (not a mean of per-sequence
    ratios), as in SparseML. The normalisation makes layers of different scale comparable.
    The teacher being constant, the gradient is

        ∂L_l/∂s_ih = −2 (t_ih − s_ih) / Σ_{j ∈ tokens} Σ_h t_jh²    (0 at padding).
    """

    def sums(s: Tensor, t: Tensor, keep: Tensor) -> Tensor:
        return torch.stack([(t - s).square_().sum(), t.square_().sum()])

    def value(sums: Tensor, n: Tensor) -> Tensor:
        return sums[0] / sums[1].clamp_min(_TINY)

    def grad(s: Tensor, t: Tensor, keep: Tensor, sums: Tensor, n: Tensor) -> Tensor:
        return s.sub_(t).mul_(2.0 / sums[1].clamp_min(_TINY))

    return _compare(student, teacher, mask, chunk_size, sums, value, grad)


def kl_divergence_loss(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    *,
    chunk_size: int | None = None,
) -> Tensor:
    """Hinton knowledge distillation: KL(teacher ‖ student) of the tempered softmaxes, × T².

    Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015:

        p = softmax(t / T),  q = softmax(s / T)   over the last dim
        L = T² · (1/N) Σ_{i ∈ tokens} Σ_v p_iv (log p_iv − log q_iv)

    averaged over the N non-padding tokens. The T² keeps the gradient scale independent of T;
    this is SparseML's `kl_logsoftmax` (legacy DistillationModifier), with padding excluded.
    The gradient, with Σ_v p_iv = 1, is

        ∂L/∂s_iv = (T / N) (q_iv − p_iv)    (0 at padding).

    Both log-softmaxes are taken per chunk of tokens, so a [B, T, V] logit tensor is never
    copied whole to fp32; backward recomputes q and p chunk by chunk.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    T = temperature

    def sums(s: Tensor, t: Tensor, keep: Tensor) -> Tensor:
        log_q = F.log_softmax(s.div_(T), dim=-1)
        log_p = F.log_softmax(t.div_(T), dim=-1)
        per_token = (log_p - log_q).mul_(log_p.exp()).sum(-1, keepdim=True)
        return (per_token * keep).sum()

    def value(sums: Tensor, n: Tensor) -> Tensor:
        return sums / n.clamp_min(1.0) * T**2

    def grad(s: Tensor, t: Tensor, keep: Tensor, sums: Tensor, n: Tensor) -> Tensor:
        q = F.softmax(s.div_(T), dim=-1)
        return q.sub_(F.softmax(t.div_(T), dim=-1)).mul_(keep * (T / n.clamp_min(1.0)))

    return _compare(student, teacher, mask, chunk_size, sums, value, grad)


def mse_loss(
    student: Tensor, teacher: Tensor, mask: Tensor | None = None, *, chunk_size: int | None = None
) -> Tensor:
    """Mean squared error over the non-padding tokens and the last dim:

        L = (1 / (N·D)) Σ_{i ∈ tokens} Σ_d (s_id − t_id)²,   ∂L/∂s_id = 2 (s_id − t_id) / (N·D).
    """
    D = student.shape[-1]

    def sums(s: Tensor, t: Tensor, keep: Tensor) -> Tensor:
        return s.sub_(t).square_().sum()

    def value(sums: Tensor, n: Tensor) -> Tensor:
        return sums / (n * D).clamp_min(1.0)

    def grad(s: Tensor, t: Tensor, keep: Tensor, sums: Tensor, n: Tensor) -> Tensor:
        return s.sub_(t).mul_(2.0 / (n * D).clamp_min(1.0))

    return _compare(student, teacher, mask, chunk_size, sums, value, grad)


def cosine_loss(
    student: Tensor, teacher: Tensor, mask: Tensor | None = None, *, chunk_size: int | None = None
) -> Tensor:
    """One minus the cosine similarity over the last dim, averaged over the non-padding tokens:

        c_i = s_i·t_i / (a_i b_i),   a_i = max(‖s_i‖, ε),  b_i = max(‖t_i‖, ε),  ε = 1e-8
        L = (1/N) Σ_{i ∈ tokens} (1 − c_i)
        ∂L/∂s_i = −(1/N) (t_i / (a_i b_i) − c_i s_i / a_i² · [‖s_i‖ ≥ ε])    (0 at padding).
    """
    eps = 1e-8

    def cosine(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per token [rows, 1]: c, a, b and [‖s‖ ≥ ε]."""
        norm_s = s.norm(dim=-1, keepdim=True)
        a, b = norm_s.clamp_min(eps), t.norm(dim=-1, keepdim=True).clamp_min(eps)
        return (s * t).sum(-1, keepdim=True) / (a * b), a, b, norm_s >= eps

    def sums(s: Tensor, t: Tensor, keep: Tensor) -> Tensor:
        c = cosine(s, t)[0]
        return ((1.0 - c) * keep).sum()

    def value(sums: Tensor, n: Tensor) -> Tensor:
        return sums / n.clamp_min(1.0)

    def grad(s: Tensor, t: Tensor, keep: Tensor, sums: Tensor, n: Tensor) -> Tensor:
        c, a, b, unclamped = cosine(s, t)
        scale = keep / n.clamp_min(1.0)
        return s.mul_(c * unclamped / a.square() * scale).sub_(t.mul_(scale / (a * b)))

    return _compare(student, teacher, mask, chunk_size, sums, value, grad)


#: Comparison functions by name; `kl_divergence_loss` also takes `temperature`.
COMPARISONS: dict[str, Callable[..., Tensor]] = {
    "square_head": square_head_loss,
    "kl_divergence": kl_divergence_loss,
    "mse": mse_loss,
    "cosine": cosine_loss,
}
