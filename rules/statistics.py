"""Normalising statistics inside a graph: which operand of a product or a division is a statistic
of the other, so that the rules treat it as a constant gate.

A normalisation written out as graph nodes multiplies or divides an activation ``x`` by a
*statistic* of that same ``x``: ``x * rsqrt(mean(x ** 2) + eps)`` (RMS norm, timm's
``RmsNorm2d``), ``a / a.sum(-1, keepdim=True)`` (convit's attention renormalisation),
``x / x.norm(dim=-1, keepdim=True)``. LRP treats the statistic as a constant, as it does the mean
and variance of LayerNorm and the denominator of softmax: the op is then a scaling of ``x`` by a
constant, relevance flows through ``x`` only, and the nodes that compute the statistic receive
none (so they need no rule).

An operand ``s`` of a node counts as a statistic of another operand ``x`` when the nodes that
compute ``s`` from ``x`` are only parameter-free element-wise maths (powers, roots, reciprocals,
absolute values, clamps, arithmetic with constants), reductions over feature dims (sum, mean,
norm, max, var, std) and shape ops, with at least one reduction among them, and every
input-dependent value on the way comes from ``x``. A learned gate, such as the squeeze-excitation
branch ``sigmoid(fc(mean(x)))``, has a weighted layer on the way and stays a product of two
activations (the product rule).

A divisor also counts as a statistic when it is the *normaliser computed in the same product* as
the numerator (linear attention, e.g. timm's EfficientViT ``LiteMLA``: ``v`` is padded with a
column of ones, ``out = q @ (k^T @ pad(v))``, then ``out[..., :-1] / (out[..., -1:] + eps)``). The
columns that a constant pad ``c != 0`` adds to the last dim of the right-most factor of a chain of
matrix products hold ``c * rowsum(M)`` in the product, where ``M`` is the product of the other
factors, while the other columns hold ``M @ v``: so numerator / denominator is a weighted mean of
the rows of ``v`` with weights ``M_ij / sum_j M_ij``, and its denominator is a sum of the mixing
weights, held constant as softmax's denominator is. It is recognised when the numerator and the
denominator are slices of the last dim of one product (through casts; the denominator also through
the addition of a constant ``eps``), the denominator's columns all padded ones and the numerator's
none of them.
"""
from __future__ import annotations

import operator
from typing import List, Optional, Set

import torch
import torch.nn.functional as F
from torch import fx

from lrpgraph.rule import NodeContext

REDUCTIONS = {torch.sum, "sum", torch.mean, "mean", torch.norm, "norm", torch.linalg.vector_norm,
              torch.amax, "amax", torch.var, "var", torch.std, "std", torch.logsumexp, "logsumexp"}
ELEMENTWISE = {operator.pow, torch.pow, "pow", torch.rsqrt, "rsqrt", torch.sqrt, "sqrt", torch.reciprocal,
               "reciprocal", torch.abs, "abs", operator.abs, torch.square, "square", torch.clamp, "clamp",
               "clamp_min", torch.clamp_min, operator.add, torch.add, "add", operator.sub, torch.sub, "sub",
               operator.mul, torch.mul, "mul", operator.truediv, torch.div, "div", torch.exp, "exp",
               torch.log, "log", operator.neg, torch.neg, "neg"}
SHAPES = {torch.unsqueeze, "unsqueeze", torch.squeeze, "squeeze", "view", "reshape", torch.reshape, "expand",
          "expand_as", "contiguous", "clone", "to", "type_as", "float", "double", "detach", torch.flatten, "flatten"}
#: element-wise ops of several operands: every other operand must be a constant (not input-dependent)
_ARITHMETIC = {operator.add, torch.add, "add", operator.sub, torch.sub, "sub", operator.mul, torch.mul, "mul",
               operator.truediv, torch.div, "div", operator.pow, torch.pow, "pow"}


def _key(n: fx.Node):
    return n.target if n.op in ("call_function", "call_method") else None


def is_statistic_of(stat: fx.Node, x: fx.Node, live: Set[fx.Node]) -> bool:
    """Whether ``stat`` is computed from ``x`` alone by the statistic ops of the module doc, with
    at least one reduction on the way."""
    reduced, reached = False, False
    todo, seen = [stat], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n is x:
            reached = True
            continue
        if n.op == "get_attr" or n not in live:
            continue  # a constant (eps, a parameter, a size)
        key = _key(n)
        try:
            if key in REDUCTIONS:
                reduced = True
            elif key not in ELEMENTWISE and key not in SHAPES:
                return False
        except TypeError:  # an unhashable target
            return False
        if key in _ARITHMETIC and sum(1 for i in n.all_input_nodes if i in live or i is x) > 1:
            return False  # two input-dependent operands: not a function of x alone
        todo.extend(n.all_input_nodes)
    return reduced and reached


#: casts and copies that keep every value in place; matrix products; divisions
_KEEPS = {"to", "float", "double", "half", "bfloat16", "type_as", "contiguous", "clone", "detach"}
_MATMULS = {torch.matmul, operator.matmul, "matmul", torch.bmm, "bmm"}
_DIVS = {operator.truediv, torch.div, "div", torch.true_divide}
_ADDS = {operator.add, torch.add, "add"}


def _hashable_in(key, keys) -> bool:
    try:
        return key in keys
    except TypeError:  # an unhashable target
        return False


def _up(n: fx.Node, live: Set[fx.Node], add_constant: bool) -> fx.Node:
    """``n`` past casts (and, with ``add_constant``, additions of a constant): the node they copy."""
    while True:
        key = _key(n)
        ins = [i for i in n.all_input_nodes if i in live]
        if len(ins) != 1 or n.args[0] is not ins[0] and not _hashable_in(key, _ADDS):
            return n
        if not (_hashable_in(key, _KEEPS) or (add_constant and _hashable_in(key, _ADDS))):
            return n
        n = ins[0]


def _last_dim_columns(n: fx.Node, shapes: dict):
    """``(source, columns)`` if ``n`` is ``source[..., s]`` with a slice ``s`` of the last dim only."""
    if _key(n) is not operator.getitem or not isinstance(n.args[0], fx.Node) or not isinstance(n.args[1], tuple):
        return None
    src, key = n.args
    shp = shapes.get(src)
    if not key or not isinstance(shp, torch.Size) or not isinstance(key[-1], slice):
        return None
    rest = key[1:-1] if key[0] is Ellipsis else key[:-1]
    if (key[0] is not Ellipsis and len(key) != len(shp)) or any(k != slice(None) for k in rest):
        return None
    return src, set(range(shp[-1])[key[-1]])


def _constant_columns(n: fx.Node, shapes: dict) -> Set[int]:
    """Columns of ``n``'s last dim that a constant pad ``c != 0`` of the right-most factor of a chain
    of matrix products (through casts) adds: they hold ``c * rowsum`` of the other factors."""
    while True:
        key = _key(n)
        if _hashable_in(key, _KEEPS) and isinstance(n.args[0], fx.Node):
            n = n.args[0]
        elif _hashable_in(key, _MATMULS) and len(n.args) == 2 and isinstance(n.args[1], fx.Node):
            n = n.args[1]
        else:
            break
    if key is not F.pad:
        return set()
    a, kw = list(n.args) + [None] * 3, n.kwargs
    pad, mode, value = kw.get("pad", a[1]), kw.get("mode", a[2] or "constant"), kw.get("value", a[3])
    shp = shapes.get(n)
    if mode != "constant" or not value or len(pad) != 2 or min(pad) < 0 or not isinstance(shp, torch.Size):
        return set()
    size = shp[-1]
    return set(range(pad[0])) | set(range(size - pad[1], size))


def is_product_normaliser(den: fx.Node, num: fx.Node, live: Set[fx.Node], shapes: dict) -> bool:
    """Whether ``den`` is the normaliser of ``num`` computed in the same product (see the module doc)."""
    d = _last_dim_columns(_up(den, live, True), shapes)
    n = _last_dim_columns(_up(num, live, False), shapes)
    if d is None or n is None or d[0] is not n[0] or not d[1]:
        return False
    ones = _constant_columns(d[0], shapes)
    return d[1] <= ones and not (n[1] & ones)


def statistic_slots(ctx: NodeContext) -> List[int]:
    """Slots of ``ctx``'s node that hold a statistic of another of its activation slots (empty
    when the context carries no graph, e.g. one built by hand)."""
    node, plan = ctx.node, ctx.plan
    if node is None or plan is None or not ctx.inputs:
        return []
    slots = plan.slots.get(node)
    if not slots:
        return []
    acts = [i for i, c in enumerate(ctx.is_parameter) if not c]
    if len(acts) < 2:
        return []
    out = []
    shapes = getattr(ctx.rec, "shapes", None) or {}
    divisor = node.args[1] if _hashable_in(_key(node), _DIVS) and len(node.args) == 2 else None
    for j in acts:
        if any(i != j and slots[i] is not slots[j] and (is_statistic_of(slots[j], slots[i], plan.live) or (
               slots[j] is divisor and is_product_normaliser(slots[j], slots[i], plan.live, shapes)))
               for i in acts):
            out.append(j)
    return out if len(out) < len(acts) else []


def activation_slots(ctx: NodeContext, kinds: Optional[type] = None) -> List[int]:
    """Slots holding input-dependent values that take relevance: neither constants (weights,
    buffers) nor statistics of another operand (see the module doc)."""
    stats = statistic_slots(ctx)
    return [i for i, (v, c) in enumerate(zip(ctx.inputs, ctx.is_parameter))
            if not c and i not in stats and (kinds is None or isinstance(v, kinds))]
