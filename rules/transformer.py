"""Transformer rules besides attention and LayerNorm: embeddings, masks, scalings, tables.

The attention products and softmax live in :mod:`lrpgraph.rules.attention`, LayerNorm in
:mod:`lrpgraph.rules.layernorm`; their names are re-exported here. This module assembles the
transformer entries of every preset.

Constants and routing: the attention mask (``attention_mask``, ``masked_fill``) passes all
relevance to the scores; the attention's query scale passes relevance through unchanged (as in
both reference code eras, which apply no rule to it); an embedding lookup sums the relevance over
the embedding dim, giving one value per token id (positive and negative parts reported
separately); ``F.normalize`` (norm constant) is a scaling by a positive constant.

The classic presets get LXT/CP-LRP style rules: the epsilon z-rule split 50/50 for a product of
two activations, identity for softmax and LayerNorm (statistics constant), the same routing for
masks and embeddings. See ``docs/abslrp.md`` for the absLRP rules.
"""
from __future__ import annotations

import operator
import sys
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrpgraph.attention import attention_mask, scale_query
from lrpgraph.presets import SCALES, extend_preset
from lrpgraph.rule import NodeContext, Rule, Split, stabilise
from lrpgraph.text import masked_mean

from .abslrp import AbsLRP
from .classic import EpsilonRule
from .attention import (EINSUMS, GUARD, MATMULS, SOFTMAXES, AbsMul, AbsProduct, AbsSoftmax,  # noqa: F401
                        _activations, _CoefficientRule, _operands, _parse_einsum, _product, _product_mass,
                        _promote, einsum_contributions, matmul_contributions)
from .layernorm import LAYERNORMS, AbsLayerNorm, _stats, layer_norm_params  # noqa: F401

EMBEDDINGS = (nn.Embedding, F.embedding)
MASKS = (attention_mask, "masked_fill", torch.masked_fill)


# --------------------------------------------------------------------------------------------
# scalings by a positive constant


def _normalize_norm(ctx: NodeContext) -> Tensor:
    x = ctx.inputs[0]
    a = list(ctx.args) + [None] * 4
    p = ctx.kwargs.get("p", a[1] if a[1] is not None else 2.0)
    dim = ctx.kwargs.get("dim", a[2] if a[2] is not None else 1)
    eps = ctx.kwargs.get("eps", a[3] if a[3] is not None else 1e-12)
    return x.norm(p=p, dim=dim, keepdim=True).clamp(min=eps)


class AbsNormalize(AbsLRP):
    """``F.normalize(x)`` with the norm a constant: ``r = 2 x+ / |x| * S``."""

    kind = "abslrp.normalize"

    def contributions(self, ctx, s):
        x = ctx.inputs[0]
        out: List[Optional[Tensor]] = [None] * len(ctx.inputs)
        out[0] = (x + x.abs()) / _normalize_norm(ctx) * s
        return out


class AbsMaskedMean(AbsLRP):
    """``masked_mean(x, mask)``: an average with constant per-sample weights ``m_t / sum m``:
    ``r = 2 x+ w * S``; the mask takes nothing."""

    kind = "abslrp.masked-mean"

    def contributions(self, ctx, s):
        x, m = ctx.inputs[0], ctx.inputs[1]
        w = _mean_weights(x, m)
        return [(x + x.abs()) * w * s.unsqueeze(-2), None]


def _mean_weights(x: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(x.dtype)
    return (m / m.sum(dim=-1, keepdim=True).clamp(min=1.0)).unsqueeze(-1)


# --------------------------------------------------------------------------------------------
# routing rules shared by every preset


class ToFirst(Rule):
    """All relevance to the first slot, unchanged (masks, query scale under classic rules, LayerNorm
    and softmax under the identity rule): other slots (mask, weights) are constants."""

    saves = frozenset()
    exact = True

    def __init__(self, label: str = "to-first"):
        self.label = label

    @property
    def name(self) -> str:
        return self.label

    def __call__(self, ctx, relevance):
        out: List[Optional[Tensor]] = [None] * len(ctx.input_shapes)
        out[0] = relevance
        return out


class EmbeddingSum(Rule):
    """Embedding lookup: relevance per token id = the sum over the embedding dim.

    The ids slot receives ``(K, *ids.shape)``. The positive and negative parts are summed
    separately (a :class:`Split`) so that the report sees both masses conserved; they are added
    (and may cancel) at the ids. The weight table takes nothing.
    """

    saves = frozenset()
    exact = True

    @property
    def name(self) -> str:
        return "embedding-sum"

    def __call__(self, ctx, relevance):
        out: List[Optional[object]] = [None] * len(ctx.input_shapes)
        out[0] = Split(relevance.clamp(min=0).sum(-1), relevance.clamp(max=0).sum(-1))
        return out


# --------------------------------------------------------------------------------------------
# classic rules


class ProductEpsilon(EpsilonRule):
    """Classic product of two activations: the epsilon z-rule, split 50/50 between the operands
    (LXT's uniform rule for ``matmul``); one activation times a constant: the plain z-rule."""

    op_name = "product-epsilon"

    def __call__(self, ctx, relevance):
        p = _product(ctx)
        eq, a, b, want_a, want_b = p.eq, p.a, p.b, p.want_a, p.want_b
        share = 0.5 if (want_a and want_b) else 1.0
        s = relevance / stabilise(ctx.output, self.epsilon or GUARD) * share
        if eq is not None:
            (sa, sb), so, k = _parse_einsum(eq, (a, b))
            ra = torch.einsum(f"{k}{so},{sa},{sb}->{k}{sa}", s, a, b) if want_a else None
            rb = torch.einsum(f"{k}{so},{sa},{sb}->{k}{sb}", s, a, b) if want_b else None
        elif ctx.target in MATMULS:
            a2, b2, s2, sq_a, sq_b = _promote(a, b, s)
            ra = a2 * (s2 @ b2.transpose(-1, -2)) if want_a else None
            rb = b2 * (a2.transpose(-1, -2) @ s2) if want_b else None
            if ra is not None and sq_a:
                ra = ra.squeeze(-2)
            if rb is not None and sq_b:
                rb = rb.squeeze(-1)
        else:
            if ctx.target in (operator.truediv, torch.div, "div", torch.true_divide) and want_b:
                raise NotImplementedError(f"{ctx.describe()} divides by an activation; no rule for that")
            z = (a * b) if isinstance(a, Tensor) and isinstance(b, Tensor) else ctx.output
            ra = z * s if want_a else None
            rb = z * s if want_b else None
        return p.place(ctx, ra, rb)


class ClassicMul(Rule):
    """Classic ``a * b``: identity to the activation for a constant factor, else :class:`ProductEpsilon`."""

    def __init__(self, epsilon: float = 1e-6):
        self._product = ProductEpsilon(epsilon)

    @property
    def name(self) -> str:
        return "mul"

    def __call__(self, ctx, relevance):
        acts = _activations(ctx)
        if len(acts) >= 2:
            return self._product(ctx, relevance)
        out: List[Optional[Tensor]] = [None] * len(ctx.inputs)
        if acts:
            out[acts[0]] = relevance
        return out


class MaskedMeanEpsilon(EpsilonRule):
    """Classic ``masked_mean``: the epsilon z-rule with the constant weights ``m_t / sum m``."""

    op_name = "masked-mean-epsilon"

    def __call__(self, ctx, relevance):
        x, m = ctx.inputs[0], ctx.inputs[1]
        s = relevance / stabilise(ctx.output, self.epsilon or GUARD)
        return [x * _mean_weights(x, m) * s.unsqueeze(-2), None]


# --------------------------------------------------------------------------------------------
# tables


def abslrp_transformer_table(variant: str) -> dict:
    """The transformer entries of preset ``abslrp`` (``"paper"``) or ``abslrp-renorm`` (``"head"``)."""
    t: dict = {}
    product = AbsProduct(variant)
    for k in MATMULS + EINSUMS:
        t[k] = product
    mul = AbsMul(variant)
    for k in SCALES:
        t[k] = mul
    sm = AbsSoftmax(variant)
    for k in SOFTMAXES:
        t[k] = sm
    ln = AbsLayerNorm(variant)
    for k in LAYERNORMS:
        t[k] = ln
    t[F.normalize] = AbsNormalize(variant)
    t[masked_mean] = AbsMaskedMean(variant)
    return t


def _library_masks() -> tuple:
    """Mask helpers of libraries that are already imported (never imported here): timm's unfused
    attention adds its mask with ``timm.layers.attention.maybe_add_mask``."""
    out = []
    timm_attn = sys.modules.get("timm.layers.attention")
    if timm_attn is not None and hasattr(timm_attn, "maybe_add_mask"):
        out.append(timm_attn.maybe_add_mask)
    return tuple(out)


def shared_table() -> dict:
    """Entries every preset shares: masks, embeddings."""
    t: dict = {}
    mask = ToFirst("mask (constant)")
    for k in MASKS + _library_masks():
        t[k] = mask
    t[scale_query] = ToFirst("attention scale")
    emb = EmbeddingSum()
    for k in EMBEDDINGS:
        t[k] = emb
    return t


def classic_transformer_table(epsilon: float = 1e-6) -> dict:
    """Transformer entries of the classic presets (LXT / CP-LRP style)."""
    t = shared_table()
    product = ProductEpsilon(epsilon)
    for k in MATMULS + EINSUMS:
        t[k] = product
    mul = ClassicMul(epsilon)
    for k in SCALES:
        t[k] = mul
    ident = ToFirst("identity")
    for k in SOFTMAXES + LAYERNORMS + (F.normalize,):
        t[k] = ident
    t[masked_mean] = MaskedMeanEpsilon(epsilon)
    return t


def _abs_table(variant: str):
    return lambda: {**shared_table(), **abslrp_transformer_table(variant)}


extend_preset("*", classic_transformer_table)
extend_preset("abslrp", _abs_table("paper"))
extend_preset("abslrp-renorm", _abs_table("head"))

