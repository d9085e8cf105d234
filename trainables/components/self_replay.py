"""Self-generated rehearsal: the model writes text before each task, filters keep the good and
diverse samples, and they are rehearsed beside the task's real blocks, so the model keeps what
it knew without any stored old data.

Before task k (once the model knows something) the model as it is then, the pre-update model,
samples ``gen_samples`` continuations of a prompt (the BOS token, or the first
``gen_prefix_tokens`` of random current-task blocks; the prompt itself is never kept). Each
sample is cut at the first end-of-text token and scored by its perplexity under the same model;
the filters (:func:`filter_samples`) drop the short, the out-of-band and the near-duplicate
ones. The survivors are packed like real text (each followed by the end-of-text token,
concatenated, cut into blocks of the run's block size) and offered to a reservoir of
``self_pool_size`` blocks that accumulates over the whole stream. Every batch then carries
``round(self_fraction × B)`` pool blocks after its real rows; at least one row stays real.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from adaptune.trainables.components.base import Component, TaskContext
from adaptune.trainables.components.replay import ReservoirBuffer
from adaptune.trainables.config import SelfReplayConfig
from adaptune.trainables.errors import ConfigError
from torch import Tensor, nn

_GEN_ROWS = 256  # samples generated at once, at least


def ngrams(ids: list[int], n: int) -> set[tuple[int, ...]]:
    """The set of ``n``-grams of ``ids`` (empty when it is shorter than ``n``)."""
    return {tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)}


def jaccard(a: set[Any], b: set[Any]) -> float:
    """``|a ∩ b| / |a ∪ b|``; 0 for two empty sets."""
    union = len(a | b)
    return len(a & b) / union if union else 0.0


def filter_samples(
    samples: list[list[int]],
    ppls: list[float],
    *,
    min_tokens: int,
    overlap_n: int,
    max_overlap: float,
    ppl_min: float,
    ppl_max: float | None,
) -> list[int]:
    """Indices of the samples the filters keep, in order.

    A sample (token ids, end-of-text token excluded) is dropped when it has fewer than
    ``min_tokens`` tokens, when its perplexity lies outside ``[ppl_min, ppl_max]`` (degenerate
    loops score near 1, noise near the vocabulary size), when it equals a sample already kept,
    or when its ``overlap_n``-gram Jaccard similarity with a sample already kept exceeds
    ``max_overlap``. Earlier samples win: the test is against the kept ones only.
    """
    kept: list[int] = []
    kept_grams: list[set[tuple[int, ...]]] = []
    exact: set[tuple[int, ...]] = set()
    for i, (ids, ppl) in enumerate(zip(samples, ppls, strict=True)):
        if len(ids) < min_tokens or not math.isfinite(ppl) or ppl < ppl_min:
            continue
        if ppl_max is not None and ppl > ppl_max:
            continue
        if tuple(ids) in exact:
            continue
        grams = ngrams(ids, overlap_n)
        if any(jaccard(grams, g) > max_overlap for g in kept_grams):
            continue
        kept.append(i)
        kept_grams.append(grams)
        exact.add(tuple(ids))
    return kept


def distinct_n(samples: list[list[int]], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique n-grams over all n-grams of ``samples``; 0 if none."""
    grams = [tuple(s[i : i + n]) for s in samples for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def pack_samples(samples: list[list[int]], block_size: int, eos: int | None) -> Tensor:
    """The samples as training blocks, (N, block_size) int64, packed like real text: each one
    followed by ``eos`` (when the tokenizer has one), concatenated, cut into blocks. The last,
    partial block is filled from the start again, so no kept token is lost and any kept sample
    gives at least one block. No samples: (0, block_size)."""
    flat = [t for s in samples for t in (*s, *([] if eos is None else [eos]))]
    if not flat:
        return torch.zeros((0, block_size), dtype=torch.long)
    n = math.ceil(len(flat) / block_size)
    cycled = (flat * math.ceil(n * block_size / len(flat)))[: n * block_size]
    return torch.tensor(cycled, dtype=torch.long).view(n, block_size)


@torch.no_grad()
def generate_samples(
    model: nn.Module,
    prompts: Tensor,
    cfg: SelfReplayConfig,
    *,
    eos: int | None,
    pad: int,
    chunk: int,
) -> tuple[list[list[int]], list[float]]:
    """Sample one continuation of each prompt row (``prompts``: (n, P) on the model's device)
    and score it under the same model.

    Returns:
        The continuations (token ids up to, not including, the first ``eos``) and their
        perplexities: exp of the mean next-token loss over the continuation's tokens, the
        ``eos`` that ended it included.
    """
    from transformers import GenerationConfig

    gen = GenerationConfig(
        do_sample=True,
        temperature=cfg.gen_temperature,
        top_p=cfg.gen_top_p,
        top_k=0,  # nucleus sampling alone decides
        max_new_tokens=cfg.gen_max_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    samples: list[list[int]] = []
    ppls: list[float] = []
    p = prompts.shape[1]
    # generating keeps one position's logits (per-step overhead favours many rows at once);
    # scoring keeps all of them, so it goes ``chunk`` rows at a time
    outs = [
        model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gen)
        for x in prompts.split(max(chunk, _GEN_ROWS))
    ]
    for out in itertools.chain.from_iterable(o.split(chunk) for o in outs):
        new = out[:, p:]  # (c, G): finished rows are padded after their eos
        g = new.shape[1]
        if eos is None:
            lengths = torch.full((new.shape[0],), g)
        else:
            is_eos = (new == eos).int()
            first = torch.where(is_eos.any(1), is_eos.argmax(1), torch.full_like(is_eos[:, 0], g))
            lengths = torch.clamp(first + 1, max=g)  # the ending eos is scored
        logits = model(input_ids=out).logits[:, p - 1 : p - 1 + g].float()  # (c, G, V)
        nll = F.cross_entropy(logits.transpose(1, 2), new, reduction="none")  # (c, G)
        mask = torch.arange(g, device=new.device)[None, :] < lengths.to(new.device)[:, None]
        mean = (nll * mask).sum(1) / mask.sum(1).clamp(min=1)
        for row, n_scored, loss in zip(new.tolist(), lengths.tolist(), mean.tolist(), strict=True):
            ended = eos is not None and n_scored <= len(row) and row[n_scored - 1] == eos
            samples.append(row[: n_scored - 1] if ended else row[:n_scored])
            ppls.append(math.exp(loss))
    return samples, ppls


class SelfReplay(Component):
    """Rehearses the model's own filtered samples (see the module docstring)."""

    def __init__(self, cfg: SelfReplayConfig) -> None:
        self.cfg = cfg
        self.self_fraction = cfg.self_fraction
        self.pool = ReservoirBuffer(cfg.self_pool_size)
        self.generated_total = 0  # samples written over the run
        self.kept_total = 0  # samples the filters kept over the run
        self._last: dict[str, float] = {}  # this task's numbers (metrics)
        self._text = ""  # this task's kept samples, decoded (artifacts)

    def before_task(self, ctx: TaskContext) -> None:
        self._last = {"self_generated": 0, "self_kept": 0}
        self._text = ""
        if not ctx.knows_something:  # a fresh model would rehearse noise
            self._last["self_pool_blocks"] = len(self.pool)
            return
        bos, eos, pad = _special_ids(ctx)
        # One draw from the run's generator seeds everything here; the global RNG (which the
        # sampling uses) is restored afterwards, so the run's draws stay those of a resumed run.
        seed = int(torch.randint(0, 2**62, (1,), generator=ctx.generator))
        local = torch.Generator().manual_seed(seed)
        prompts = self._prompts(ctx, bos, eos, local).to(ctx.device)
        model = ctx.model
        was_training = model.training
        model.eval()
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                samples, ppls = generate_samples(
                    model, prompts, self.cfg, eos=eos, pad=pad, chunk=ctx.batch_size
                )
        finally:
            model.train(was_training)
        c = self.cfg
        keep = filter_samples(
            samples, ppls, min_tokens=c.gen_min_tokens, overlap_n=c.gen_overlap_n,
            max_overlap=c.gen_max_overlap, ppl_min=c.gen_ppl_min, ppl_max=c.gen_ppl_max,
        )
        kept = [samples[i] for i in keep]
        if kept:
            self.pool.add(pack_samples(kept, ctx.train_blocks.shape[1], eos), local)
        self.generated_total += len(samples)
        self.kept_total += len(kept)
        self._last |= {"self_generated": len(samples), "self_kept": len(kept)}
        if kept:
            self._last |= {
                "self_distinct_1": distinct_n(kept, 1),
                "self_distinct_2": distinct_n(kept, 2),
                "self_kept_ppl": sum(ppls[i] for i in keep) / len(keep),
            }
        self._last["self_pool_blocks"] = len(self.pool)
        self._text = _samples_text(ctx, samples, ppls, keep)

    def _prompts(
        self, ctx: TaskContext, bos: int | None, eos: int | None, gen: torch.Generator
    ) -> Tensor:
        """(gen_samples, P) prompts: one BOS or EOS token, or the start of random
        current-task blocks."""
        n, prompt = self.cfg.gen_samples, self.cfg.gen_prompt
        if prompt == "prefix":
            idx = torch.randint(0, ctx.train_blocks.shape[0], (n,), generator=gen)
            return ctx.train_blocks[idx, : self.cfg.gen_prefix_tokens].long()
        token = bos if prompt == "bos" else eos
        if token is None:
            raise ConfigError(
                f"run.components.self_replay.gen_prompt: {prompt!r} needs a tokenizer with "
                f"{'a beginning- or' if prompt == 'bos' else 'an'} end-of-text token, and this "
                "one has none; use 'prefix'"
            )
        return torch.full((n, 1), token, dtype=torch.long)

    def rows(self, ctx: TaskContext) -> int:
        """Pool blocks in each batch (0 while the pool is empty); at least one row stays real."""
        if len(self.pool) == 0:
            return 0
        return min(ctx.batch_size - 1, round(self.self_fraction * ctx.batch_size))

    def compose(self, batch: Tensor, ctx: TaskContext) -> Tensor:
        n = self.rows(ctx)
        if n == 0:
            return batch
        own = self.pool.sample(n, ctx.generator).to(batch.device)
        return torch.cat([batch, own], dim=0)  # the rows so far, then n self-generated

    def metrics(self) -> dict[str, float]:
        return dict(self._last)

    def artifacts(self) -> dict[str, str]:
        return {"samples.txt": self._text} if self._text else {}

    def state_dict(self) -> dict[str, Tensor]:
        totals = torch.tensor([self.generated_total, self.kept_total])
        return {**{f"pool.{k}": v for k, v in self.pool.state_dict().items()}, "totals": totals}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.pool.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("pool.")})
        self.generated_total, self.kept_total = (int(v) for v in state["totals"])


def _special_ids(ctx: TaskContext) -> tuple[int | None, int | None, int]:
    """(bos, eos, pad) for generation: the tokenizer's (its BOS, else its EOS, starts a
    document: real text is packed with an EOS after each document), else the model config's."""
    source = ctx.tokenizer if ctx.tokenizer is not None else ctx.model.config
    eos = getattr(source, "eos_token_id", None)
    bos = getattr(source, "bos_token_id", None)
    bos = eos if bos is None else bos
    pad = getattr(source, "pad_token_id", None)
    pad = pad if pad is not None else (eos if eos is not None else 0)
    return bos, eos, pad


def _samples_text(ctx: TaskContext, samples: list[list[int]], ppls: list[float],
                  keep: list[int]) -> str:
    """The kept samples, decoded, each under a header with its perplexity ("" without a
    tokenizer to decode them)."""
    if ctx.tokenizer is None:
        return ""
    head = f"# before task {ctx.k}: kept {len(keep)} of {len(samples)} samples\n"
    parts = [
        f"\n## sample {i + 1} (ppl {ppls[i]:.2f})\n{ctx.tokenizer.decode(samples[i])}\n"
        for i in keep
    ]
    return head + "".join(parts)
