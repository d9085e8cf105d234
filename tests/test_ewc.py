"""EWC: per-sequence empirical Fisher, the quadratic penalty and its consolidation, by hand."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from adaptune.trainables.components import TaskContext
from adaptune.trainables.components.ewc import EWC, estimate_fisher, ewc_penalty, sample_labels
from adaptune.trainables.config import EWCConfig
from adaptune.trainables.model import next_token_loss
from conftest import tiny_experiment
from safetensors.torch import load_file, save_file
from torch import nn

LN3 = math.log(3.0)


class TwoParam(nn.Module):
    """A 2-token-vocabulary "LM" with two scalar parameters ``a`` and ``b``.

    At every position t the logits are ``[a * c_t, b]`` with ``c_t = 1 + x_t`` (x_t in {0, 1}),
    so the softmax and its gradient are easy to write out by hand.
    """

    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.b = nn.Parameter(torch.tensor(b))

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        c = 1.0 + input_ids.float()  # (B, T)
        logits = torch.stack([self.a * c, self.b.expand_as(c)], dim=-1)  # (B, T, 2)
        return SimpleNamespace(logits=logits)


# Two blocks of 3 tokens; the loss of a block is the mean over its 2 next-token predictions.
BLOCKS = torch.tensor([[0, 0, 1], [1, 1, 1]])
# With a = ln 3, b = 0 and dCE/dz = p - onehot(y), dz0/da = c, dz1/db = 1:
# block 1, pos 0: c=1, p=[3/4, 1/4], y=0 -> dz=(-1/4, 1/4) -> (ga, gb) = (-1/4, 1/4)
#          pos 1: c=1, p=[3/4, 1/4], y=1 -> dz=(3/4, -3/4) -> (ga, gb) = (3/4, -3/4)
#          mean over positions: g1 = (1/4, -1/4)
# block 2, pos 0: c=2, p=[9/10, 1/10], y=1 -> dz=(9/10, -9/10) -> (ga, gb) = (9/5, -9/10)
#          pos 1: identical -> g2 = (9/5, -9/10)
# F = (g1^2 + g2^2) / 2:
#   F_a = (1/16 + 81/25) / 2 = (0.0625 + 3.24) / 2 = 1.65125
#   F_b = (1/16 + 81/100) / 2 = (0.0625 + 0.81) / 2 = 0.43625
FISHER_A = 1.65125
FISHER_B = 0.43625


def _ctx(
    model: nn.Module,
    *,
    k: int = 1,
    n_tasks: int = 2,
    seed: int = 0,
    device: str = "cpu",
) -> TaskContext:
    return TaskContext(
        model=model,
        train_blocks=BLOCKS,
        generator=torch.Generator().manual_seed(seed),
        device=torch.device(device),
        k=k,
        n_tasks=n_tasks,
        batch_size=2,
        pretrained=False,
    )


def test_next_token_loss_by_hand() -> None:
    model = TwoParam(LN3, 0.0)
    # block 1: -(log 3/4 + log 1/4) / 2
    loss = next_token_loss(model(BLOCKS[:1]).logits, BLOCKS[:1])
    assert float(loss.detach()) == pytest.approx(-(math.log(0.75) + math.log(0.25)) / 2, rel=1e-6)


def test_per_sequence_gradients_by_hand() -> None:
    # The hand-derived g1, g2 above, checked through autograd before trusting the Fisher.
    model = TwoParam(LN3, 0.0)
    for row, (ga, gb) in zip(BLOCKS, [(0.25, -0.25), (1.8, -0.9)], strict=True):
        model.zero_grad()
        next_token_loss(model(row[None]).logits, row[None]).backward()
        assert float(model.a.grad) == pytest.approx(ga, rel=1e-5)
        assert float(model.b.grad) == pytest.approx(gb, rel=1e-5)


def test_estimate_fisher_is_mean_of_squared_per_sequence_gradients() -> None:
    model = TwoParam(LN3, 0.0)
    model.train()
    fisher = estimate_fisher(model, BLOCKS)
    assert set(fisher) == {"a", "b"}
    assert fisher["a"].dtype == torch.float32
    assert float(fisher["a"]) == pytest.approx(FISHER_A, rel=1e-5)
    assert float(fisher["b"]) == pytest.approx(FISHER_B, rel=1e-5)
    # A batch-gradient Fisher would be ((1/4 + 9/5) / 2)^2 = 1.050625 for `a`: not this one.
    assert abs(float(fisher["a"]) - 1.050625) > 0.5
    # gradients cleared, training mode restored
    assert model.a.grad is None and model.b.grad is None
    assert model.training


def test_estimate_fisher_skips_frozen_parameters() -> None:
    model = TwoParam(LN3, 0.0)
    model.b.requires_grad_(False)
    fisher = estimate_fisher(model, BLOCKS)
    assert set(fisher) == {"a"}
    assert float(fisher["a"]) == pytest.approx(FISHER_A, rel=1e-5)


def test_fisher_on_a_transformers_gpt_uses_vmap_and_matches_the_loop() -> None:
    # The fast path must really run on the default model (a silent fallback to the loop would
    # still give right numbers, only slower), and give the loop's numbers; the model's
    # pad-token setting and attention implementation are restored afterwards.
    from adaptune.trainables.components.ewc import _fisher_loop, _fisher_vmap
    from adaptune.trainables.config import ModelConfig
    from adaptune.trainables.model import build_model
    from transformers import ByT5Tokenizer

    torch.manual_seed(0)
    tok = ByT5Tokenizer()
    tiny = tiny_experiment(run={"model": {"n_positions": 16}})["run"]["model"]
    model = build_model(ModelConfig(**tiny), tok).eval()
    pad, attn = model.config.pad_token_id, model.config._attn_implementation
    assert pad is not None  # the check that used to break vmap is live on this model
    blocks = torch.randint(3, 250, (6, 16))
    # the empirical labels, and labels drawn from the model (the sampled Fisher)
    drawn = sample_labels(model, blocks, torch.Generator().manual_seed(0))
    assert drawn.shape == (6, 15) and not torch.equal(drawn, blocks[:, 1:])
    for labels in (blocks[:, 1:], drawn):
        fast = _fisher_vmap(model, blocks, labels)
        slow = _fisher_loop(model, blocks, labels)
        assert set(fast) == set(slow)
        for name in slow:
            torch.testing.assert_close(fast[name], slow[name], rtol=1e-4, atol=1e-9)
    assert model.config.pad_token_id == pad
    assert model.config._attn_implementation == attn


def test_ewc_penalty_by_hand() -> None:
    params = {"w": torch.tensor([1.0, 3.0]), "b": torch.tensor(2.0)}
    precision = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(0.5)}
    anchor = {"w": torch.tensor([0.0, 1.0]), "b": torch.tensor(-1.0)}
    # sum F (theta - theta*)^2 = 1*(1-0)^2 + 2*(3-1)^2 + 0.5*(2+1)^2 = 1 + 8 + 4.5 = 13.5
    # lambda/2 * 13.5 with lambda = 4 -> 27.0
    assert float(ewc_penalty(params, precision, anchor, ewc_lambda=4.0)) == pytest.approx(27.0)
    assert float(ewc_penalty(params, precision, anchor, ewc_lambda=0.0)) == 0.0


def _ewc(mode: str = "separate", ewc_lambda: float = 2.0, ewc_gamma: float = 1.0) -> EWC:
    return EWC(EWCConfig(ewc_lambda=ewc_lambda, ewc_mode=mode, ewc_gamma=ewc_gamma))


def _t(x: float) -> torch.Tensor:
    return torch.tensor(x)


# Two tasks' (F, theta*) on the two scalar parameters a and b.
F1 = {"a": 2.0, "b": 0.0}
THETA1 = {"a": 1.0, "b": 5.0}
F2 = {"a": 1.0, "b": 3.0}
THETA2 = {"a": -2.0, "b": 1.0}


def _consolidated(ewc: EWC) -> EWC:
    ewc.consolidate({k: _t(v) for k, v in F1.items()}, {k: _t(v) for k, v in THETA1.items()})
    ewc.consolidate({k: _t(v) for k, v in F2.items()}, {k: _t(v) for k, v in THETA2.items()})
    return ewc


def _penalty_at(ewc: EWC, a: float, b: float) -> float:
    value = ewc.penalty(_ctx(TwoParam(a, b)), BLOCKS, torch.empty(0))
    assert value is not None
    return float(value.detach())


def test_penalty_is_none_before_any_task() -> None:
    assert _ewc().penalty(_ctx(TwoParam(0.0, 0.0)), BLOCKS, torch.empty(0)) is None


def test_separate_mode_after_one_task_by_hand() -> None:
    ewc = _ewc(ewc_lambda=2.0)
    ewc.consolidate({k: _t(v) for k, v in F1.items()}, {k: _t(v) for k, v in THETA1.items()})
    # lambda/2 * [2*(0-1)^2 + 0*(0-5)^2] = 1 * 2 = 2
    assert _penalty_at(ewc, 0.0, 0.0) == pytest.approx(2.0)
    assert _penalty_at(ewc, 1.0, 123.0) == pytest.approx(0.0)  # b has zero Fisher


def test_separate_mode_two_tasks_by_hand() -> None:
    ewc = _consolidated(_ewc(ewc_lambda=2.0))
    # At theta = (0, 0):
    #   task 1: 2*(0-1)^2 + 0*(0-5)^2 = 2
    #   task 2: 1*(0+2)^2 + 3*(0-1)^2 = 4 + 3 = 7
    #   lambda/2 * (2 + 7) = 9
    assert _penalty_at(ewc, 0.0, 0.0) == pytest.approx(9.0, abs=1e-6)
    # The merged quadratic: A = F1 + F2 = (3, 3); mu = (F1 th1 + F2 th2) / A = (0, 1);
    # constant = sum A1 F2 / (A1 + F2) (th1 - th2)^2 = 2*1/3 * 3^2 + 0 = 6
    assert float(ewc.precision["a"]) == pytest.approx(3.0)
    assert float(ewc.precision["b"]) == pytest.approx(3.0)
    assert float(ewc.anchor["a"]) == pytest.approx(0.0)
    assert float(ewc.anchor["b"]) == pytest.approx(1.0)
    assert ewc.constant == pytest.approx(6.0)


@pytest.mark.parametrize("theta", [(0.3, -1.7), (4.0, 2.5), (-3.0, 10.0), (1.0, 5.0)])
def test_separate_mode_equals_sum_of_separate_quadratics(theta: tuple[float, float]) -> None:
    ewc = _consolidated(_ewc(ewc_lambda=2.0))
    a, b = theta
    expected = sum(
        F[k] * (x - TH[k]) ** 2
        for F, TH in [(F1, THETA1), (F2, THETA2)]
        for k, x in (("a", a), ("b", b))
    )  # lambda/2 = 1
    # float32 storage: equal to 1e-6 relative (28.14 comes back as 28.1400013)
    assert _penalty_at(ewc, a, b) == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_separate_mode_three_tasks_random() -> None:
    gen = torch.Generator().manual_seed(0)
    tasks = []
    for _ in range(3):
        fisher = torch.rand(5, generator=gen) * (torch.rand(5, generator=gen) > 0.3)  # some zeros
        tasks.append((fisher, torch.randn(5, generator=gen)))
    ewc = EWC(EWCConfig(ewc_lambda=0.7))
    for f, th in tasks:
        ewc.consolidate({"w": f.clone()}, {"w": th.clone()})
    for _ in range(5):
        w = torch.randn(5, generator=gen) * 3
        expected = 0.35 * sum(float((f * (w - th) ** 2).sum()) for f, th in tasks)
        model = nn.Module()
        model.w = nn.Parameter(w)
        got = float(ewc.penalty(_ctx(model), BLOCKS, torch.empty(0)).detach())
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_consolidate_does_not_modify_its_inputs() -> None:
    ewc = _ewc()
    f1, th1 = {"a": _t(2.0)}, {"a": _t(1.0)}
    ewc.consolidate(f1, th1)
    ewc.consolidate({"a": _t(1.0)}, {"a": _t(-2.0)})
    assert float(f1["a"]) == 2.0 and float(th1["a"]) == 1.0


def test_online_mode_by_hand() -> None:
    ewc = _consolidated(_ewc(mode="online", ewc_lambda=2.0, ewc_gamma=0.5))
    # F* = gamma F1 + F2 = (0.5*2 + 1, 0.5*0 + 3) = (2, 3), anchored at theta2 = (-2, 1)
    assert float(ewc.precision["a"]) == pytest.approx(2.0)
    assert float(ewc.precision["b"]) == pytest.approx(3.0)
    assert float(ewc.anchor["a"]) == pytest.approx(-2.0)
    assert float(ewc.anchor["b"]) == pytest.approx(1.0)
    assert ewc.constant == 0.0
    # at theta = (0, 0): lambda/2 * (2*(0+2)^2 + 3*(0-1)^2) = 1 * (8 + 3) = 11
    assert _penalty_at(ewc, 0.0, 0.0) == pytest.approx(11.0, abs=1e-6)
    # zero at the latest anchor, unlike separate mode
    assert _penalty_at(ewc, -2.0, 1.0) == pytest.approx(0.0, abs=1e-6)


def test_online_mode_gamma_one_three_tasks() -> None:
    ewc = _ewc(mode="online", ewc_lambda=1.0, ewc_gamma=1.0)
    for f in (1.0, 2.0, 4.0):
        ewc.consolidate({"a": _t(f), "b": _t(0.0)}, {"a": _t(f), "b": _t(0.0)})
    # F* = 1 + 2 + 4 = 7 at the last theta (4)
    assert float(ewc.precision["a"]) == pytest.approx(7.0)
    assert float(ewc.anchor["a"]) == pytest.approx(4.0)


def test_after_task_uses_fisher_and_current_weights() -> None:
    model = TwoParam(LN3, 0.0)
    ewc = EWC(EWCConfig(ewc_lambda=1.0, fisher_samples=64))  # >= 2 blocks: all of them
    ewc.after_task(_ctx(model))
    assert float(ewc.precision["a"]) == pytest.approx(FISHER_A, rel=1e-5)
    assert float(ewc.precision["b"]) == pytest.approx(FISHER_B, rel=1e-5)
    assert float(ewc.anchor["a"]) == pytest.approx(LN3)
    # the anchor is a copy: moving the model does not move it
    with torch.no_grad():
        model.a.add_(1.0)
    assert float(ewc.anchor["a"]) == pytest.approx(LN3)
    # penalty = 1/2 * F_a * 1^2
    assert _penalty_at(ewc, LN3 + 1.0, 0.0) == pytest.approx(0.5 * FISHER_A, rel=1e-5)


def test_after_task_subsamples_fisher_samples_blocks() -> None:
    model = TwoParam(LN3, 0.0)
    ewc = EWC(EWCConfig(ewc_lambda=1.0, fisher_samples=1))
    ewc.after_task(_ctx(model))
    # one block: F_a is either g1_a^2 = 1/16 or g2_a^2 = 81/25
    f_a = float(ewc.precision["a"])
    assert min(abs(f_a - 0.0625), abs(f_a - 3.24)) < 1e-5


def test_after_task_skips_the_last_task() -> None:
    # No later task trains against the last Fisher: no estimate, no draw from the generator.
    ewc = EWC(EWCConfig(ewc_lambda=1.0, fisher_samples=1))
    ctx = _ctx(TwoParam(LN3, 0.0), k=2, n_tasks=2)
    before = ctx.generator.get_state()
    ewc.after_task(ctx)
    assert ewc.precision == {} and ewc.anchor == {}
    assert torch.equal(ctx.generator.get_state(), before)
    ewc.after_task(_ctx(TwoParam(LN3, 0.0), k=1, n_tasks=2))
    assert set(ewc.precision) == {"a", "b"}


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_state_dict_round_trip(mode: str, tmp_path: Path) -> None:
    ewc = _consolidated(_ewc(mode=mode, ewc_lambda=2.0, ewc_gamma=0.5))
    path = tmp_path / "state.safetensors"  # through safetensors, as the checkpoint does
    save_file({k: v.contiguous() for k, v in ewc.state_dict().items()}, path)
    restored = _ewc(mode=mode, ewc_lambda=2.0, ewc_gamma=0.5)
    restored.load_state_dict(load_file(path))
    assert restored.constant == pytest.approx(ewc.constant)
    assert set(restored.precision) == {"a", "b"} == set(restored.anchor)
    for k in ("a", "b"):
        assert torch.equal(restored.precision[k], ewc.precision[k])
        assert torch.equal(restored.anchor[k], ewc.anchor[k])
    for theta in [(0.0, 0.0), (1.5, -2.0)]:
        assert _penalty_at(restored, *theta) == pytest.approx(_penalty_at(ewc, *theta))


def test_penalty_moves_state_to_the_model_device() -> None:
    # A checkpoint's EWC state is loaded on the CPU; the model may live elsewhere (CUDA).
    # The meta device stands in for "another device" here.
    ewc = _consolidated(_ewc())
    model = TwoParam(0.0, 0.0).to("meta")
    value = ewc.penalty(_ctx(model, device="meta"), BLOCKS, torch.empty(0))
    assert value is not None and value.device.type == "meta"
    assert ewc.precision["a"].device.type == "meta"


# ---- Fisher variants --------------------------------------------------------------------


def test_batch_fisher_is_the_squared_gradient_of_the_batch_mean_loss() -> None:
    # One unit of both blocks: g = (g1 + g2) / 2 = ((1/4 + 9/5) / 2, (-1/4 - 9/10) / 2)
    # = (1.025, -0.575) -> F = (1.050625, 0.330625), not the per-sequence mean of squares.
    fisher = estimate_fisher(TwoParam(LN3, 0.0), BLOCKS, unit_rows=2)
    assert float(fisher["a"]) == pytest.approx(1.050625, rel=1e-5)
    assert float(fisher["b"]) == pytest.approx(0.330625, rel=1e-5)
    # a unit per block is the per-sequence Fisher, through either path
    one = estimate_fisher(TwoParam(LN3, 0.0), BLOCKS, unit_rows=1)
    assert float(one["a"]) == pytest.approx(FISHER_A, rel=1e-5)


def test_sampled_fisher_expectation_by_hand() -> None:
    # Labels drawn from the model: E[g] = 0 at each position, positions are independent, so
    # E[g²] = (1/T'²) Σ_t E[g_t²] with E[g_a,t²] = c² p0 (1 - p0) and E[g_b,t²] = p1 (1 - p1).
    # block 1: c = 1, p0 = 3/4 -> a: 2 · 3/16 / 4 = 0.09375,   b: the same 0.09375
    # block 2: c = 2, p0 = 9/10 -> a: 2 · 4 · 0.09 / 4 = 0.18, b: 2 · 0.09 / 4 = 0.045
    # F = mean over the two blocks: a 0.136875, b 0.069375 (the empirical one: 1.65, 0.44).
    # The expectation, exactly: every labelling of each block weighted by its probability.
    model = TwoParam(LN3, 0.0)
    expected = {"a": 0.0, "b": 0.0}
    for block in BLOCKS:
        p0 = 0.75 if int(block[0]) == 0 else 0.9  # both positions of a block share c
        for y in itertools.product((0, 1), repeat=2):
            prob = math.prod(p0 if t == 0 else 1 - p0 for t in y)
            f = estimate_fisher(model, block[None], torch.tensor([y]))
            for k in expected:
                expected[k] += prob * float(f[k]) / 2
    assert expected["a"] == pytest.approx(0.136875, rel=1e-5)
    assert expected["b"] == pytest.approx(0.069375, rel=1e-5)


def test_sampled_labels_follow_the_model_and_the_generator() -> None:
    model = TwoParam(LN3, 0.0)
    blocks = BLOCKS.repeat(1000, 1)
    drawn = sample_labels(model, blocks, torch.Generator().manual_seed(0)).float()
    # P(label 0) = 3/4 after token 0 (block 1), 9/10 after token 1 (block 2): 2000 draws
    # each, standard errors 0.010 and 0.007
    assert float((drawn[0::2] == 0).float().mean()) == pytest.approx(0.75, abs=0.04)
    assert float((drawn[1::2] == 0).float().mean()) == pytest.approx(0.9, abs=0.03)
    again = sample_labels(model, blocks, torch.Generator().manual_seed(0)).float()
    assert torch.equal(drawn, again)  # the run's generator: reproducible


def test_after_task_sampled_uses_the_runs_generator() -> None:
    ewc = EWC(EWCConfig(ewc_lambda=1.0, fisher_estimator="sampled"))
    ewc.after_task(_ctx(TwoParam(LN3, 0.0), seed=3))
    # the same draws by hand: the Fisher subset's permutation, then the labels
    gen = torch.Generator().manual_seed(3)
    idx = torch.randperm(2, generator=gen)
    model = TwoParam(LN3, 0.0)
    labels = sample_labels(model, BLOCKS[idx], gen)
    want = estimate_fisher(model, BLOCKS[idx], labels)
    assert float(ewc.precision["a"]) == pytest.approx(float(want["a"]), rel=1e-6)
    assert float(ewc.precision["b"]) == pytest.approx(float(want["b"]), rel=1e-6)


def test_fisher_unit_batch_uses_the_batch_size() -> None:
    model = TwoParam(LN3, 0.0)
    ewc = EWC(EWCConfig(ewc_lambda=1.0, fisher_unit="batch"))
    ewc.after_task(_ctx(model))  # batch_size 2: one unit of both blocks
    assert float(ewc.precision["a"]) == pytest.approx(1.050625, rel=1e-5)


# ---- decoupled EWC ----------------------------------------------------------------------


def _decoupled(ewc_lambda: float) -> tuple[EWC, TwoParam, torch.optim.Optimizer]:
    ewc = EWC(EWCConfig(ewc_lambda=ewc_lambda, ewc_apply="decoupled"))
    ewc.consolidate({"a": _t(2.0), "b": _t(0.5)}, {"a": _t(1.0), "b": _t(-1.0)})
    model = TwoParam(3.0, 1.0)
    return ewc, model, torch.optim.SGD(model.parameters(), lr=0.01)


def test_decoupled_step_by_hand() -> None:
    ewc, model, opt = _decoupled(ewc_lambda=10.0)
    # no loss term in decoupled mode
    assert ewc.penalty(_ctx(model), BLOCKS, torch.empty(0)) is None
    ewc.after_step(_ctx(model), opt)
    # a: factor lr·λ·F = 0.01 · 10 · 2 = 0.2 -> 3 - 0.2 · (3 - 1) = 2.6
    # b: factor 0.01 · 10 · 0.5 = 0.05 -> 1 - 0.05 · (1 + 1) = 0.9
    assert float(model.a.detach()) == pytest.approx(2.6, rel=1e-6)
    assert float(model.b.detach()) == pytest.approx(0.9, rel=1e-6)


def test_decoupled_step_uses_the_groups_current_lr_and_clamps_at_the_anchor() -> None:
    ewc, model, opt = _decoupled(ewc_lambda=10.0)
    opt.param_groups[0]["lr"] = 0.005  # what a scheduler would have set for this step
    ewc.after_step(_ctx(model), opt)
    assert float(model.a.detach()) == pytest.approx(3.0 - 0.1 * 2.0, rel=1e-6)  # factor 0.1
    # lr·λ·F = 0.01 · 1000 · 2 = 20 and 5 would overshoot (and diverge past 2): clamped to
    # 1, the parameters land on their anchor and stay there
    ewc, model, opt = _decoupled(ewc_lambda=1000.0)
    for _ in range(3):
        ewc.after_step(_ctx(model), opt)
        assert float(model.a.detach()) == pytest.approx(1.0)
        assert float(model.b.detach()) == pytest.approx(-1.0)


def test_loss_mode_step_is_a_no_op_and_metrics_report_the_scale() -> None:
    ewc = _consolidated(_ewc(ewc_lambda=2.0))  # ewc_apply "loss"
    model = TwoParam(0.0, 0.0)
    ewc.after_step(_ctx(model), torch.optim.SGD(model.parameters(), lr=0.1))
    assert float(model.a.detach()) == 0.0 and float(model.b.detach()) == 0.0
    ewc.after_task(_ctx(model, k=2, n_tasks=2))
    m = ewc.metrics()
    # the penalty at (0, 0) is 9 (test_separate_mode_two_tasks_by_hand); the task loss is
    # the mean NLL of both blocks at a = b = 0: ln 2; A = (3, 3)
    assert m["ewc/penalty"] == pytest.approx(9.0, abs=1e-5)
    assert m["ewc/penalty_share"] == pytest.approx(9.0 / math.log(2.0), rel=1e-5)
    assert m["ewc/fisher_mean"] == pytest.approx(3.0)


@pytest.mark.parametrize(
    ("key", "value"),
    [("ewc_apply", "decay"), ("fisher_estimator", "true"), ("fisher_unit", "token")],
)
def test_new_fields_reject_bad_values_in_one_line(key: str, value: str) -> None:
    from adaptune.trainables.config import parse_run_config
    from adaptune.trainables.errors import ConfigError

    run = tiny_experiment()["run"]
    run.setdefault("components", {}).setdefault("ewc", {})[key] = value
    with pytest.raises(ConfigError) as err:
        parse_run_config(run)
    assert str(err.value).count("\n") == 0
    assert f"run.components.ewc.{key}" in str(err.value) and repr(value) in str(err.value)


def test_the_training_loop_calls_the_decoupled_step() -> None:
    # λ so large that every factor clamps to 1: after each optimizer step the loop's call to
    # after_step must put every weight back on its anchor (up to rounding), whatever AdamW did.
    from contextlib import nullcontext

    from adaptune.trainables.config import parse_run_config
    from adaptune.trainables.model import build_model
    from adaptune.trainables.run import _optimizer, train_blocks
    from transformers import ByT5Tokenizer

    torch.manual_seed(0)
    cfg = parse_run_config(tiny_experiment(run={"model": {"n_positions": 16}})["run"])
    model = build_model(cfg.model, ByT5Tokenizer()).train()
    params, opt = _optimizer(cfg, model)
    ewc = EWC(EWCConfig(ewc_lambda=1e12, ewc_apply="decoupled"))
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    ewc.consolidate({n: torch.ones_like(a) for n, a in anchor.items()}, dict(anchor))
    blocks = torch.randint(3, 250, (2 * cfg.optim.batch_size, 16))
    ctx = replace(_ctx(model), train_blocks=blocks, batch_size=cfg.optim.batch_size)
    train_blocks(cfg, model, params, opt, {"ewc": ewc}, ctx, nullcontext(), "test")
    assert opt.state  # AdamW did step
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), anchor[n], rtol=0, atol=1e-7)  # p - (p - a)
