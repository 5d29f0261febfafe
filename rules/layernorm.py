"""absLRP LayerNorm: the statistics are constants, the parameters take no relevance.

``head`` (current code) twin recomputes the statistics on ``|x|``: ``r = (x g / s + |x| |g| / s_abs) S``.
``paper`` twin ``|g| |x - mu| / s + |b|``: ``r = x (g + |g| sign(x - mu)) / s * S``, with its sign.
See ``docs/abslrp.md``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from lrpgraph.rule import NodeContext, temp

from .attention import _CoefficientRule

LAYERNORMS = (nn.LayerNorm, F.layer_norm)


def layer_norm_params(ctx: NodeContext):
    """(x, normalized_shape, weight or None, bias or None, eps) of a LayerNorm module or call."""
    x = ctx.inputs[0]
    m = ctx.module
    if m is not None:
        return x, tuple(m.normalized_shape), m.weight, m.bias, m.eps
    a = list(ctx.args) + [None] * 5
    kw = ctx.kwargs
    shape = kw.get("normalized_shape", a[1])
    w = kw.get("weight", a[2])
    b = kw.get("bias", a[3])
    eps = kw.get("eps", a[4] if a[4] is not None else 1e-5)
    return x, tuple(shape), w, b, eps


def _stats(x: Tensor, n: int, eps: float):
    """Mean and ``sqrt(var + eps)`` over the last ``n`` dims, kept as size-1 dims. Taken from the
    fused layer-norm kernel (one pass; ``var_mean`` measured 8x slower on the CPU)."""
    _, mu, rstd = torch.native_layer_norm(x, tuple(x.shape[x.dim() - n:]), None, None, eps)
    return mu, rstd.reciprocal_()


class AbsLayerNorm(_CoefficientRule):
    """absLRP LayerNorm (spec 2.6), statistics constant; parameters take no relevance.

    Args:
        variant: ``"paper"`` (twin ``|g||x - mu|/s + |b|``) or ``"head"`` (twin with the
            statistics recomputed on ``|x|``).
        signs: paper variant only, as for :class:`~lrpgraph.rules.attention.AbsSoftmax`.
    """

    kind = "abslrp.layernorm"

    def coefficient(self, ctx) -> Tensor:
        """The contribution per unit ``S`` (see the class doc)."""
        x, shape, w, _, eps = layer_norm_params(ctx)
        n = len(shape)
        g = w if w is not None else torch.ones(shape, dtype=x.dtype, device=x.device)
        mu, sd = _stats(x, n, eps)
        if self.variant == "paper":  # x (g + |g| sign(x - mu)) / sd, in place on one buffer
            c = torch.sub(x, mu, out=temp(ctx, "coefficient", x)).sign_().mul_(g.abs()).add_(g).mul_(x).div_(sd)
            if self.signs == "keep":
                c = c.abs_()
        else:
            xa = x.abs()
            _, sd_abs = _stats(xa, n, eps)
            c = x * g / sd + xa * g.abs() / sd_abs
        return c

