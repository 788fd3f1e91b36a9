"""Mean-teacher losses: consistency (MSE of softmaxes), pseudo-label cross-entropy, ramp-ups, EMA."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sigmoid_rampup(current: float, length: float) -> float:
    """Laine & Aila / Tarvainen ramp-up ``exp(-5 (1 - t)^2)``, ``t = clip(current / length, 0, 1)``.

    ``length <= 0`` means no ramp-up (1.0).
    """
    if length <= 0:
        return 1.0
    t = min(max(float(current) / float(length), 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def consistency_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """MSE between student and teacher softmax outputs: squared differences summed over classes,
    averaged over the batch. The teacher side is detached. An empty batch gives 0."""
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    p = F.softmax(student_logits.float(), dim=1)
    q = F.softmax(teacher_logits.detach().float(), dim=1)
    return ((p - q) ** 2).sum(dim=1).mean()


def pseudo_label_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits`` against pseudo labels, averaged over rows with a target >= 0;
    0 (keeping the graph) when no row has one."""
    has = targets >= 0
    if not bool(has.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[has].float(), targets[has])


def ema_decay(
    step: int, decay: float, warmup: bool, total_steps: int | None = None, max_window: float = 0.0
) -> float:
    """Teacher decay at optimiser step ``step`` (0-based).

    With ``warmup``, Tarvainen & Valpola's ramp ``min(1 - 1/(step + 1), decay)``: the teacher starts
    as the running mean of the student. With ``max_window > 0`` and the run's ``total_steps``, the
    decay is also capped at ``1 - 1/(max_window * total_steps)``, so the teacher never averages over
    more than that fraction of the run (0.99 over a 100-step run would otherwise be close to a
    uniform mean of the whole run from the random initialisation); long runs are unaffected.
    """
    value = min(1.0 - 1.0 / (step + 1.0), decay) if warmup else decay
    if max_window > 0 and total_steps:
        value = min(value, 1.0 - 1.0 / max(1.0, max_window * total_steps))
    return value


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """``teacher = decay * teacher + (1 - decay) * student`` for floating parameters and buffers;
    integer buffers (BatchNorm's ``num_batches_tracked``) are copied."""
    t_state, s_state = teacher.state_dict(), student.state_dict()
    floats_t, floats_s = [], []
    for key, tv in t_state.items():
        sv = s_state[key]
        if tv.is_floating_point():
            floats_t.append(tv)
            floats_s.append(sv.detach().to(tv.dtype))
        else:
            tv.copy_(sv)
    if floats_t:
        torch._foreach_lerp_(floats_t, floats_s, 1.0 - decay)


def soft_pseudo_label_loss(logits: torch.Tensor, rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The paper's L_pSoftmax: cross-entropy ``-sum_c q_c log softmax(logits)_c`` against soft targets
    ``q = table[rows]`` (the previous round's averaged teacher probabilities), averaged over rows
    with ``rows >= 0``; 0 (keeping the graph) when none has one."""
    has = rows >= 0
    if not bool(has.any()):
        return logits.sum() * 0.0
    q = table[rows[has]]
    return -(q * F.log_softmax(logits[has].float(), dim=1)).sum(dim=1).mean()
