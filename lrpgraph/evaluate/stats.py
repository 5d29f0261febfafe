"""Spread of a metric: bootstrap confidence intervals over samples (mosaics for GAE) and means over
several seeds.

One evaluation is one draw: GAE samples each mosaic's positive image, and a mean over 64 mosaics
moves a lot when a few mosaics change. So a table row should say how sure it is:

* :func:`bootstrap_ci` — percentile bootstrap interval of the mean of per-sample scores
  (resample the samples with replacement ``n_boot`` times, take the ``(1 - level) / 2`` and
  ``(1 + level) / 2`` quantiles of the resampled means). Seeded, so a table is reproducible.
* :func:`mean_over_seeds` — the per-sample average of several runs that differ only in their seed
  (same samples, e.g. GAE with ``seed=0, 1, 2``); its bootstrap interval covers both the mosaic
  sampling and, averaged out, the seed.
* :func:`summarize` — ``{score: Interval(mean, low, high)}`` for every per-sample score.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._common import MetricResult


class Interval(NamedTuple):
    """A mean with its confidence interval ``[low, high]``."""

    mean: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


def bootstrap_ci(values: Union[Tensor, Sequence[float]], level: float = 0.95, n_boot: int = 2000,
                 seed: int = 0) -> Tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values`` (1-D).

    Args:
        values: one score per sample (non-finite values are an error: drop or fix them first).
        level: the coverage, in (0, 1).
        n_boot: resamples; 2000 gives the 2.5 % / 97.5 % quantiles to about +-0.1 standard errors.
        seed: seeds the resampling (a CPU generator, so any device gives the same interval).

    Returns:
        ``(low, high)``; a single value (or all equal values) gives ``(v, v)``.
    """
    v = torch.as_tensor(values).detach().flatten().double().cpu()
    if v.numel() == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not bool(torch.isfinite(v).all()):
        raise ValueError("bootstrap_ci got NaN or inf values; drop or fix them before computing an interval")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be an int >= 1, got {n_boot!r}")
    gen = torch.Generator().manual_seed(seed)
    n = v.numel()
    means = torch.empty(n_boot, dtype=torch.float64)
    step = max(1, 2_000_000 // n)                       # bound the index matrix to ~16 MB
    for s in range(0, n_boot, step):
        k = min(step, n_boot - s)
        means[s:s + k] = v[torch.randint(n, (k, n), generator=gen)].mean(1)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    low, high = torch.quantile(means, q).tolist()
    return low, high


def mean_over_seeds(results: Sequence[Union[MetricResult, Dict[str, Tensor]]]) -> Dict[str, Tensor]:
    """Per-sample average over runs that differ only in their seed: ``{score: (N,) tensor}``.

    Every run must have the same scores and the same number of samples.
    """
    if not results:
        raise ValueError("mean_over_seeds needs at least one result")
    dicts = [r.per_sample() if isinstance(r, MetricResult) else dict(r) for r in results]
    keys = list(dicts[0])
    for d in dicts[1:]:
        if list(d) != keys or any(d[k].shape != dicts[0][k].shape for k in keys):
            raise ValueError("the runs differ in their scores or sample counts; average runs of one metric "
                             "on the same samples")
    return {k: torch.stack([d[k].double() for d in dicts]).mean(0) for k in keys}


def summarize(result: Union[MetricResult, Dict[str, Tensor]], level: float = 0.95, n_boot: int = 2000,
              seed: int = 0) -> Dict[str, Interval]:
    """``{score: Interval(mean, low, high)}`` for every per-sample score of ``result`` (a metric's
    result or the dict of :func:`mean_over_seeds`)."""
    d = result.per_sample() if isinstance(result, MetricResult) else dict(result)
    out = {}
    for k, v in d.items():
        lo, hi = bootstrap_ci(v, level, n_boot, seed)
        out[k] = Interval(float(v.double().mean()), lo, hi)
    return out
