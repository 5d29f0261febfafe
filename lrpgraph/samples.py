"""Per-sample reductions of relevance tensors: the sums over a sample's features that every
conserving rule rescales by, and the layout they assume.

Relevance is ``(K, B, ...)`` (see :mod:`lrpgraph.rule`). A per-sample sum reduces the feature dims
to ``(K, B)``. Where a model merges its batch with windows or tokens (``(B * nW, ...)``), the walker
sets :data:`SAMPLE_ROWS` from the batch-axis probe, and these sums add up each sample's rows, so a
sign stream is conserved per sample and the map does not depend on the model's batch layout.
"""
from __future__ import annotations

from contextvars import ContextVar
from typing import Optional

import torch
from torch import Tensor

def feature_dims(t: Tensor) -> tuple:
    """The dims of a ``(K, B, ...)`` relevance tensor that a per-sample reduction sums over."""
    return tuple(range(2, t.dim()))


#: ``{rows: rows per sample}`` for the node whose rule runs: dim-1 sizes of its tensors where the
#: batch is merged with windows or tokens, batch-major (``(B * nW, ...)``; set by the walker from the
#: batch-axis probe). The per-sample sums below then add up each sample's rows, so a sign stream is
#: conserved per sample as everywhere else, not per window (which would lose a window's stream
#: where the window has no carrier, and make the map depend on how the model lays out its batch).
SAMPLE_ROWS: "ContextVar[Optional[dict]]" = ContextVar("lrpgraph_sample_rows", default=None)


def _per_sample(s: Tensor) -> Tensor:
    """Per-row sums ``(K, R)`` -> each sample's total, repeated over its rows (see ``SAMPLE_ROWS``)."""
    return per_sample_rows(s, 1) if s.dim() == 2 else s


def per_sample_rows(s: Tensor, dim: int) -> Tensor:
    """Sums with the rows (batch) axis at ``dim`` -> each sample's total, repeated over its rows
    (see ``SAMPLE_ROWS``); ``s`` itself where the batch is not merged with windows or tokens."""
    rows = SAMPLE_ROWS.get()
    r = s.shape[dim]
    m = rows.get(r, 1) if rows else 1
    if m == 1:
        return s
    t = s.movedim(dim, -1)
    shp = t.shape
    t = t.reshape(*shp[:-1], r // m, m).sum(-1, keepdim=True).expand(*shp[:-1], r // m, m).reshape(shp)
    return t.movedim(-1, dim)


def batch_to_front(r: Tensor, axis: Optional[int], back: bool = False) -> Tensor:
    """A relevance ``(K, ...)`` of a value whose batch is on ``axis`` (from the walk's batch-axis
    probe), as a view with the batch at dim 1 where the per-sample sums expect it (``back``: the
    inverse view). Unchanged where ``axis`` is 0 or not an int."""
    if not isinstance(axis, int) or axis <= 0:
        return r
    return r.movedim(1, axis + 1) if back else r.movedim(axis + 1, 1)


def sample_sum(t: Tensor) -> Tensor:
    """Sum of a ``(K, B, ...)`` tensor per (k, sample): shape ``(K, B)``."""
    return _per_sample(t.sum(dim=feature_dims(t)) if t.dim() > 2 else t)


def expand_stats(s: Tensor, like: Tensor) -> Tensor:
    """Reshape a ``(K, B)`` statistic so that it broadcasts against ``like`` (``(K, B, ...)``)."""
    return s.reshape(s.shape + (1,) * (like.dim() - 2))


def sample_dot(t: Tensor, c: Tensor) -> Tensor:
    """``sum over features of t[k, b, ...] * c[b, ...]`` per (k, sample): shape ``(K, B)``.

    ``c`` has no K axis and broadcasts against ``t[0]``. These sums run on the largest tensors of a
    model, so large ones are one BLAS dot (or matrix-vector product) per sample, which builds no
    ``(K, B, ...)`` temporary; a batched ``(B, 1, F) @ (B, F, 1)`` product measured 12x slower on CPU.
    """
    return _per_sample(_row_dot(t, c))


def _row_dot(t: Tensor, c: Tensor) -> Tensor:
    k, b = t.shape[0], t.shape[1]
    tf = t.reshape(k, b, -1)
    cf = c.expand(t.shape[1:]).reshape(b, -1)
    if tf.shape[-1] < 8192:  # small: one fused product and sum beats B calls
        return (tf * cf).sum(-1)
    if k == 1:
        return torch.stack([torch.dot(tf[0, i], cf[i]) for i in range(b)]).unsqueeze(0)
    return torch.stack([tf[:, i] @ cf[i] for i in range(b)], 1)
