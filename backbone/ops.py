"""Masked statistics over response tokens, shared by every algorithm.

Statistics are global over data-parallel ranks when torch.distributed is initialised
(trlx's distributed whitening), so a 2-rank run whitens like one process on the union.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum(x * mask) / sum(mask); over everything, or along ``dim``."""
    return masked_sum(x, mask, dim) / mask.sum(dim=dim).clamp(min=1)


def _all_reduce_sum(t: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def global_masked_mean_var(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and population variance of the masked entries, over all ranks."""
    mask = mask.to(x.dtype)
    sums = _all_reduce_sum(torch.stack([masked_sum(x, mask), mask.sum()]))
    mean = sums[0] / sums[1].clamp(min=1)
    sq = _all_reduce_sum(masked_sum((x - mean) ** 2, mask))
    return mean, sq / sums[1].clamp(min=1)


def masked_whiten(
    x: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    moments: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """(x - mean) / sqrt(var + eps) over masked entries; masked-out entries become 0. ``moments``:
    the (mean, var) of ``global_masked_mean_var(x, mask)`` when the caller has them already."""
    mean, var = moments if moments is not None else global_masked_mean_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask
