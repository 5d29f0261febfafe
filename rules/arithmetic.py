"""Subtraction: ``a - b`` is the addition ``a + (-b)``.

absLRP, twin ``|a| + |b|``: ``r_a = a (1 + sign a) S = 2 a+ S`` and ``r_b = b (sign b - 1) S = 2 (-b)+ S``
(both gains >= 0, so ``paper`` conserves each sign's mass jointly over the operands, exactly as for
additions; ``head`` returns the raw contributions for the walker to renormalise). Numbers take no
slot (their share is absorbed); parameters and buffers absorb theirs by design. Classic presets:
the epsilon z-rule over the summands ``a`` and ``-b``.
"""
from __future__ import annotations

import operator
from typing import List, Optional

import torch
from torch import Tensor

from lrpgraph.presets import extend_preset
from lrpgraph.rule import NodeContext, Rule, stabilise

from .abslrp import AbsLRP

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


class SubEpsilon(Rule):
    """Classic ``a - b``: ``R_a = a R / z``, ``R_b = -b R / z`` (epsilon-stabilised)."""

    def __init__(self, epsilon: float = 1e-6):
        self.epsilon = float(epsilon)

    @property
    def name(self) -> str:
        return f"sub-epsilon({self.epsilon:g})"

    def __call__(self, ctx, relevance):
        s = relevance / stabilise(ctx.output, self.epsilon or 1e-12)
        return [None if not isinstance(v, Tensor) else sg * v * s
                for v, sg in zip(ctx.inputs, signed_operands(ctx))]


extend_preset("*", lambda: {k: SubEpsilon() for k in SUBS})
extend_preset("abslrp", lambda: {k: AbsSub("paper") for k in SUBS})
extend_preset("abslrp-renorm", lambda: {k: AbsSub("head") for k in SUBS})
