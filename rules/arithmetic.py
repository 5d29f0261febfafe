"""Subtraction and ``addcmul``: additions of signed or product summands.

Subtraction: ``a - b`` is the addition ``a + (-b)``.

absLRP, twin ``|a| + |b|``: ``r_a = a (1 + sign a) S = 2 a+ S`` and ``r_b = b (sign b - 1) S = 2 (-b)+ S``
(both gains >= 0, so ``paper`` conserves each sign's mass jointly over the operands, exactly as for
additions; ``head`` returns the raw contributions for the walker to renormalise). Numbers take no
slot (their share is absorbed); parameters and buffers absorb theirs by design. Classic presets:
the epsilon z-rule over the summands ``a`` and ``-b``.

``torch.addcmul(a, t1, t2, value=v)`` is ``a + p`` with the product ``p = v t1 t2``. absLRP, twin
``|a| + |v| |t1| |t2|``: ``r_a = 2 a+ S`` and, for each factor that is an activation, ``r_t = 2 p+ S``
(the product rule of two activations; a constant factor takes none). Classic: ``R_a = a R / z`` and
``p R / z`` split evenly over the activation factors.
"""
from __future__ import annotations

import operator
from typing import List, Optional

import torch
from torch import Tensor

from lrpgraph.presets import extend_preset
from lrpgraph.rule import NodeContext, stabilise

from .abslrp import AbsLRP
from .classic import EpsilonRule

SUBS = (operator.sub, torch.sub, torch.subtract, "sub", "subtract")


def signed_operands(ctx: NodeContext) -> List[Optional[float]]:
    """Per slot: +1 for the minuend, -1 for the subtrahend (``None`` for other slots)."""
    a, kw = list(ctx.args) + [None], ctx.kwargs
    alpha = kw.get("alpha", 1)
    if alpha != 1:
        raise NotImplementedError(f"{ctx.describe()}: subtraction with alpha={alpha!r} has no rule")
    minuend = a[0]
    return [1.0 if v is minuend else -1.0 for v in ctx.inputs]


class AbsSub(AbsLRP):
    """absLRP for ``a - b`` (see the module doc)."""

    kind = "abslrp.sub"

    def contributions(self, ctx, s):
        return [None if not isinstance(v, Tensor) else 2 * (sg * v).clamp(min=0) * s
                for v, sg in zip(ctx.inputs, signed_operands(ctx))]

    def gains(self, ctx):
        inv = self.denominator(ctx).reciprocal().mul_(2)
        return [None if not isinstance(v, Tensor) else (sg * v).clamp(min=0) * inv
                for v, sg in zip(ctx.inputs, signed_operands(ctx))]


class SubEpsilon(EpsilonRule):
    """Classic ``a - b``: ``R_a = a R / z``, ``R_b = -b R / z`` (epsilon-stabilised)."""

    op_name = "sub-epsilon"

    def __call__(self, ctx, relevance):
        s = relevance / stabilise(ctx.output, self.epsilon or 1e-12)
        return [None if not isinstance(v, Tensor) else sg * v * s
                for v, sg in zip(ctx.inputs, signed_operands(ctx))]


extend_preset("*", lambda: {k: SubEpsilon() for k in SUBS})
extend_preset("abslrp", lambda: {k: AbsSub("paper") for k in SUBS})
extend_preset("abslrp-renorm", lambda: {k: AbsSub("head") for k in SUBS})


def addcmul_parts(ctx: NodeContext):
    """(per-slot summand value: ``a`` for the input, ``p = v t1 t2`` for each activation factor,
    ``None`` for constants; the number of activation factors)."""
    a, kw = list(ctx.args) + [None] * 3, ctx.kwargs
    x, t1, t2 = a[0], kw.get("tensor1", a[1]), kw.get("tensor2", a[2])
    p = kw.get("value", 1) * t1 * t2
    parts: List[Optional[Tensor]] = []
    for v, const in zip(ctx.inputs, ctx.is_parameter):
        if const or not isinstance(v, Tensor):
            parts.append(None)
        else:
            parts.append(x if v is x else p)
    return parts, sum(1 for v, q in zip(ctx.inputs, parts) if q is not None and v is not x)


class AbsAddcmul(AbsLRP):
    """absLRP for ``torch.addcmul`` (see the module doc)."""

    kind = "abslrp.addcmul"

    def gains(self, ctx):
        inv = self.denominator(ctx).reciprocal().mul_(2)
        parts, _ = addcmul_parts(ctx)
        return [None if q is None else q.clamp(min=0) * inv for q in parts]

    def contributions(self, ctx, s):
        parts, _ = addcmul_parts(ctx)
        return [None if q is None else 2 * q.clamp(min=0) * s for q in parts]


class AddcmulEpsilon(EpsilonRule):
    """Classic ``torch.addcmul``: the epsilon z-rule over ``a`` and ``p``, ``p``'s share split evenly."""

    op_name = "addcmul-epsilon"

    def __call__(self, ctx, relevance):
        s = relevance / stabilise(ctx.output, self.epsilon or 1e-12)
        parts, n = addcmul_parts(ctx)
        x = ctx.args[0]
        return [None if q is None else (q * s if v is x else q * s / n) for v, q in zip(ctx.inputs, parts)]


ADDCMULS = (torch.addcmul, "addcmul")
extend_preset("*", lambda: {k: AddcmulEpsilon() for k in ADDCMULS})
extend_preset("abslrp", lambda: {k: AbsAddcmul("paper") for k in ADDCMULS})
extend_preset("abslrp-renorm", lambda: {k: AbsAddcmul("head") for k in ADDCMULS})
