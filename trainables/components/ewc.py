"""Elastic weight consolidation (Kirkpatrick et al. 2017) with a diagonal Fisher.

Fisher estimator: the per-sequence empirical Fisher in float32. For each of ``n`` training
blocks ``x_i`` (the true next tokens as labels), ``g_i = ∇θ ℓ(x_i)`` where ``ℓ`` is the block's
*mean* next-token NLL, and ``F = (1/n) Σ_i g_i²``. Because ``ℓ`` is a per-token mean, ``F`` is
about ``1/tokens_per_block`` of the Fisher of the summed sequence log-likelihood, and a Fisher
taken from batch-mean gradients would be about ``1/batch`` of this one; ``ewc_lambda`` ranges
depend on that choice.

Penalty: ``λ/2 · Σ_t Σ F_t (θ − θ*_t)²``. Both modes keep a single quadratic per parameter:
``separate`` sums every task's term exactly (``A(θ−μ)² + K`` with ``A = Σ F_t``), ``online``
(Schwarz et al. 2018) keeps ``F* = γ F*_old + F_new`` anchored at the latest weights.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from adaptune.trainables.components.base import Component, TaskContext
from adaptune.trainables.config import EWCConfig
from adaptune.trainables.model import next_token_loss
from torch import Tensor, nn

log = logging.getLogger(__name__)


def estimate_fisher(model: nn.Module, blocks: Tensor) -> dict[str, Tensor]:
    """Per-sequence empirical Fisher diagonal over ``blocks`` (n, T), float32, one entry per
    trainable parameter. Leaves the model's gradients cleared.

    Per-sequence gradients come from ``torch.func`` (``vmap`` over ``grad``) in chunks that fit
    ~1 GiB; a model that ``torch.func`` cannot trace falls back to one backward per sequence,
    which gives the same numbers more slowly.
    """
    was_training = model.training
    model.eval()  # no dropout noise in the estimate
    try:
        try:
            return _fisher_vmap(model, blocks)
        except (RuntimeError, NotImplementedError, TypeError) as err:
            log.debug("torch.func Fisher unavailable (%s); one backward per sequence", err)
            return _fisher_loop(model, blocks)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def _fisher_loop(model: nn.Module, blocks: Tensor) -> dict[str, Tensor]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    for i in range(blocks.shape[0]):
        x = blocks[i : i + 1]
        model.zero_grad(set_to_none=True)
        next_token_loss(model(input_ids=x).logits, x).backward()
        for n, p in params.items():
            if p.grad is not None:
                fisher[n] += p.grad.detach().float() ** 2
    return {n: f / blocks.shape[0] for n, f in fisher.items()}


def _fisher_vmap(model: nn.Module, blocks: Tensor) -> dict[str, Tensor]:
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

    def loss(p: dict[str, Tensor], x: Tensor) -> Tensor:
        x = x.unsqueeze(0)  # (1, T): one sequence
        return next_token_loss(functional_call(model, {**p, **frozen}, (x,)).logits, x)

    per_seq = vmap(grad(loss), in_dims=(None, 0))
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    # SDPA has no vmap batching rule on CPU; torch's fallback loops over the chunk and warns.
    # Measured on the tiny GPT at one thread, that is still faster than switching the model to
    # eager attention (whose first call costs ~1 s), so the warning is expected and silenced.
    with _no_padding_check(model), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batching rule.*", category=UserWarning)
        for i in range(0, blocks.shape[0], chunk):
            grads = per_seq(params, blocks[i : i + chunk])  # name -> (chunk, *shape)
            for n, g in grads.items():  # g is ours: square in place, no second copy
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
    """Fisher and anchor after each task, quadratic penalty while training the next."""

    def __init__(self, cfg: EWCConfig) -> None:
        self.ewc_lambda = cfg.ewc_lambda
        self.ewc_mode = cfg.ewc_mode
        self.ewc_gamma = cfg.ewc_gamma
        self.fisher_samples = cfg.fisher_samples
        self.precision: dict[str, Tensor] = {}  # A = Σ F_t (separate) or F* (online)
        self.anchor: dict[str, Tensor] = {}  # μ = Σ F_t θ_t / Σ F_t, or the latest θ (online)
        self.constant = 0.0  # Σ of the cross terms, so the penalty value is exact (separate)

    def penalty(self, ctx: TaskContext, batch: Tensor, logits: Tensor) -> Tensor | None:
        if not self.precision:
            return None
        self._to(ctx.device)
        params = dict(ctx.model.named_parameters())
        return ewc_penalty(params, self.precision, self.anchor, self.ewc_lambda) + (
            0.5 * self.ewc_lambda * self.constant
        )

    def after_task(self, ctx: TaskContext) -> None:
        if ctx.k == ctx.n_tasks:
            return  # no later task is trained against this Fisher
        blocks = ctx.train_blocks
        n = min(self.fisher_samples, blocks.shape[0])
        idx = torch.randperm(blocks.shape[0], generator=ctx.generator)[:n]
        self._to(ctx.device)
        fisher = estimate_fisher(ctx.model, blocks[idx].to(ctx.device))
        theta = {
            k: p.detach().float().clone() for k, p in ctx.model.named_parameters() if k in fisher
        }
        self.consolidate(fisher, theta)

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
