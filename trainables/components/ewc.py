"""Elastic weight consolidation (Kirkpatrick et al. 2017) with a diagonal Fisher.

Fisher estimator, in float32, over ``n = fisher_samples`` training blocks. ``g`` is the gradient
of a *mean* next-token NLL; ``F = mean g²`` over the units:

- ``fisher_unit``: ``sequence`` takes one ``g`` per block; ``batch`` one per ``batch_size``
  blocks (the gradient of the batch-mean loss), which is about ``1/batch`` of the per-sequence
  Fisher where the gradient noise dominates its mean.
- ``fisher_estimator``: ``empirical`` uses the blocks' true next tokens as labels; ``sampled``
  draws each label from the model's own predictive distribution (with the run's generator), the
  Fisher proper, whose expected gradient is zero, so it measures curvature, not the fit.

Because ``ℓ`` is a per-token mean, ``F`` is about ``1/tokens_per_block`` of the Fisher of the
summed sequence log-likelihood; ``ewc_lambda`` ranges depend on all three choices.

Penalty ``λ/2 · Σ_t Σ F_t (θ − θ*_t)²``. Both modes keep a single quadratic per parameter:
``separate`` sums every task's term exactly (``A(θ−μ)² + K`` with ``A = Σ F_t``), ``online``
(Schwarz et al. 2018) keeps ``F* = γ F*_old + F_new`` anchored at the latest weights.
``ewc_apply``: ``loss`` adds the penalty to the loss (its gradient ``λA(θ−μ)`` then goes through
AdamW's per-parameter rescaling); ``decoupled`` leaves the loss alone and, after each optimizer
step, moves every parameter toward its anchor by ``lr·λ·A`` of the distance (as AdamW decouples
weight decay), so the pull is proportional to the Fisher whatever Adam does to the gradients.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from adaptune.trainables.components.base import Component, TaskContext
from adaptune.trainables.config import EWCConfig
from adaptune.trainables.model import next_token_loss
from torch import Tensor, nn

log = logging.getLogger(__name__)


def label_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean NLL of ``labels`` (B, T-1), the tokens predicted at positions 0..T-2 of ``logits``
    (B, T, V); with ``labels = blocks[:, 1:]`` it equals ``next_token_loss(logits, blocks)``."""
    targets = F.pad(labels, (0, 1), value=-100)  # (B, T): the last position predicts nothing
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


@torch.no_grad()
def sample_labels(model: nn.Module, blocks: Tensor, generator: torch.Generator) -> Tensor:
    """Next tokens (n, T-1) drawn from the model's predictive distribution at every position of
    ``blocks`` (n, T), with ``generator`` (a CPU generator: the draw is made on the CPU so a run
    gives the same labels on every device)."""
    out = []
    for i in range(0, blocks.shape[0], 16):  # 16 rows of (T, V) probabilities at a time
        logits = model(input_ids=blocks[i : i + 16]).logits[:, :-1].float()  # (b, T-1, V)
        probs = logits.softmax(-1).flatten(0, 1).cpu()
        drawn = torch.multinomial(probs, 1, generator=generator)  # (b·(T-1), 1)
        out.append(drawn.view(logits.shape[:2]))
    return torch.cat(out).to(blocks.device)


def estimate_fisher(
    model: nn.Module, blocks: Tensor, labels: Tensor | None = None, *, unit_rows: int = 1
) -> dict[str, Tensor]:
    """Fisher diagonal over ``blocks`` (n, T), float32, one entry per trainable parameter: the
    mean over units of ``unit_rows`` blocks of the squared gradient of the unit's mean NLL of
    ``labels`` (n, T-1; None: the blocks' own next tokens). Leaves the gradients cleared.

    Per-sequence gradients (``unit_rows`` 1) come from ``torch.func`` (``vmap`` over ``grad``)
    in chunks that fit ~1 GiB; a model that ``torch.func`` cannot trace falls back to one
    backward per unit, which gives the same numbers more slowly. Larger units always take
    one backward each (already batched).
    """
    labels = blocks[:, 1:] if labels is None else labels
    was_training = model.training
    model.eval()  # no dropout noise in the estimate
    try:
        if unit_rows > 1:
            return _fisher_loop(model, blocks, labels, unit_rows)
        try:
            return _fisher_vmap(model, blocks, labels)
        except (RuntimeError, NotImplementedError, TypeError) as err:
            log.debug("torch.func Fisher unavailable (%s); one backward per sequence", err)
            return _fisher_loop(model, blocks, labels)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def _fisher_loop(
    model: nn.Module, blocks: Tensor, labels: Tensor, unit_rows: int = 1
) -> dict[str, Tensor]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    starts = range(0, blocks.shape[0], unit_rows)  # a last, shorter unit keeps its blocks
    for i in starts:
        x = blocks[i : i + unit_rows]
        model.zero_grad(set_to_none=True)
        label_nll(model(input_ids=x).logits, labels[i : i + unit_rows]).backward()
        for n, p in params.items():
            if p.grad is not None:
                fisher[n] += p.grad.detach().float() ** 2
    return {n: f / len(starts) for n, f in fisher.items()}


def _fisher_vmap(model: nn.Module, blocks: Tensor, labels: Tensor) -> dict[str, Tensor]:
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    n_params = sum(p.numel() for p in params.values())
    # At most ~1 GiB of per-sequence gradients at once. On CPU also at most 16 sequences:
    # measured on the tiny GPT, larger chunks are no faster once warm and their first call in a
    # process is ~0.3 s slower (fresh pages for the large buffers); CUDA's caching allocator
    # has no such cost, so larger chunks there.
    cap = 16 if blocks.device.type == "cpu" else 64
    chunk = max(1, min(blocks.shape[0], cap, (1 << 30) // max(1, 4 * n_params)))

    def loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        x, y = x.unsqueeze(0), y.unsqueeze(0)  # (1, T), (1, T-1): one sequence
        return label_nll(functional_call(model, {**p, **frozen}, (x,)).logits, y)

    per_seq = vmap(grad(loss), in_dims=(None, 0, 0))
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    # SDPA has no vmap batching rule on CPU; torch's fallback loops over the chunk and warns.
    # Measured on the tiny GPT at one thread, that is still faster than switching the model to
    # eager attention (whose first call costs ~1 s), so the warning is expected and silenced.
    with _no_padding_check(model), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batching rule.*", category=UserWarning)
        for i in range(0, blocks.shape[0], chunk):
            grads = per_seq(params, blocks[i : i + chunk], labels[i : i + chunk])
            for n, g in grads.items():  # (chunk, *shape); ours: square in place, no copy
                fisher[n] += g.float().square_().sum(0)
    return {n: f / blocks.shape[0] for n, f in fisher.items()}


@contextmanager
def _no_padding_check(model: nn.Module) -> Iterator[None]:
    """transformers checks ``pad_token_id in input_ids`` on every forward without an attention
    mask; that ``.item()`` cannot run under ``vmap``, which then falls back to the slow loop.
    Blocks are unpadded token streams, so the check is switched off while the Fisher runs."""
    config = getattr(model, "config", None)
    if getattr(config, "pad_token_id", None) is None:
        yield
        return
    before = config.pad_token_id
    config.pad_token_id = None
    try:
        yield
    finally:
        config.pad_token_id = before


def ewc_penalty(
    params: dict[str, Tensor],
    precision: dict[str, Tensor],
    anchor: dict[str, Tensor],
    ewc_lambda: float,
) -> Tensor:
    """``λ/2 · Σ precision · (θ − anchor)²`` over the named parameters."""
    total = torch.zeros((), dtype=torch.float32, device=next(iter(params.values())).device)
    for n, a in precision.items():
        total = total + (a * (params[n].float() - anchor[n]) ** 2).sum()
    return 0.5 * ewc_lambda * total


class EWC(Component):
    """Fisher and anchor after each task; while training the next, a quadratic penalty in the
    loss or a decoupled pull toward the anchor after each optimizer step."""

    def __init__(self, cfg: EWCConfig) -> None:
        self.ewc_lambda = cfg.ewc_lambda
        self.ewc_mode = cfg.ewc_mode
        self.ewc_gamma = cfg.ewc_gamma
        self.fisher_samples = cfg.fisher_samples
        self.ewc_apply = cfg.ewc_apply
        self.fisher_estimator = cfg.fisher_estimator
        self.fisher_unit = cfg.fisher_unit
        self.precision: dict[str, Tensor] = {}  # A = Σ F_t (separate) or F* (online)
        self.anchor: dict[str, Tensor] = {}  # μ = Σ F_t θ_t / Σ F_t, or the latest θ (online)
        self.constant = 0.0  # Σ of the cross terms, so the penalty value is exact (separate)
        self._metrics: dict[str, float] = {}

    def penalty(self, ctx: TaskContext, batch: Tensor, logits: Tensor) -> Tensor | None:
        if not self.precision or self.ewc_apply != "loss":
            return None
        return self._value(ctx)

    def _value(self, ctx: TaskContext) -> Tensor:
        """``λ/2 · (Σ A (θ − μ)² + K)`` at the model's current weights."""
        self._to(ctx.device)
        params = dict(ctx.model.named_parameters())
        return ewc_penalty(params, self.precision, self.anchor, self.ewc_lambda) + (
            0.5 * self.ewc_lambda * self.constant
        )

    @torch.no_grad()
    def after_step(self, ctx: TaskContext, optimizer: torch.optim.Optimizer) -> None:
        """Decoupled mode: ``θ ← θ − min(1, lr·λ·A) ⊙ (θ − μ)``, ``lr`` the step's own (the
        scheduler has not moved yet). The factor is clamped at 1: past it the update would
        overshoot the anchor (beyond 2 it would grow the distance every step and diverge), and
        at 1 the parameter is simply put back on its anchor, the frozen limit."""
        if not self.precision or self.ewc_apply != "decoupled":
            return
        self._to(ctx.device)
        lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        for n, p in ctx.model.named_parameters():
            a = self.precision.get(n)
            if a is None or id(p) not in lrs:
                continue
            factor = (a * (lrs[id(p)] * self.ewc_lambda)).clamp_(max=1.0)
            p.sub_((factor * (p.float() - self.anchor[n])).to(p.dtype))

    def after_task(self, ctx: TaskContext) -> None:
        self._metrics = self._measure(ctx)
        if ctx.k == ctx.n_tasks:
            return  # no later task is trained against this Fisher
        blocks = ctx.train_blocks
        n = min(self.fisher_samples, blocks.shape[0])
        idx = torch.randperm(blocks.shape[0], generator=ctx.generator)[:n]
        self._to(ctx.device)
        x = blocks[idx].to(ctx.device)
        labels = None
        if self.fisher_estimator == "sampled":
            was_training = ctx.model.training
            ctx.model.eval()
            labels = sample_labels(ctx.model, x, ctx.generator)
            ctx.model.train(was_training)
        rows = ctx.batch_size if self.fisher_unit == "batch" else 1
        fisher = estimate_fisher(ctx.model, x, labels, unit_rows=rows)
        theta = {
            k: p.detach().float().clone() for k, p in ctx.model.named_parameters() if k in fisher
        }
        self.consolidate(fisher, theta)
        self._metrics["ewc/fisher_mean"] = _mean(self.precision)

    @torch.no_grad()
    def _measure(self, ctx: TaskContext) -> dict[str, float]:
        """The penalty at the end of the task under the quadratic it trained against, and its
        share of the task's training NLL (on its first ``fisher_samples`` blocks: no draw from
        the generator), so λ's strength can be read against the loss it competes with."""
        if not self.precision:
            return {"ewc/penalty": 0.0, "ewc/penalty_share": 0.0, "ewc/fisher_mean": 0.0}
        was_training = ctx.model.training
        ctx.model.eval()
        x = ctx.train_blocks[: self.fisher_samples].to(ctx.device)
        nll = sum(
            float(next_token_loss(ctx.model(input_ids=x[i : i + 16]).logits, x[i : i + 16]))
            * x[i : i + 16].shape[0]
            for i in range(0, x.shape[0], 16)
        ) / x.shape[0]
        ctx.model.train(was_training)
        value = float(self._value(ctx))
        return {
            "ewc/penalty": value,
            "ewc/penalty_share": value / nll,
            "ewc/fisher_mean": _mean(self.precision),
        }

    def metrics(self) -> dict[str, float]:
        return dict(self._metrics)

    def consolidate(self, fisher: dict[str, Tensor], theta: dict[str, Tensor]) -> None:
        """Fold a new task's ``(F, θ*)`` into the running quadratic."""
        if not self.precision:
            # copies: the separate-mode update below assigns into these dicts
            self.precision, self.anchor = dict(fisher), dict(theta)
            return
        if self.ewc_mode == "online":
            self.precision = {k: self.ewc_gamma * a + fisher[k] for k, a in self.precision.items()}
            self.anchor = dict(theta)
            return
        # A(θ−μ)² + F(θ−θ*)² = A'(θ−μ')² + (A·F/A')(μ−θ*)² with A' = A + F.
        for k, a in self.precision.items():
            f, mu, th = fisher[k], self.anchor[k], theta[k]
            a_new = a + f
            safe = torch.where(a_new > 0, a_new, torch.ones_like(a_new))
            self.constant += float((a * f / safe * (mu - th) ** 2).sum(dtype=torch.float64))
            self.anchor[k] = torch.where(a_new > 0, (a * mu + f * th) / safe, th)
            self.precision[k] = a_new

    def _to(self, device: torch.device) -> None:
        """Move precision and anchor to the model's device (state loaded from a checkpoint is
        on the CPU; the model may be on CUDA)."""
        if self.precision and next(iter(self.precision.values())).device != device:
            self.precision = {k: v.to(device) for k, v in self.precision.items()}
            self.anchor = {k: v.to(device) for k, v in self.anchor.items()}

    def state_dict(self) -> dict[str, Tensor]:
        state = {f"precision.{k}": v for k, v in self.precision.items()}
        state |= {f"anchor.{k}": v for k, v in self.anchor.items()}
        state["constant"] = torch.tensor(self.constant, dtype=torch.float64)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.precision = {k[10:]: v for k, v in state.items() if k.startswith("precision.")}
        self.anchor = {k[7:]: v for k, v in state.items() if k.startswith("anchor.")}
        self.constant = float(state["constant"])


def _mean(tensors: dict[str, Tensor]) -> float:
    """Mean over every entry of every tensor."""
    total = sum(float(t.sum(dtype=torch.float64)) for t in tensors.values())
    return total / max(1, sum(t.numel() for t in tensors.values()))
