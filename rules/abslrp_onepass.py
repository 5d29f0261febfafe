"""The one-pass form of the paper-era absLRP sign split (used when no report is measured).

``conserve_signs`` (:mod:`lrpgraph.rule`) pushes ``S+`` and ``S-`` through a rule separately (2K
relevance rows) and rescales each stream to the mass of its sign. When every contribution
coefficient is non-negative (the affine rule on Linear; products in :mod:`.attention`), the stream
masses are known without the streams: ``|r(S+)| = sum_j S+_j C_j`` with ``C_j`` the total
contribution into output ``j`` (summed over inputs and slots). By linearity the result is
``r(a S+ + b S-)`` with ``a = P / |r(S+)|``, ``b = |N| / |r(S-)|``: one pass over K rows, same
numbers. With a report the exact two-stream Split is kept, so the report measures the streams.

Speed: the four per-sample sums this needs (``S+`` and ``S`` against ``den`` and ``C``) are one
batched matrix product over buffers that hold ``S+, S`` and ``den, C`` side by side
(:func:`joint_dots`), which reads each of the four largest tensors of the rule once instead of twice.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Union

import torch
from torch import Tensor

from lrpgraph.rule import NodeContext, _ratio, conserve_diagonal, expand_stats, per_sample_rows, sample_dot, sample_sum, temp


def _buffer(ctx: Optional[NodeContext], key: str, like: Tensor, shape) -> Tensor:
    buf = temp(ctx, key, like, shape)
    return buf if buf is not None else torch.empty(tuple(shape), dtype=like.dtype, device=like.device)


def joint_dots(rows: Tensor, cols: Tensor) -> Tensor:
    """``sum over features of rows[i, k, b] * cols[j, b]`` for every (i, j, k, b): ``(I, J, K, B)``.

    ``rows`` is ``(I, K, B, ...)`` and ``cols`` ``(J, B, ...)``, both contiguous: one batched
    product per sample, which reads every tensor once (a dot per pair would read each twice).
    """
    i, k, b = rows.shape[0], rows.shape[1], rows.shape[2]
    j = cols.shape[0]
    a = rows.reshape(i * k, b, -1).transpose(0, 1)  # (B, I*K, L)
    d = cols.reshape(j, b, -1).permute(1, 2, 0)  # (B, L, J)
    # per sample, also where the batch is merged with windows (see lrpgraph.rule.SAMPLE_ROWS)
    return per_sample_rows(torch.bmm(a, d).reshape(b, i, k, j).permute(1, 3, 2, 0), 3)


def block_dots(rows: Tensor, cols: Tensor, blocks: int) -> Tensor:
    """:func:`joint_dots` per block of the last axis, cut into ``blocks`` equal contiguous blocks:
    ``(I, J, K, B, blocks)``. One batched product per row of the last axis and block (strided
    views, no copy), then a sum over the rows."""
    i, k, b = rows.shape[0], rows.shape[1], rows.shape[2]
    j, f = cols.shape[0], rows.shape[-1]
    size = f // blocks
    per = rows[0, 0].numel()  # entries per (i, k): B * M * F
    m = per // (b * f)
    a = rows.as_strided((b * m * blocks, i * k, size), (size, per, 1), rows.storage_offset())
    d = cols.as_strided((b * m * blocks, size, j), (size, 1, per), cols.storage_offset())
    out = torch.bmm(a, d).reshape(b, m, blocks, i, k, j).sum(1)  # (B, blocks, I, K, J)
    return per_sample_rows(out.permute(2, 4, 3, 0, 1), 3)


def one_pass_streams(rule, ctx: NodeContext, relevance: Tensor):
    """The buffers of the one-pass form for an affine rule: ``(S+ | S, den | C)``, each pair side by
    side (contiguous), with ``S = relevance / den`` and ``C`` the rule's ``column_mass``."""
    joint = _buffer(ctx, "one-pass.den|C", relevance, (2,) + tuple(relevance.shape[1:]))
    streams = _streams(ctx, relevance, rule.denominator(ctx, joint[0]))
    _into(lambda buf: rule.column_mass(ctx, buf), joint[1])
    return streams, joint


def one_pass_scale(relevance: Tensor, column_mass: Union[Tensor, Callable[[Tensor], Tensor]],
                   den: Union[Tensor, Callable[[Tensor], Tensor]], ctx: Optional[NodeContext] = None,
                   mass_scale: float = 1.0) -> Tensor:
    """``a S+ + b S-`` with ``S = relevance / den`` (see the module doc).

    ``column_mass`` and ``den`` are shaped like ``relevance`` without the K axis; each may be a
    function that writes it into the buffer it is given (so that both lie side by side, see
    :func:`joint_dots`, without a copy). ``mass_scale``: the true column mass is this multiple of
    ``column_mass`` (a product of two activations: both operands' shares; no pass to scale it).
    With ``ctx`` the result is a scratch buffer of the walk (valid while the rule runs).
    """
    joint = _buffer(ctx, "one-pass.den|C", relevance, (2,) + tuple(relevance.shape[1:]))
    d = _into(den, joint[0])
    streams = _streams(ctx, relevance, d)
    _into(column_mass, joint[1])
    dots = joint_dots(streams, joint)  # [S+, S] x [den, C]; R+ = S+ * den: no clamped copy of R
    if mass_scale != 1:
        dots[:, 1] *= mass_scale
    p, mp = dots[0, 0], dots[0, 1]
    a = expand_stats(_ratio(p, mp), relevance)
    b = expand_stats(_ratio((dots[1, 0] - p).abs(), (dots[1, 1] - mp).abs()), relevance)
    return streams[0].mul_(a - b).addcmul_(streams[1], b)  # (a - b) S+ + b S = a S+ + b S-


def _streams(ctx: Optional[NodeContext], relevance: Tensor, den: Tensor) -> Tensor:
    """``S+`` and ``S`` of ``S = relevance / den``, side by side in one buffer ``(2, K, B, ...)``."""
    streams = _buffer(ctx, "one-pass.S+|S", relevance, (2,) + tuple(relevance.shape))
    torch.clamp(torch.div(relevance, den, out=streams[1]), min=0, out=streams[0])
    return streams


def _into(value: Union[Tensor, Callable[[Tensor], Tensor]], buf: Tensor) -> Tensor:
    """``value`` (or ``value(buf)``) in ``buf``: copied only where it is not there already."""
    v = value(buf) if callable(value) else value
    if v.data_ptr() != buf.data_ptr() or v.stride() != buf.stride() or v.shape != buf.shape:
        buf.copy_(v)
    return buf


def one_pass_diagonal(rule, ctx: NodeContext, relevance: Tensor) -> list:
    """The one-pass sign split for an element-wise rule whose contribution is ``coefficient * S``
    (softmax, LayerNorm): with the gain ``coefficient / den`` it is :func:`conserve_diagonal`."""
    out: List[Optional[Tensor]] = [None] * len(ctx.inputs)
    out[0] = rule.gain(ctx)
    return conserve_diagonal(relevance, out, ctx)


def one_pass_signed(rule, ctx: NodeContext, relevance: Tensor) -> list:
    """The sign-split rule for a signed diagonal coefficient ``c`` in one pass: the positive
    stream ``c S+`` is rescaled to mass ``P`` by its L1 norm ``sum |c| S+``, the negative one
    likewise, so the result is ``c (a S+ + b S-)`` (what :func:`conserve_signs` computes with two
    streams). A positive constant factor of ``c`` cancels, so ``rule.gain`` may omit it."""
    g = rule.gain(ctx)
    ga = torch.abs(g, out=temp(ctx, "signed.|g|", g))
    own = ctx.owns_relevance and not torch.is_grad_enabled()
    rp = torch.clamp(relevance, min=0, out=temp(ctx, "signed.R+", relevance) if own else None)
    pos = sample_sum(rp)
    neg = (sample_sum(relevance) - pos).abs()
    tp = sample_dot(rp, ga)
    tn = (sample_dot(relevance, ga) - tp).abs()
    a = expand_stats(_ratio(pos, tp), rp)
    b = expand_stats(_ratio(neg, tn), rp)
    out: List[Optional[Tensor]] = [None] * len(ctx.inputs)
    if own:  # b R + (a - b) R+ = a R+ + b R-, in the handed-over buffer
        out[0] = relevance.mul_(b).addcmul_(rp, a - b).mul_(g)
    else:
        out[0] = rp.mul_(a - b).addcmul_(relevance, b).mul_(g)
    return out


__all__ = ["block_dots", "joint_dots", "one_pass_diagonal", "one_pass_scale", "one_pass_signed", "one_pass_streams"]
