"""Element-wise activations beyond those of :mod:`lrpgraph.rules.abslrp`: ReLU6, Hardtanh,
Hardsigmoid, Hardswish, Mish, negation, powers with a constant exponent (``x ** p``, ``x.pow(p)``,
``torch.square``; StarReLU's ``relu(x) ** 2``), clamps with constant bounds (numbers, or buffers
such as the clip bounds of timm's ``Gemma4ClippableLinear``; ``f'`` is 1 strictly between them).

Each is an :class:`~lrpgraph.rules.abslrp.AbsElementwise` with its explicit derivative, so absLRP
applies the absolute twin of the method to it (``paper``: ``|f(x)|``, ``head``: ``f(|x|)``); the
classic presets pass relevance through unchanged, as for every other activation.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrpgraph.presets import extend_preset

from lrpgraph.rule import EPS

from .abslrp import AbsElementwise, AbsLRP, d_sigmoid
from .structural import PassThrough


def _box(x: Tensor, lo: float, hi: float) -> Tensor:
    """1 where ``lo < x < hi``, else 0 (the derivative of a clamp), in x's dtype."""
    return ((x > lo) & (x < hi)).to(x.dtype)


def relu6(x: Tensor) -> Tensor:
    return F.relu6(x)


def d_relu6(x: Tensor) -> Tensor:
    return _box(x, 0.0, 6.0)


def hardtanh(x: Tensor) -> Tensor:
    return F.hardtanh(x)


def d_hardtanh(x: Tensor) -> Tensor:
    return _box(x, -1.0, 1.0)


def hardsigmoid(x: Tensor) -> Tensor:
    return F.hardsigmoid(x)


def d_hardsigmoid(x: Tensor) -> Tensor:
    return _box(x, -3.0, 3.0) / 6


def hardswish(x: Tensor) -> Tensor:
    return F.hardswish(x)


def d_hardswish(x: Tensor) -> Tensor:
    # x relu6(x + 3) / 6: (2x + 3) / 6 inside (-3, 3), 1 above, 0 below
    return _box(x, -3.0, 3.0) * (2 * x + 3) / 6 + (x >= 3).to(x.dtype)


def mish(x: Tensor) -> Tensor:
    return F.mish(x)


def d_mish(x: Tensor) -> Tensor:
    t = torch.tanh(F.softplus(x))
    return t + x * torch.sigmoid(x) * (1 - t * t)


def neg(x: Tensor) -> Tensor:
    return -x


def d_neg(x: Tensor) -> Tensor:
    return torch.full_like(x, -1.0)


def pow_exponent(ctx) -> float:
    """The constant exponent ``p`` of a ``x ** p`` node; a power with an activation as its exponent
    (``2 ** x``, ``x ** y``) is refused by name."""
    if ctx.target in (torch.square, "square"):
        return 2.0
    a, kw = list(ctx.args) + [None], ctx.kwargs
    base, p = kw.get("input", kw.get("self", a[0])), kw.get("exponent", a[1])
    if isinstance(base, (int, float)) or not isinstance(p, (int, float)):  # (an unsaved tensor is None)
        raise NotImplementedError(f"{ctx.describe()}: a power with a tensor exponent has no rule; "
                                  "only x ** p with a constant number p is element-wise")
    return float(p)


def power(p: float):
    """(f, f') of ``x ** p``; ``f'(0) = 0`` where ``p < 1`` would give an infinite slope (its
    ``x f'(x)`` term, which is what the rules use, is 0 there)."""
    def f(x: Tensor) -> Tensor:
        return x ** p

    def df(x: Tensor) -> Tensor:
        if p == 1:
            return torch.ones_like(x)
        return torch.where(x != 0, p * x ** (p - 1), torch.zeros_like(x))
    return f, df


class AbsElementwiseMagnitude(AbsElementwise):
    """An activation whose ``x f'(x)`` is negative somewhere while ``f(x) > 0`` (sigmoid and
    hardsigmoid for ``x < 0``, the gates of squeeze-excitation blocks).

    There the paper twin's contribution ``x f'(x) (1 + sign f(x)) S`` would turn part of a positive
    stream negative, so its mass could not be conserved per sign. ``paper`` keeps the stream's sign
    and distributes it by the magnitude ``|x f'(x)| (1 + sign f(x))``: the same decision as for
    softmax and LayerNorm. ``head`` is unchanged (its twin ``f(|x|)`` is renormalised anyway).
    """

    def gains(self, ctx):
        x = ctx.inputs[0]
        if self.variant != "paper" or tuple(ctx.output_shape) != tuple(x.shape):
            return super().gains(ctx)
        y = ctx.output
        out = [None] * len(ctx.inputs)
        out[0] = (x * self.df(x)).abs_().mul_(torch.sign(y).add_(1)).div_(y.abs().add_(EPS))
        return out


#: activations that take the magnitude form in ``abslrp`` (see AbsElementwiseMagnitude)
GATES = {
    "sigmoid": (torch.sigmoid, d_sigmoid, (nn.Sigmoid, torch.sigmoid, F.sigmoid, "sigmoid")),
    "hardsigmoid": (hardsigmoid, d_hardsigmoid, (nn.Hardsigmoid, F.hardsigmoid)),
}

#: label -> (f, f', keys) (nn.Hardtanh takes bounds, so only F.hardtanh with its defaults is here)
ACTIVATIONS = {
    "relu6": (relu6, d_relu6, (nn.ReLU6, F.relu6)),
    "hardtanh": (hardtanh, d_hardtanh, (F.hardtanh,)),
    "hardswish": (hardswish, d_hardswish, (nn.Hardswish, F.hardswish)),
    "mish": (mish, d_mish, (nn.Mish, F.mish)),
    "neg": (neg, d_neg, (operator.neg, torch.neg, "neg")),
}


class AbsPow(AbsLRP):
    """absLRP for ``x ** p`` with a constant ``p``: the element-wise rule of ``f(x) = x ** p`` in the
    magnitude form (``x f'(x) = p x^p`` is negative where ``p < 0``; for ``p > 0`` on the
    non-negative input of StarReLU it is the plain element-wise rule)."""

    kind = "abslrp.pow"

    def __call__(self, ctx, relevance):
        f, df = power(pow_exponent(ctx))
        return AbsElementwiseMagnitude(f, df, self.variant, label="pow")(ctx, relevance)


class PowPassThrough(PassThrough):
    """Classic presets: ``x ** p`` passes relevance through, as every element-wise activation."""

    def route(self, ctx, r):
        pow_exponent(ctx)  # a tensor exponent is refused by name
        return super().route(ctx, r)


POWS = (operator.pow, torch.pow, "pow", torch.square, "square")


def clamp_function(ctx):
    """(f, f') of a clamp node with its bounds bound; a bound that is an activation (``clamp(x, y)``,
    a product-like op of two inputs) is refused by name."""
    if any(not c for c in ctx.is_parameter[1:]):
        raise NotImplementedError(f"{ctx.describe()}: a clamp whose bound is an activation has no rule; "
                                  "only bounds that are numbers, parameters or buffers make it element-wise")
    a, kw = list(ctx.args) + [None, None], ctx.kwargs
    if ctx.target in (torch.clamp_max, "clamp_max"):
        lo, hi = None, kw.get("max", a[1])
    else:
        lo, hi = kw.get("min", a[1]), (None if ctx.target in (torch.clamp_min, "clamp_min") else kw.get("max", a[2]))

    def f(x: Tensor) -> Tensor:
        y = x if lo is None else torch.maximum(x, torch.as_tensor(lo, dtype=x.dtype, device=x.device))
        return y if hi is None else torch.minimum(y, torch.as_tensor(hi, dtype=x.dtype, device=x.device))

    def df(x: Tensor) -> Tensor:
        inside = torch.ones_like(x, dtype=torch.bool)
        inside = inside if lo is None else inside & (x > torch.as_tensor(lo, dtype=x.dtype, device=x.device))
        inside = inside if hi is None else inside & (x < torch.as_tensor(hi, dtype=x.dtype, device=x.device))
        return inside.to(x.dtype)
    return f, df


class AbsClamp(AbsLRP):
    """absLRP for a clamp with constant bounds: the element-wise rule of ``f(x) = clamp(x, lo, hi)``
    (as for ReLU6 and Hardtanh); the bounds take no relevance. Its residual-term VJP is ``g f'(x)``."""

    kind = "abslrp.clamp"

    def __call__(self, ctx, relevance):
        f, df = clamp_function(ctx)
        return AbsElementwise(f, df, self.variant, label="clamp")(ctx, relevance)

    def vjp(self, ctx, g: Tensor) -> list:
        out = [None] * len(ctx.inputs)
        out[0] = g * clamp_function(ctx)[1](ctx.inputs[0])
        return out


class ClampPassThrough(PassThrough):
    """Classic presets: a clamp passes relevance through, as every element-wise activation."""

    def route(self, ctx, r):
        clamp_function(ctx)  # an activation as bound is refused by name
        return super().route(ctx, r)


CLAMPS = (torch.clamp, "clamp", torch.clip, "clip", torch.clamp_min, "clamp_min", torch.clamp_max, "clamp_max")


def _abs_table(variant: str):
    def table() -> dict:
        t = {}
        for label, (f, df, keys) in ACTIVATIONS.items():
            rule = AbsElementwise(f, df, variant, label=label)
            t.update({k: rule for k in keys})
        for label, (f, df, keys) in GATES.items():
            rule = AbsElementwiseMagnitude(f, df, variant, label=label)
            t.update({k: rule for k in keys})
        t.update({k: AbsPow(variant) for k in POWS})
        t.update({k: AbsClamp(variant) for k in CLAMPS})
        return t
    return table


def _classic_table() -> dict:
    passthrough, power_rule, clamp_rule = PassThrough(), PowPassThrough(), ClampPassThrough()
    return {**{k: passthrough for _, _, keys in list(ACTIVATIONS.values()) + list(GATES.values()) for k in keys},
            **{k: power_rule for k in POWS}, **{k: clamp_rule for k in CLAMPS}}


extend_preset("*", _classic_table)
extend_preset("abslrp", _abs_table("paper"))
extend_preset("abslrp-renorm", _abs_table("head"))
