"""Shared helpers of the evaluator: input checks with actionable messages, map normalisation,
per-sample result objects, and a progress bar that needs no dependency.

Nothing here touches the LRP engine: the evaluator scores *any* attribution method.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import TYPE_CHECKING, Callable, Dict, Iterator, Optional, Sequence, TypeVar

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover
    from .stats import Interval

#: an attribution method: ``(model, x, target) -> map shaped like x``
ExplainFn = Callable[[nn.Module, Tensor, Tensor], Tensor]

T = TypeVar("T")


class EvaluationError(ValueError):
    """Bad input to a metric (wrong shapes, non-finite maps, bad targets, bad batch size)."""


# --------------------------------------------------------------------------------------------
# results


@dataclasses.dataclass
class MetricResult:
    """Base of the typed results: every ``Tensor`` field holds one value (or one row) per sample.

    ``aggregate()`` returns the mean of every 1-D per-sample field, so a table row is one call.
    """

    def per_sample(self) -> Dict[str, Tensor]:
        """The 1-D per-sample fields (name -> ``(N,)`` tensor)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor) and v.dim() == 1 and f.name not in _NOT_SCORES:
                out[f.name] = v
        return out

    def aggregate(self) -> Dict[str, float]:
        """Mean over samples of every per-sample score (NaN-free inputs give NaN-free means)."""
        return {k: float(v.float().mean()) for k, v in self.per_sample().items()}

    def summary(self, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> Dict[str, "Interval"]:
        """Mean and percentile-bootstrap confidence interval over samples of every per-sample score
        (``{name: Interval(mean, low, high)}``; see :mod:`lrpgraph.evaluate.stats`)."""
        from .stats import summarize
        return summarize(self, level=level, n_boot=n_boot, seed=seed)


_NOT_SCORES = {"positive", "x", "target", "steps"}


def cat_results(cls, parts: Sequence[MetricResult]):
    """Concatenate per-chunk results field by field along dim 0 (non-tensor fields from the first)."""
    kw = {}
    for f in dataclasses.fields(cls):
        vals = [getattr(p, f.name) for p in parts]
        if isinstance(vals[0], Tensor):
            kw[f.name] = vals[0] if f.name in ("x",) else torch.cat(vals, 0)
        elif isinstance(vals[0], MetricResult):
            kw[f.name] = cat_results(type(vals[0]), vals)
        else:
            kw[f.name] = vals[0]
    return cls(**kw)


# --------------------------------------------------------------------------------------------
# checks


def check_inputs(model: nn.Module, x: Tensor, y: Optional[Tensor]) -> Optional[Tensor]:
    """Validate ``x`` (a floating batch) and ``y`` (``(B,)`` integer classes, or ``None``)."""
    if not isinstance(model, nn.Module):
        raise EvaluationError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise EvaluationError("x must be a floating-point tensor batch (B, ...); convert images with "
                              "x.float() (and normalise them as the model expects)")
    if x.dim() < 2 or x.shape[0] < 1:
        raise EvaluationError(f"x must be a batch (B, ...) with B >= 1, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise EvaluationError("x contains NaN or inf values; clean the input batch before evaluating")
    if y is None:
        return None
    y = torch.as_tensor(y, device=x.device)
    if y.is_floating_point() or y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise EvaluationError(f"y must hold one integer class per sample, shape ({x.shape[0]},); got "
                              f"shape {tuple(y.shape)}, dtype {y.dtype}. Pass labels as a LongTensor")
    return y.long()


def check_targets(y: Tensor, num_classes: int, what: str = "y") -> None:
    """Raise if a class index is outside ``[0, num_classes)``."""
    bad = (y < 0) | (y >= num_classes)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise EvaluationError(f"{what}[{i}] = {int(y[i])} is out of range: the model has {num_classes} "
                              f"outputs, so classes must be in [0, {num_classes - 1}]; check the labels "
                              "match the model's class order")


def check_map(a: Tensor, x: Tensor, who: str) -> Tensor:
    """A map must be a finite tensor shaped like ``x``; returns it as ``x``'s dtype and device."""
    if not isinstance(a, Tensor):
        raise EvaluationError(f"{who} returned {type(a).__name__}, not a tensor; an attribution method "
                              "must return a map shaped like its input")
    if tuple(a.shape) != tuple(x.shape):
        raise EvaluationError(f"{who} has shape {tuple(a.shape)} but the input has shape {tuple(x.shape)}; "
                              "attributions must be shaped like the input (do not sum over channels, "
                              "do not drop the batch dimension; broadcast a (B, H, W) map with "
                              "m.unsqueeze(1).expand_as(x))")
    a = a.detach().to(device=x.device, dtype=x.dtype)
    if not bool(torch.isfinite(a).all()):
        n = int((~torch.isfinite(a)).flatten(1).any(1).sum())
        raise EvaluationError(f"{who} contains NaN or inf values (in {n} of {a.shape[0]} samples); fix the "
                              "attribution method (e.g. add an epsilon to its denominators) or replace "
                              "them with torch.nan_to_num before evaluating")
    return a


def forward(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    """Logits of ``model`` on ``x`` without gradients, in chunks of ``batch_size``."""
    with torch.no_grad():
        outs = [model(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]
    out = torch.cat(outs, 0)
    if out.dim() != 2:
        raise EvaluationError(f"the model returned shape {tuple(out.shape)}; the evaluator needs (B, C) "
                              "class logits")
    return out


def max_to_one(a: Tensor, eps: float = 1e-9) -> Tensor:
    """``relu(a) / (max + eps)`` per sample: the GAE map normalisation (non-negative, max 1)."""
    a = a.clamp_min(0)
    m = a.flatten(1).amax(1).view(-1, *([1] * (a.dim() - 1)))
    return a / (m + eps)


def sum_to_one(a: Tensor, eps: float = 1e-9) -> Tensor:
    """``a / (sum + eps)`` per sample."""
    s = a.flatten(1).sum(1).view(-1, *([1] * (a.dim() - 1)))
    return a / (s + eps)


# --------------------------------------------------------------------------------------------
# progress


class _Fallback:
    """A minimal text progress bar on stderr for when tqdm is not installed."""

    def __init__(self, total: int, desc: str, disable: bool):
        self.total, self.desc, self.disable, self.n, self.t0 = total, desc, disable, 0, time.perf_counter()

    def update(self, k: int = 1) -> None:
        self.n += k
        if not self.disable:
            el = time.perf_counter() - self.t0
            eta = el / max(self.n, 1) * (self.total - self.n)
            sys.stderr.write(f"\r{self.desc}: {self.n}/{self.total} [{el:5.1f}s<{eta:5.1f}s]")
            sys.stderr.flush()

    def close(self) -> None:
        if not self.disable:
            sys.stderr.write("\n")


def progress(total: int, desc: str, enabled: bool):
    """A progress bar with ``update(k)`` and ``close()``: tqdm when installed, else a text bar."""
    try:
        from tqdm.auto import tqdm  # type: ignore
    except Exception:  # pragma: no cover - depends on the environment
        return _Fallback(total, desc, not enabled)
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def chunks(n: int, size: int) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))
