"""Distillation: T^2 * KL(teacher || student) at temperature T, by hand."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from adaptune.trainables.components import TaskContext
from adaptune.trainables.components.distill import Distillation, distillation_loss
from adaptune.trainables.config import DistillConfig

LN = math.log

# Two token positions, vocabulary of 3, T = 2. Logits are 2 * ln(weights), so that
# softmax(logits / T) = weights / sum(weights).
#   position 1: student p_s = [1, 1, 2]/4, teacher p_t = [1, 2, 1]/4
#   position 2: student p_s = [1, 1, 1]/3, teacher p_t = [2, 1, 1]/4
STUDENT = 2.0 * torch.log(torch.tensor([[[1.0, 1.0, 2.0], [1.0, 1.0, 1.0]]]))  # (1, 2, 3)
TEACHER = 2.0 * torch.log(torch.tensor([[[1.0, 2.0, 1.0], [2.0, 1.0, 1.0]]]))
# KL(p_t || p_s) = sum_v p_t log(p_t / p_s):
#   position 1: 1/4 log 1 + 1/2 log 2 + 1/4 log(1/2) = 1/4 ln 2
#   position 2: 1/2 log(3/2) + 1/4 log(3/4) + 1/4 log(3/4) = 1/2 ln(9/8)
KL_1 = 0.25 * LN(2.0)
KL_2 = 0.5 * LN(9.0 / 8.0)
# mean over the 2 positions, times T^2 = 4: 2 * (1/4 ln 2 + 1/2 ln(9/8)) = 1/2 ln 2 + ln(9/8)
EXPECTED_T2 = 4.0 * (KL_1 + KL_2) / 2.0  # = 0.464357...


def test_zero_when_teacher_equals_student() -> None:
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    for temperature in (0.5, 1.0, 2.0, 4.0):
        assert float(distillation_loss(logits, logits.clone(), temperature)) == pytest.approx(
            0.0, abs=1e-6
        )


def test_hand_computed_kl_at_t2() -> None:
    assert EXPECTED_T2 == pytest.approx(0.5 * LN(2.0) + LN(9.0 / 8.0))
    assert float(distillation_loss(STUDENT, TEACHER, 2.0)) == pytest.approx(EXPECTED_T2, rel=1e-6)
    assert EXPECTED_T2 == pytest.approx(0.464357, abs=1e-6)


def test_direction_is_kl_teacher_to_student() -> None:
    # The reverse KL(p_s || p_t) differs here:
    #   position 1: 1/4 log 1 + 1/4 log(1/2) + 1/2 log 2 = 1/4 ln 2   (same)
    #   position 2: 1/3 log((1/3)/(1/2)) + 2 * 1/3 log((1/3)/(1/4)) = 1/3 ln(2/3) + 2/3 ln(4/3)
    reverse = 4.0 * (0.25 * LN(2.0) + (2 / 3) * LN(4 / 3) + (1 / 3) * LN(2 / 3)) / 2.0
    assert abs(reverse - EXPECTED_T2) > 1e-3
    assert float(distillation_loss(TEACHER, STUDENT, 2.0)) == pytest.approx(reverse, rel=1e-6)


def test_t_squared_factor_explicitly() -> None:
    # T^2 * KL(softmax(t/T) || softmax(s/T)); at T = 1 on pre-divided logits the factor is 1.
    for temperature in (0.5, 2.0, 3.0):
        at_t = float(distillation_loss(STUDENT, TEACHER, temperature))
        manual = temperature**2 * float(
            distillation_loss(STUDENT / temperature, TEACHER / temperature, 1.0)
        )
        assert at_t == pytest.approx(manual, rel=1e-6)
    # and the hand example: T = 2 is exactly 4x the plain KL of the tempered distributions
    assert float(distillation_loss(STUDENT / 2, TEACHER / 2, 1.0)) == pytest.approx(
        (KL_1 + KL_2) / 2, rel=1e-6
    )


def test_gradient_by_hand() -> None:
    # d/dz_s [T^2 * KL] = T * (p_s - p_t) per position, divided by the 2 positions (the mean):
    #   position 1: 2 * ([1/4, 1/4, 1/2] - [1/4, 1/2, 1/4]) / 2 = [0, -1/4, 1/4]
    #   position 2: 2 * ([1/3, 1/3, 1/3] - [1/2, 1/4, 1/4]) / 2 = [-1/6, 1/12, 1/12]
    student = STUDENT.clone().requires_grad_(True)
    distillation_loss(student, TEACHER, 2.0).backward()
    expected = torch.tensor([[[0.0, -0.25, 0.25], [-1 / 6, 1 / 12, 1 / 12]]])
    torch.testing.assert_close(student.grad, expected, rtol=1e-5, atol=1e-6)


def test_gradient_scale_independent_of_temperature_for_large_t() -> None:
    # With T^2 the gradient tends to (z_s - z_t - mean) / (V * positions) as T grows: the same
    # at T = 5 and T = 10. Without T^2 it would shrink by 4x between them.
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(1, 4, 6, generator=gen) * 0.1
    t = torch.randn(1, 4, 6, generator=gen) * 0.1
    grads = []
    for temperature in (5.0, 10.0):
        x = s.clone().requires_grad_(True)
        distillation_loss(x, t, temperature).backward()
        grads.append(x.grad)
    ratio = grads[0].norm() / grads[1].norm()
    assert float(ratio) == pytest.approx(1.0, abs=0.02)
    d = s - t
    limit = (d - d.mean(-1, keepdim=True)) / (6 * 4)
    torch.testing.assert_close(grads[1], limit, rtol=0.02, atol=1e-4)


def test_mean_over_positions_not_sum() -> None:
    # Repeating the batch must not change the value.
    doubled = distillation_loss(STUDENT.repeat(3, 1, 1), TEACHER.repeat(3, 1, 1), 2.0)
    assert float(doubled) == pytest.approx(EXPECTED_T2, rel=1e-6)


def _tiny_gpt() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    return transformers.GPT2LMHeadModel(config)


def _ctx(model: torch.nn.Module, *, k: int, pretrained: bool = False) -> TaskContext:
    return TaskContext(
        model=model,
        train_blocks=torch.zeros(4, 8, dtype=torch.long),
        generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
        k=k,
        n_tasks=3,
        batch_size=2,
        pretrained=pretrained,
    )


@pytest.mark.parametrize(
    ("k", "pretrained", "teacher"),
    [(1, False, False), (1, True, True), (2, False, True), (3, True, True)],
)
def test_teacher_only_when_the_model_knows_something(
    k: int, pretrained: bool, teacher: bool
) -> None:
    # A fresh model's first task has nothing to preserve; a pretrained one, or any later task, has.
    comp = Distillation(DistillConfig(distill_alpha=0.5))
    comp.before_task(_ctx(_tiny_gpt(), k=k, pretrained=pretrained))
    assert (comp.teacher is not None) is teacher


def test_component_teacher_is_a_frozen_copy_and_alpha_scales() -> None:
    model = _tiny_gpt().train()
    batch = torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(1))
    comp = Distillation(DistillConfig(distill_alpha=0.5, temperature=2.0))
    comp.before_task(_ctx(model, k=1))
    assert comp.teacher is None
    ctx = _ctx(model, k=2)
    assert comp.penalty(ctx, batch, model(input_ids=batch).logits) is None

    comp.before_task(ctx)
    assert comp.teacher is not None and comp.teacher is not model
    assert not comp.teacher.training
    assert all(not p.requires_grad for p in comp.teacher.parameters())
    model.eval()  # dropout off so student == teacher exactly
    same = comp.penalty(ctx, batch, model(input_ids=batch).logits)
    assert same is not None and float(same.detach()) == pytest.approx(0.0, abs=1e-6)

    # change the student: penalty = distill_alpha * distillation_loss(student, teacher)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    logits = model(input_ids=batch).logits
    teacher_logits = comp.teacher(input_ids=batch).logits
    penalty = comp.penalty(ctx, batch, logits)
    assert penalty is not None
    expected = 0.5 * float(distillation_loss(logits, teacher_logits, 2.0).detach())
    assert expected > 1e-6
    assert float(penalty.detach()) == pytest.approx(expected, rel=1e-5)
