"""Consistency and autoregressive losses of CLLM training (Kou et al. 2024, Sec. 3.2, Eqs. 4-7) and of Jacobi
Forcing (arXiv 2512.14681).

Notation: a block of n tokens ``y = (y_1 … y_n)`` after a context; "block position i" is the model's
distribution ``q(. | context, y_{<i})`` over the token ``y_i`` (logits at the input position of ``y_{i-1}``,
or of the context's last token for i = 1). A Jacobi trajectory ``y^(0) … y^(K) = y*`` ends at the fixed
point ``y*``.

* Global consistency (Eq. 5): for a point ``y^(j)``, pull ``q(. | y^(j)_{<i})`` towards
  ``q(. | y*_{<i})`` at every block position, so that any state jumps to the fixed point.
* Local consistency (Eq. 6): pull ``q(. | y^(j)_{<i})`` towards ``q(. | y^(j+1)_{<i})``, the next point.
* AR loss (Eq. 7): next-token cross-entropy on an answer (the target's own greedy output, or the
  dataset's reference), which keeps generation quality; the paper weights it heavily (w = 10 in its code).
* Distillation: KL(teacher || student) at the AR loss's positions, the teacher a frozen copy of the original
  target. The AR label keeps only the target's argmax; the KL keeps its whole next-token distribution, so
  the runner-up tokens (and with them the answers greedy decoding would give after a small drift) stay put.
* Jacobi Forcing: global consistency of every block of an answer at once, student and teacher from one
  packed forward (:mod:`cllm_rt.training.packing`): the noisy copy of block k (a trajectory state chosen by
  a noise schedule) against the detached clean copy (the fixed point). JF's code uses soft cross-entropy;
  its gradient is the KL's (they differ by the teacher's entropy, a constant), so the same function serves.

Choices, all made explicit here:
  * Distance: forward KL(target || student), with the target side detached (the paper's stop-gradient
    ``q_{θ⁻}``). Its gradient equals that of the paper code's soft cross-entropy; KL is chosen because it
    is 0 at a perfect match, so the logged value reads directly as "distance left".
  * Masking: position i counts only if the student's prefix ``y_{<i}`` differs from the target's: where the
    prefixes agree (the converged prefix of the block, always including i = 1) both sides see identical
    inputs, so the distance is exactly 0 and would only dilute the mean — the paper's code masks the same
    positions (up to the one position where that holds by construction). Positions past the fixed point's
    first EOS are masked too (``valid`` counts positions up to and including EOS): their targets are
    padding in the paper's code.
  * Reduction: the mean over a row's counted positions, then the mean over rows (a row with none counts as
    0). Unlike the paper code's mean over all positions of a micro-batch, this makes the loss of a global
    batch independent of how it is split into micro-batches and processes, so gradient accumulation and
    DDP give the same update as one large batch. For Jacobi Forcing a row is a block and a sample an answer:
    ``row_weights`` = 1 / (answers x blocks of the row's answer) makes the loss the mean over answers of the
    mean over their blocks (a block without a noisy copy counts as 0), again independent of the split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def counted_positions(student_block: torch.Tensor, target_block: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mask ``[B, n]`` of the block positions a consistency loss counts (see the module docstring).

    student_block, target_block: [B, n] the points whose prefixes condition each side; valid: [B].
    """
    n = student_block.shape[1]
    differs_so_far = (student_block != target_block).long().cumsum(1) > 0  # [B, n]: some y_j differs, j <= i
    prefix_differs = F.pad(differs_so_far[:, :-1], (1, 0), value=False)  # shift: some y_j differs, j < i
    before_eos = torch.arange(n, device=valid.device)[None, :] < valid[:, None]
    return prefix_differs & before_eos


def _row_mean(values: torch.Tensor, mask: torch.Tensor, row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over each row's masked-in entries (a row without any gives 0), then the mean over rows, or their
    sum weighted by ``row_weights`` [B]."""
    per_row = (values * mask).sum(1) / mask.sum(1).clamp(min=1)
    return per_row.mean() if row_weights is None else (per_row * row_weights.to(per_row.dtype)).sum()


def consistency_loss(student_logits: torch.Tensor, target_logits: torch.Tensor, student_block: torch.Tensor,
                     target_block: torch.Tensor, valid: torch.Tensor,
                     row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """KL(target || student) per counted block position, averaged per row then over rows (or weighted).

    student_logits, target_logits: [B, n, V] at the block positions; the target is detached here.
    Global consistency and Jacobi Forcing pass the fixed point as ``target_block``; local consistency the
    next point.
    """
    kl = _kl(student_logits, target_logits)  # [B, n]
    return _row_mean(kl, counted_positions(student_block, target_block, valid), row_weights)


def _kl(student_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """KL(target || student) over the last (vocabulary) axis, the target detached. Computed in float32 at least
    (bf16 logits under autocast), and in float64 for float64 logits, so that a test can see 0 at a match."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    student = F.log_softmax(student_logits.to(dtype), -1)
    target = F.log_softmax(target_logits.detach().to(dtype), -1)
    return F.kl_div(student, target, log_target=True, reduction="none").sum(-1)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) at the answer positions in ``mask`` [B, T] (logits [B, T, V], aligned as for
    :func:`autoregressive_loss`; the teacher detached); mean per row, then over rows, as the AR term, so a
    global batch's value does not depend on its split into micro-batches and processes."""
    return _row_mean(_kl(student_logits, teacher_logits), mask)


def autoregressive_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of ``labels`` [B, T] under ``logits`` [B, T, V] (already aligned: logits[:, t]
    predicts labels[:, t]) over the answer positions in ``mask`` [B, T]; mean per row, then over rows."""
    nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
    return _row_mean(nll, mask)
