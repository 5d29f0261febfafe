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
"""
from __future__ import annotations

import operator
from typing import List, Optional, Set

import torch
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
    for j in acts:
        if any(i != j and slots[i] is not slots[j] and is_statistic_of(slots[j], slots[i], plan.live)
               for i in acts):
            out.append(j)
    return out if len(out) < len(acts) else []


def activation_slots(ctx: NodeContext, kinds: Optional[type] = None) -> List[int]:
    """Slots holding input-dependent values that take relevance: neither constants (weights,
    buffers) nor statistics of another operand (see the module doc)."""
    stats = statistic_slots(ctx)
    return [i for i, (v, c) in enumerate(zip(ctx.inputs, ctx.is_parameter))
            if not c and i not in stats and (kinds is None or isinstance(v, kinds))]
