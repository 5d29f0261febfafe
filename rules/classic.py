"""Classic LRP rules, the baselines users compare absLRP with (Zennit's vocabulary).

For an affine op with inputs x, weights W, bias b and outputs z_j = sum_i x_i w_ij + b_j, with
``s = R / stabilise(z')``:

* ``Epsilon(eps)``:  R_i = x_i (W^T s)_i, z' = z (``eps=0`` is LRP-0; a 1e-12 guard avoids 0/0).
* ``Gamma(g)``:      W' = W + g W+, b' = b + g b+;  R_i = x_i (W'^T s)_i with z' = x W' + b'.
* ``AlphaBeta(a, b)``: positive contributions z+_ij = x+ W+ + x- W- (bias b+), negative
  z-_ij = x+ W- + x- W+ (bias b-); R = a * sum_j z+_ij R_j/z+_j - b * sum_j z-_ij R_j/z-_j.
  ``ZPlus`` is alpha=1, beta=0.
* ``Flat``:          every weight 1 and every input 1: R_i = sum_j R_j / n_j (n_j = fan-in of j).
* ``WSquare``:       R_i = sum_j w_ij^2 / sum_i' w_i'j^2 R_j.
* ``ZBox(low, high)``: z_ij = x_i w_ij - l_i w+_ij - h_i w-_ij (biases ignored), for the input layer
  with inputs bounded by [low, high] (numbers, per-channel tensors, or per-sample min/max when
  ``None``).

Element-wise activations pass relevance through unchanged; max pooling routes it to the winner;
additions use the epsilon z-rule over their summands. Each rule is the literal formula written
with the explicit transposed products of :mod:`lrpgraph.rules.affine`.
"""
from __future__ import annotations

from typing import List, Optional, Union

import torch
from torch import Tensor

from lrpgraph.rule import NodeContext, Rule, stabilise

from .abslrp import maxpool_config, scatter_max
from .affine import Affine, affine_of

GUARD = 1e-12



class EpsilonRule(Rule):
    """Base of the classic epsilon rules of ops beyond the affine ones (products, subtraction,
    norms, ...): the stabiliser and the report name ``<op_name>(<epsilon>)``."""

    op_name = "epsilon"

    def __init__(self, epsilon: float = 1e-6):
        self.epsilon = float(epsilon)

    @property
    def name(self) -> str:
        return f"{self.op_name}({self.epsilon:g})"

class ClassicRule(Rule):
    """Base of the classic rules for affine ops."""

    def __repr__(self) -> str:
        return self.name

    def sign_split_op(self, ctx: NodeContext) -> Affine:
        """:func:`affine_of` for a rule that splits or replaces the weight (``W+``, ``W-``, ones,
        squares). A weight-free op with signed implicit matrices (bicubic resampling) is refused:
        the sign parts of a Kronecker product are not the products of the parts, and the
        pooling forms below assume ``W >= 0``."""
        op = affine_of(ctx)
        if op.weight is None and op.signed:
            raise NotImplementedError(
                f"{ctx.describe()}: rule {self.name} needs the positive and negative parts of this op's "
                "weights, and its resampling matrices are signed (bicubic) and separable, which those "
                "parts are not; assign Epsilon (or an absLRP rule) to this node with a Composite override")
        return op


class Epsilon(ClassicRule):
    """LRP-epsilon (``epsilon=0``: LRP-0)."""

    def __init__(self, epsilon: float = 1e-6):
        self.epsilon = float(epsilon)

    @property
    def name(self) -> str:
        return "lrp-0" if self.epsilon == 0 else f"epsilon({self.epsilon:g})"

    def __call__(self, ctx, relevance):
        op = affine_of(ctx)
        x = ctx.inputs[op.slot]
        z = ctx.output
        s = relevance / stabilise(z, self.epsilon or GUARD)
        return op.place(x * op.transpose(s, op.weight))


class Gamma(ClassicRule):
    """LRP-gamma: favour positive weights by ``gamma``."""

    def __init__(self, gamma: float = 0.25, stabilizer: float = 1e-6):
        self.gamma, self.stabilizer = float(gamma), float(stabilizer)

    @property
    def name(self) -> str:
        return f"gamma({self.gamma:g})"

    def __call__(self, ctx, relevance):
        op = self.sign_split_op(ctx)
        x = ctx.inputs[op.slot]
        w = op.weight
        if w is None:
            # pooling matrices (adaptive pools, means): every weight is >= 0, so W' = (1 + gamma) W.
            # (Delegating to Epsilon kept z' = z, i.e. a stabiliser (1 + gamma) times too large.)
            z = (1 + self.gamma) * op.forward(x, None, None)
            s = relevance / stabilise(z, self.stabilizer)
            return op.place(x * ((1 + self.gamma) * op.transpose(s, None)))
        w2 = w + self.gamma * w.clamp(min=0)
        b2 = None if op.bias is None else op.bias + self.gamma * op.bias.clamp(min=0)
        z = op.forward(x, w2, b2)
        s = relevance / stabilise(z, self.stabilizer)
        return op.place(x * op.transpose(s, w2))


class AlphaBeta(ClassicRule):
    """LRP-alpha-beta with ``alpha - beta = 1``."""

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6):
        if abs(alpha - beta - 1.0) > 1e-9:
            raise ValueError(f"alpha - beta must be 1 for a conserving rule, got alpha={alpha}, beta={beta}")
        self.alpha, self.beta, self.stabilizer = float(alpha), float(beta), float(stabilizer)

    @property
    def name(self) -> str:
        return "z-plus" if self.beta == 0 else f"alpha{self.alpha:g}beta{self.beta:g}"

    def __call__(self, ctx, relevance):
        op = self.sign_split_op(ctx)
        x = ctx.inputs[op.slot]
        w = op.weight
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        if w is None:  # pooling: all weights positive
            wp, wn = None, None
        else:
            wp, wn = w.clamp(min=0), w.clamp(max=0)
        b = op.bias
        bp = None if b is None else b.clamp(min=0)
        bn = None if b is None else b.clamp(max=0)

        def part(xa, wa, xb, wb, bias):
            z = op.forward(xa, wa, bias) + (0 if wb is None else op.forward(xb, wb, None))
            s = relevance / stabilise(z, self.stabilizer)
            r = xa * op.transpose(s, wa)
            if wb is not None:
                r = r + xb * op.transpose(s, wb)
            return r

        if w is None:
            r_pos = part(xp, None, xn, None, None)
            r = self.alpha * r_pos
            if self.beta:
                r = r - self.beta * part(xn, None, xp, None, None)
            return op.place(r)
        r = self.alpha * part(xp, wp, xn, wn, bp)
        if self.beta:
            r = r - self.beta * part(xp, wn, xn, wp, bn)
        return op.place(r)


class ZPlus(AlphaBeta):
    """LRP-z+ (alpha=1, beta=0): only positive contributions carry relevance."""

    def __init__(self, stabilizer: float = 1e-6):
        super().__init__(1.0, 0.0, stabilizer)


class Flat(ClassicRule):
    """Flat rule: relevance spread uniformly over each output's receptive field."""

    saves = frozenset({"inputs"})

    @property
    def name(self) -> str:
        return "flat"

    def __call__(self, ctx, relevance):
        op = self.sign_split_op(ctx)
        x = ctx.inputs[op.slot]
        ones_w = None if op.weight is None else torch.ones_like(op.weight)
        z = op.forward(torch.ones_like(x), ones_w, None)
        return op.place(op.transpose(relevance / stabilise(z, GUARD), ones_w).expand((relevance.shape[0],) + tuple(x.shape)))


class WSquare(ClassicRule):
    """w-square rule: relevance by squared weights, independent of the input."""

    saves = frozenset({"inputs"})

    @property
    def name(self) -> str:
        return "w-square"

    def __call__(self, ctx, relevance):
        op = self.sign_split_op(ctx)
        x = ctx.inputs[op.slot]
        w2 = None if op.weight is None else op.weight ** 2
        z = op.forward(torch.ones_like(x), w2, None)
        return op.place(op.transpose(relevance / stabilise(z, GUARD), w2).expand((relevance.shape[0],) + tuple(x.shape)))


class ZBox(ClassicRule):
    """z-box (z^B) rule for inputs bounded by ``[low, high]``."""

    saves = frozenset({"inputs"})

    def __init__(self, low: Union[float, Tensor, None] = None, high: Union[float, Tensor, None] = None,
                 stabilizer: float = 1e-6):
        self.low, self.high, self.stabilizer = low, high, float(stabilizer)

    @property
    def name(self) -> str:
        return "z-box"

    @staticmethod
    def _bound(v, x: Tensor, reduce) -> Tensor:
        if v is None:  # per-sample bounds of the input itself
            return reduce(x, dim=tuple(range(1, x.dim())), keepdim=True).expand_as(x)
        t = torch.as_tensor(v, dtype=x.dtype, device=x.device)
        if t.dim() == 1 and x.dim() > 2:  # per channel
            t = t.reshape((1, -1) + (1,) * (x.dim() - 2))
        return t.expand_as(x)

    def __call__(self, ctx, relevance):
        op = self.sign_split_op(ctx)
        x = ctx.inputs[op.slot]
        low = self._bound(ctx.options.get("low", self.low), x, torch.amin)
        high = self._bound(ctx.options.get("high", self.high), x, torch.amax)
        w = op.weight
        wp, wn = w.clamp(min=0), w.clamp(max=0)
        z = op.forward(x, w, None) - op.forward(low, wp, None) - op.forward(high, wn, None)
        s = relevance / stabilise(z, self.stabilizer)
        r = x * op.transpose(s, w) - low * op.transpose(s, wp) - high * op.transpose(s, wn)
        return op.place(r)


class AddEpsilon(Rule):
    """Additions under the classic rules: ``R_a = a R / (a + b)`` (epsilon-stabilised z-rule)."""

    def __init__(self, epsilon: float = 0.0):
        self.epsilon = float(epsilon)

    @property
    def name(self) -> str:
        return f"add-epsilon({self.epsilon:g})" if self.epsilon else "add-z"

    def __call__(self, ctx, relevance):
        s = relevance / stabilise(ctx.output, self.epsilon or GUARD)
        return [v * s if isinstance(v, Tensor) else None for v in ctx.inputs]


class WinnerTakesAll(Rule):
    """Max pooling under the classic rules: each window's relevance goes to its maximum."""

    saves = frozenset({"inputs"})

    @property
    def name(self) -> str:
        return "winner-takes-all"

    def __call__(self, ctx, relevance):
        out: List[Optional[Tensor]] = [None] * len(ctx.inputs)
        out[0] = scatter_max(ctx.inputs[0], relevance, maxpool_config(ctx))
        return out
