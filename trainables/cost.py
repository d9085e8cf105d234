"""What a run costs: the parameters it trains and holds, and the memory it peaked at.

:class:`CostMeter` starts with the run and adds four numbers to every report:

- ``params_trainable``, ``params_total``: parameters with ``requires_grad`` and all of them
  (``model.parameters()``, so tied weights count once).
- ``peak_rss_mb``: the highest resident memory of the process since the run started, in MiB.
  On Linux the kernel's high-water mark is reset when the run starts (``/proc/self/clear_refs``)
  and read back from ``/proc/self/status``, so a trial in a worker that Tune reuses
  (``reuse_actors``) gets its own peak, the memory the worker already held included. Where
  the reset is refused (macOS, a kernel before 4.0) it is the process's peak since it started
  (``getrusage(RUSAGE_SELF).ru_maxrss`` where there is no ``/proc``), earlier trials included.
- ``peak_gpu_mb`` (CUDA only): ``torch.cuda.max_memory_allocated`` since the run started, in
  MiB: tensors only, not PyTorch's cache nor the CUDA context.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch
from torch import nn

MIB = 2**20
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def param_counts(model: nn.Module) -> dict[str, int]:
    """``params_trainable`` (``requires_grad``) and ``params_total`` of ``model``."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return {"params_trainable": trainable, "params_total": total}


def reset_peak_rss() -> bool:
    """Reset the process's resident-memory high-water mark to its current size (Linux >= 4.0).

    Returns:
        Whether the kernel took the reset.
    """
    try:
        _CLEAR_REFS.write_text("5")  # 5: reset the peak RSS only; 1-4 would touch page bits
    except OSError:
        return False
    return True


def peak_rss_mb() -> float:
    """The process's peak resident memory in MiB: ``VmHWM`` where ``/proc`` has it (it follows
    :func:`reset_peak_rss`), else ``ru_maxrss`` (KiB on Linux, bytes on macOS)."""
    try:
        found = re.search(r"^VmHWM:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        found = None
    if found:
        return int(found.group(1)) * 1024 / MIB
    import resource  # POSIX only; Linux answers from /proc above

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak * 1024 / MIB


class CostMeter:
    """Resets the peaks when made; :meth:`measure` after each task reads them.

    Args:
        device: the device the run trains on; the GPU peak is kept only on CUDA.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        reset_peak_rss()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def measure(self, model: nn.Module) -> dict[str, float]:
        """Parameter counts of ``model`` and the memory peaks since the run started."""
        out: dict[str, float] = {**param_counts(model), "peak_rss_mb": peak_rss_mb()}
        if self.device.type == "cuda":
            out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(self.device) / MIB
        return out
