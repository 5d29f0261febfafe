"""Transposed-Jacobian (VJP) formulas for abslrp-renorm's residual term, beyond those in
:mod:`lrpgraph.rules.residual`: subtraction, ``addcmul``, GroupNorm, ``F.normalize``, max
reductions, L2 norms, the masked mean, and, by op, powers with a constant exponent, ``F.fold`` and
transposed convolutions.

The residual term differentiates the branch as the authors' current code runs it: through every op
as the model computes it, except where that code detaches a statistic (LayerNorm's mean and
variance, softmax's maximum and denominator). Its design makes a node's own rule and the residual
Jacobian two uses of one forward graph, so lrpgraph holds constant in ``J`` exactly what the node's
rule holds constant:

* GroupNorm: the per-group mean and deviation (as for LayerNorm): ``J^T g = g w / s``;
* RMS norm: the root mean square (as for LayerNorm): ``J^T g = g w / s``;
* ``F.normalize``: the norm (the rule treats it as a positive constant): ``J^T g = g / ||x||``;
* everything else is differentiated in full: ``a - b``, ``addcmul``, the L2 norm (``x / ||x||``),
  a max reduction (to the first maximum of each group, as the rule routes it), powers.

:func:`formula` returns the formula for a node's rule, :func:`formula_by_op` the one for its op
where no formula knows the rule (a transposed convolution under an affine rule takes the affine
transpose instead). Each formula takes ``(ctx, rule, g)`` with ``g`` shaped ``(K, *output)`` and returns one
cotangent per input slot (``None`` for constants). ``docs/abslrp.md`` lists the decisions; the tests
check every formula against autograd in float64.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from lrpgraph.rule import NodeContext

from .activations import POWS, pow_exponent, power
from .affine import affine_of
from .arithmetic import AbsAddcmul, AbsSub
from .normalization import AbsGroupNorm, AbsRmsNorm, _group_stats, group_norm_params, rms, rms_norm_params
from .pooling import FOLDS, AbsMaxReduce, AbsNorm, _max_args, _norm_args, _spread, _values, winner_mask
from .transformer import AbsMaskedMean, AbsNormalize, _mean_weights, _normalize_norm

Formula = Callable[[NodeContext, object, object], list]


def _slot_positions(ctx: NodeContext) -> List[object]:
    """Per input slot: the argument position it fills (an int for ``args``, a name for ``kwargs``);
    a slot nested in a list argument gets that argument's position."""
    node = ctx.node
    if node is None:
        raise NotImplementedError(f"{ctx.describe()}: the residual term needs the graph node")
    out: List[object] = []
    for pos, a in list(enumerate(node.args)) + list(node.kwargs.items()):
        fx.node.map_arg(a, lambda n, p=pos: out.append(p) or n)
    return out


def _live(ctx: NodeContext, i: int) -> bool:
    return not ctx.is_parameter[i] and ctx.input_shapes[i] is not None


def _sub(ctx: NodeContext, rule, g: Tensor) -> list:
    """``a - alpha b``: ``g`` to the minuend, ``-alpha g`` to the subtrahend."""
    alpha = ctx.kwargs.get("alpha", 1)
    return [None if not _live(ctx, i) else (g if p in (0, "input") else -alpha * g)
            for i, p in enumerate(_slot_positions(ctx))]


def _addcmul(ctx: NodeContext, rule, g: Tensor) -> list:
    """``a + v t1 t2``: ``g`` to ``a``, ``v g t2`` to ``t1``, ``v g t1`` to ``t2``."""
    a, kw = list(ctx.args) + [None] * 3, ctx.kwargs
    t1, t2, v = kw.get("tensor1", a[1]), kw.get("tensor2", a[2]), kw.get("value", 1)
    other = {1: t2, "tensor1": t2, 2: t1, "tensor2": t1}
    return [None if not _live(ctx, i) else (g if p in (0, "input") else v * g * other[p])
            for i, p in enumerate(_slot_positions(ctx))]


def _one(ctx: NodeContext, t: Tensor) -> list:
    out: list = [None] * len(ctx.inputs)
    out[0] = t
    return out


def _group_norm(ctx: NodeContext, rule, g: Tensor) -> list:
    """Statistics constant (as for LayerNorm): ``g w / s``."""
    x = ctx.inputs[0]
    groups, w, eps = group_norm_params(ctx)
    _, sd = _group_stats(x, groups, eps)
    if w is not None:
        g = g * w.reshape((-1,) + (1,) * (x.dim() - 2))
    return _one(ctx, g / sd)


def _rms_norm(ctx: NodeContext, rule, g: Tensor) -> list:
    """The root mean square constant (as LayerNorm's statistics): ``g w / s``."""
    x = ctx.inputs[0]
    dims, w, eps = rms_norm_params(ctx)
    return _one(ctx, (g * w if w is not None else g) / rms(x, dims, eps))


def _normalize(ctx: NodeContext, rule, g: Tensor) -> list:
    """The norm constant (as the rule treats it): ``g / max(||x||, eps)``."""
    return _one(ctx, g / _normalize_norm(ctx))


def _max_reduce(ctx: NodeContext, rule, g) -> list:
    """To the first maximum of each reduced group (the entry the rule routes to)."""
    x = ctx.inputs[0]
    dims, keep = _max_args(ctx)
    return _one(ctx, winner_mask(x, dims) * _spread(_values(g), x.shape, dims, keep))


def _norm(ctx: NodeContext, rule, g: Tensor) -> list:
    """The L2 norm in full: ``g x / ||x||`` (0 where the norm is 0)."""
    x = ctx.inputs[0]
    dims, keep = _norm_args(ctx)
    h = _spread(ctx.output.unsqueeze(0), x.shape, dims, keep)[0]
    return _one(ctx, _spread(g, x.shape, dims, keep) * x / torch.where(h > 0, h, torch.ones_like(h)))


def _masked_mean(ctx: NodeContext, rule, g: Tensor) -> list:
    """A mean with constant weights ``m_t / sum m``; the mask takes nothing."""
    x, m = ctx.inputs[0], ctx.inputs[1]
    return [g.unsqueeze(-2) * _mean_weights(x, m), None]


BY_RULE = {AbsSub: _sub, AbsAddcmul: _addcmul, AbsGroupNorm: _group_norm, AbsRmsNorm: _rms_norm,
           AbsNormalize: _normalize, AbsMaxReduce: _max_reduce, AbsNorm: _norm, AbsMaskedMean: _masked_mean}


# --------------------------------------------------------------------------------------------
# by op: ops whose derivative no statistic enters, whatever rule a preset gives them


def _pow(ctx: NodeContext, rule, g: Tensor) -> list:
    """``x ** p`` with a constant number ``p``: ``g f'(x)`` (the exponent and derivative of the
    power rules; a tensor exponent is refused by name)."""
    _, df = power(pow_exponent(ctx))
    return _one(ctx, g * df(ctx.inputs[0]))


def _affine(ctx: NodeContext, rule, g: Tensor) -> list:
    """Fold and transposed convolutions: linear ops whose transpose their affine form gives
    (``F.unfold``; the convolution with the same weight), as for any affine rule."""
    op = affine_of(ctx)
    return op.place(op.transpose(g, op.weight))


_CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                    F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
BY_OP = {**{k: _pow for k in POWS}, **{k: _affine for k in (*FOLDS, *_CONV_TRANSPOSES)}}


def formula(ctx: NodeContext, rule) -> Optional[Formula]:
    """The VJP formula of a node by its rule: the rule's own ``vjp(ctx, g)`` method if it has one,
    else the formula of this module for its class; ``None`` if neither."""
    own = getattr(rule, "vjp", None)
    if callable(own):
        return lambda c, r, g: own(c, g)
    for cls, fn in BY_RULE.items():
        if isinstance(rule, cls):
            return fn
    return None


def formula_by_op(ctx: NodeContext) -> Optional[Formula]:
    """The VJP formula of a node by its op (powers, fold, transposed convolutions), for a rule
    that no formula knows; ``None`` for other ops."""
    key = type(ctx.module) if ctx.module is not None else ctx.target
    try:
        return BY_OP.get(key)
    except TypeError:  # an unhashable target
        return None
