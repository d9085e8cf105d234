"""What a run measures after each task: the loss of the model on every task's held-out blocks
(and on the pretrain and retain domains), and the metrics reported from that loss matrix."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from adaptune.trainables.checkpoint import Progress
from adaptune.trainables.metrics import retain_metrics, stream_metrics, task_forgetting
from adaptune.trainables.model import next_token_loss
from torch import Tensor, nn

if TYPE_CHECKING:  # run imports this module
    from adaptune.trainables.run import Prepared


@torch.no_grad()
def evaluate(model: nn.Module, blocks: Tensor, batch_size: int, device: torch.device) -> float:
    """Mean next-token loss (nats/token) over ``blocks`` (M, T)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, blocks.shape[0], batch_size):
        x = blocks[i : i + batch_size].to(device)
        n = x.shape[0] * (x.shape[1] - 1)
        total += float(next_token_loss(model(input_ids=x).logits, x)) * n
        count += n
    model.train(was_training)
    return total / count


def _evaluate_row(
    prep: Prepared, model: nn.Module, device: torch.device, progress: Progress
) -> None:
    """Append the loss on every task (and on the pretrain and retain domains) to ``progress``."""
    batch_size = prep.cfg.eval_batch_size
    progress.loss_matrix.append([evaluate(model, t.eval, batch_size, device) for t in prep.tasks])
    if prep.base is not None:
        progress.base_losses.append(evaluate(model, prep.base.eval, batch_size, device))
    if prep.retain:
        progress.retain_losses.append(
            [evaluate(model, r.eval, batch_size, device) for r in prep.retain]
        )


def _task_metrics(prep: Prepared, progress: Progress, k: int) -> dict[str, Any]:
    """Everything reported after task ``k``: objective, CL metrics, per-task losses, and
    the pretrain and retain domains' losses."""
    L = progress.loss_matrix
    metrics: dict[str, Any] = {"task_index": k, **stream_metrics(L, k)}
    for j, task in enumerate(prep.tasks, start=1):
        metrics[f"loss/{task.name}"] = L[k][j - 1]
        metrics[f"ppl/{task.name}"] = math.exp(L[k][j - 1])
        metrics[f"forgetting/{task.name}"] = task_forgetting(L, k, j)
    if progress.base_losses:
        metrics["base_loss"] = progress.base_losses[k]
        metrics["base_ppl"] = math.exp(progress.base_losses[k])
        metrics["base_forgetting"] = progress.base_losses[k] - progress.base_losses[0]
    if prep.retain:
        metrics |= retain_metrics(progress.retain_losses, k, [r.name for r in prep.retain])
        metrics["retain_matrix"] = [list(r) for r in progress.retain_losses]
    metrics["loss_matrix"] = [list(r) for r in L]
    return metrics
