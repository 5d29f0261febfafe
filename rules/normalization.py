"""Normalisation layers beyond ``nn.BatchNorm`` and LayerNorm: functional ``F.batch_norm`` (timm's
``BatchNormAct2d`` calls it from its own forward) and GroupNorm (``nn.GroupNorm``, ``F.group_norm``).

* ``F.batch_norm`` in eval mode is the per-channel affine op ``x w + b'`` (``w = g / sigma``,
  ``b' = b - w mu``): :func:`affine_of` describes it, so ``abslrp-renorm`` (closed form) and the
  classic presets (epsilon z-rule) serve it as they serve ``nn.BatchNorm2d``; ``abslrp`` takes the
  same two-stage rule as the module (normalise, then scale: each stage's gain ``2 (.)+ / |.|``).
* GroupNorm, statistics constant as for LayerNorm: ``h = g (x - mu) / s + b`` per group.
  ``paper``: ``r = |x (g + |g| sign(x - mu))| / s * S`` (the LayerNorm coefficient, its sign kept by
  taking the magnitude, as the LayerNorm rule does), ``head``: ``(x g / s + |x| |g| / s_abs) S``
  with the statistics recomputed on ``|x|``. The classic presets pass relevance through (identity,
  as for LayerNorm).
* RMS norm (``nn.RMSNorm``, ``F.rms_norm``), ``h = g x / s`` with ``s = sqrt(mean(x^2) + eps)`` over
  the normalised dims, the statistic constant as for LayerNorm. It is LayerNorm without the mean
  and the bias, so both LayerNorm coefficients become one: ``paper`` ``x (g + |g| sign(x)) / s``,
  ``head`` ``x g / s + |x| |g| / s_abs`` with ``s_abs = s`` (the RMS of ``|x|`` is that of ``x``),
  i.e. ``2 (x g)+ / s``, never negative: the constant-scale rule of ``x * c`` with ``c = g / s``.
  The classic presets pass relevance through (identity, as for LayerNorm).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrpgraph.presets import extend_preset
from lrpgraph.rule import EPS, NodeContext, conserve_diagonal

from .abslrp import AbsAffine, AbsLRP
from .affine import ScaleAffine, _arg, register_affine
from .structural import PassThrough


def batch_norm_params(ctx: NodeContext):
    """(mu, sigma, gamma, beta), each shaped ``(1, C, 1, ...)``, of an ``F.batch_norm`` call."""
    a, kw = list(ctx.args) + [None] * 8, ctx.kwargs
    x = ctx.inputs[0]
    mean, var = _arg(a, kw, 1, "running_mean"), _arg(a, kw, 2, "running_var")
    w, b = _arg(a, kw, 3, "weight"), _arg(a, kw, 4, "bias")
    training, eps = _arg(a, kw, 5, "training", False), _arg(a, kw, 7, "eps", 1e-5)
    if training or mean is None or var is None:
        raise NotImplementedError(f"{ctx.describe()} normalises with batch statistics (training mode or "
                                  "no running statistics), which mix the samples; LRP needs per-sample "
                                  "maths: call model.eval() and use running statistics")
    shape = (1, -1) + (1,) * (x.dim() - 2)
    sigma = torch.sqrt(var + eps)
    gamma = w if w is not None else torch.ones_like(sigma)
    beta = b if b is not None else torch.zeros_like(sigma)
    return mean.reshape(shape), sigma.reshape(shape), gamma.reshape(shape), beta.reshape(shape)


def batch_norm_affine(ctx: NodeContext) -> ScaleAffine:
    mu, sigma, gamma, beta = batch_norm_params(ctx)
    w = gamma / sigma
    return ScaleAffine(w.flatten(), (beta - w * mu).flatten(), len(ctx.input_shapes[0]), n_slots=len(ctx.inputs))


class AbsBatchNormF(AbsLRP):
    """``F.batch_norm`` under ``abslrp``: the two-stage rule of the BatchNorm module (spec 2.3).
    Stage 1 ``h1 = (x - mu) / sigma`` has gain ``2 x+ / sigma / |h1|``, stage 2 ``g h1 + b`` has gain
    ``2 (g h1)+ / |h|``; both are >= 0 and element-wise, so conserving once with their product
    equals conserving after each stage."""

    kind = "abslrp.batchnorm2"

    def __call__(self, ctx, relevance):
        mu, sigma, gamma, _ = batch_norm_params(ctx)
        x = ctx.inputs[0]
        h1 = (x - mu) / sigma
        g = (4 * (gamma * h1).clamp(min=0) / (ctx.output.abs() + EPS)) * (x.clamp(min=0) / sigma / (h1.abs() + EPS))
        out: List[Optional[Tensor]] = [None] * len(ctx.inputs)
        out[0] = g
        return conserve_diagonal(relevance, out, ctx)


def group_norm_params(ctx: NodeContext):
    """(groups, weight or None, eps) of a GroupNorm module or ``F.group_norm`` call."""
    m = ctx.module
    if m is not None:
        return m.num_groups, m.weight, m.eps
    a, kw = list(ctx.args) + [None] * 5, ctx.kwargs
    return _arg(a, kw, 1, "num_groups"), _arg(a, kw, 2, "weight"), _arg(a, kw, 4, "eps", 1e-5)


def _group_stats(x: Tensor, groups: int, eps: float):
    """Per-sample, per-group mean and standard deviation, broadcast back to ``x``'s shape."""
    g = x.reshape(x.shape[0], groups, -1)
    var, mu = torch.var_mean(g, dim=-1, correction=0, keepdim=True)
    sd = torch.sqrt(var + eps)
    full = lambda t: t.expand_as(g).reshape(x.shape)  # noqa: E731
    return full(mu), full(sd)


class _NormCoefficient(AbsLRP):
    """An element-wise normalisation rule with contribution ``_coefficient(ctx) * S``."""

    def _coefficient(self, ctx) -> Tensor:
        raise NotImplementedError

    def gains(self, ctx):
        if self.variant != "paper":
            return None
        out: List[Optional[Tensor]] = [None] * len(ctx.inputs)
        out[0] = self._coefficient(ctx) / self.denominator(ctx)
        return out

    def contributions(self, ctx, s):
        out: List[Optional[Tensor]] = [None] * len(ctx.inputs)
        out[0] = self._coefficient(ctx) * s
        return out


class AbsGroupNorm(_NormCoefficient):
    """absLRP GroupNorm (see the module doc); the parameters take no relevance."""

    kind = "abslrp.groupnorm"

    def _coefficient(self, ctx) -> Tensor:
        x = ctx.inputs[0]
        groups, w, eps = group_norm_params(ctx)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        g = w.reshape(shape) if w is not None else torch.ones((), dtype=x.dtype, device=x.device)
        mu, sd = _group_stats(x, groups, eps)
        if self.variant == "paper":
            return (x * (g + g.abs() * torch.sign(x - mu)) / sd).abs_()
        _, sd_abs = _group_stats(x.abs(), groups, eps)
        return x * g / sd + x.abs() * g.abs() / sd_abs


def rms_norm_params(ctx: NodeContext):
    """(normalized dims, weight or None, eps) of an ``nn.RMSNorm`` module or ``F.rms_norm`` call;
    eps ``None`` is the dtype's machine epsilon, as torch takes it."""
    x, m = ctx.inputs[0], ctx.module
    if m is not None:
        shape, w, eps = m.normalized_shape, m.weight, m.eps
    else:
        a, kw = list(ctx.args) + [None] * 4, ctx.kwargs
        shape, w, eps = _arg(a, kw, 1, "normalized_shape"), _arg(a, kw, 2, "weight"), _arg(a, kw, 3, "eps")
    n = 1 if isinstance(shape, int) else len(shape)
    return tuple(range(x.dim() - n, x.dim())), w, torch.finfo(x.dtype).eps if eps is None else eps


def rms(x: Tensor, dims, eps: float) -> Tensor:
    """``sqrt(mean(x^2) + eps)`` over ``dims``, kept for broadcasting."""
    return torch.sqrt(x.square().mean(dim=dims, keepdim=True) + eps)


class AbsRmsNorm(_NormCoefficient):
    """absLRP RMS norm (see the module doc): contribution ``2 (x g)+ / s * S``, both variants; the
    weight takes no relevance."""

    kind = "abslrp.rmsnorm"

    def _coefficient(self, ctx) -> Tensor:
        x = ctx.inputs[0]
        dims, w, eps = rms_norm_params(ctx)
        xg = x * w if w is not None else x
        return 2 * xg.clamp(min=0) / rms(x, dims, eps)


BATCH_NORMS = (F.batch_norm,)
GROUP_NORMS = (nn.GroupNorm, F.group_norm)
RMS_NORMS = (nn.RMSNorm, F.rms_norm)

register_affine(BATCH_NORMS, batch_norm_affine)


def _abs_table(variant: str):
    def table() -> dict:
        bn = AbsBatchNormF(variant) if variant == "paper" else AbsAffine(variant)
        gn, rn = AbsGroupNorm(variant), AbsRmsNorm(variant)
        return {**{k: bn for k in BATCH_NORMS}, **{k: gn for k in GROUP_NORMS}, **{k: rn for k in RMS_NORMS}}
    return table


def _classic_table() -> dict:
    from .classic import Epsilon
    eps, ident = Epsilon(1e-6), PassThrough()
    return {**{k: eps for k in BATCH_NORMS}, **{k: ident for k in GROUP_NORMS + RMS_NORMS}}


extend_preset("*", _classic_table)
extend_preset("abslrp", _abs_table("paper"))
extend_preset("abslrp-renorm", _abs_table("head"))
