"""Distillation (Learning without Forgetting, Li & Hoiem 2016) from the task-start model."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from adaptune.trainables.components.base import Component, TaskContext
from adaptune.trainables.config import DistillConfig
from torch import Tensor, nn


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``, averaged over token positions.

    The T² factor keeps the gradient scale independent of T (Hinton et al. 2015). Logits are
    (..., V); the result is 0 when the two are equal.
    """
    vocab = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    kl = F.kl_div(s, t, log_target=True, reduction="batchmean")  # sum_v p_t (log p_t - log p_s)
    return temperature**2 * kl


class Distillation(Component):
    """Teacher = frozen copy of the model at the start of each task.

    The penalty covers the whole batch, current and replayed blocks alike. On the first task of a
    randomly initialised model there is nothing to preserve, so the teacher is taken only when
    the model already knows something (a later task, or a pretrained/loaded base model).
    """

    def __init__(self, cfg: DistillConfig) -> None:
        self.distill_alpha = cfg.distill_alpha
        self.temperature = cfg.temperature
        self.teacher: nn.Module | None = None

    def before_task(self, ctx: TaskContext) -> None:
        self.teacher = None
        if ctx.knows_something:
            self.teacher = copy.deepcopy(ctx.model).eval().requires_grad_(False)

    def penalty(self, ctx: TaskContext, batch: Tensor, logits: Tensor) -> Tensor | None:
        if self.teacher is None:
            return None
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=batch).logits  # (B, T, V)
        return self.distill_alpha * distillation_loss(logits, teacher_logits, self.temperature)
