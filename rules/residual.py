"""abslrp-renorm's residual rule: the shortcut's transposed-Jacobian term (the current code).

The authors' current code explains ``y = a + b`` by differentiating ``y + y_abs`` (``y_abs = |a| + |b|``)
with respect to both summands. Where the shortcut ``b`` is an ancestor of the branch ``a`` (a ResNet
block without downsample, every ViT block), the derivative with respect to ``b`` runs through the
branch as well, so with ``S = R / (|y| + 1e-9)``::

    R_a = a * (1 + sign a) * S
    R_b = b * [(1 + sign b) * S + J^T ((1 + sign a) * S)]

each then renormalised to unit mass. ``J`` is the Jacobian of ``a`` with respect to ``b`` through the
branch as the model computes it, with LayerNorm statistics and the softmax maximum and denominator
held constant (the current code detaches them). :func:`branch_vjp` computes ``J^T u`` as explicit
tensor maths: it walks the branch's nodes in reverse with one transposed-Jacobian (VJP) formula per
op kind, chosen by the node's rule in the preset (the formulas beyond the core ops are in
:mod:`lrpgraph.rules.residual_vjp`). No autograd is used; the tests check the result against autograd.
"""
from __future__ import annotations

import math
import operator
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, fx

from lrpgraph.attention import attention_mask, scale_query
from lrpgraph.rule import NodeContext, Split

from .abslrp import AbsAdd, AbsAffine, AbsElementwise, AbsMaxPool, AbsScale, _bind, constant_operand, maxpool_config, scatter_max
from .affine import affine_of
from .attention import AbsMul, AbsProduct, AbsSoftmax, MATMULS, _activations, _parse_einsum, _product, _promote
from .layernorm import AbsLayerNorm, _stats, layer_norm_params
from .residual_vjp import formula, formula_by_op
from .structural import Structural
from .transformer import ToFirst

_SCALES = (operator.mul, torch.mul, "mul", operator.truediv, torch.div, "div", torch.true_divide)


def shortcut_branch(ctx: NodeContext) -> Optional[Tuple[int, int, List[fx.Node]]]:
    """For an addition whose slot ``b`` is an ancestor of slot ``a``: ``(a slot, b slot, branch
    nodes)`` (the nodes on paths from ``b`` to ``a``, ``a`` included, in graph order); else ``None``.
    Cached on the node."""
    node, plan = ctx.node, ctx.plan
    if node is None or plan is None:
        return None
    key = "lrpgraph_shortcut_branch"
    if key not in node.meta:
        node.meta[key] = _find_branch(plan, node)
    return node.meta[key]


def _find_branch(plan, node: fx.Node):
    slots = plan.slots[node]
    pos = {n: i for i, n in enumerate(plan.nodes)}
    live = plan.live or set(plan.nodes)  # a constant (or a shape query) has no Jacobian: skip it
    for ia, a in enumerate(slots):
        for ib, b in enumerate(slots):
            if a is b or pos[b] >= pos[a]:
                continue
            down = {b}  # descendants of b up to a
            for n in plan.nodes[pos[b] + 1:pos[a] + 1]:
                if n in live and any(s in down for s in n.all_input_nodes):
                    down.add(n)
            if a not in down:
                continue
            up, stack = set(), [a]  # ancestors of a among them
            while stack:
                n = stack.pop()
                if n in up or n not in down or n is b:
                    continue
                up.add(n)
                stack.extend(n.all_input_nodes)
            return ia, ib, sorted(up, key=pos.get)
    return None


def branch_vjp(ctx: NodeContext, branch: List[fx.Node], a: fx.Node, b: fx.Node, u: Tensor) -> Optional[Tensor]:
    """``J^T u``: the cotangent at ``b`` of cotangent ``u`` at ``a`` through ``branch``."""
    from lrpgraph.walk import _add, _context, _fit, _in_node_dtype  # the walker's helpers (imported late: no cycle)
    plan, rec = ctx.plan, ctx.rec
    members = set(branch) | {b}
    cot: Dict[fx.Node, object] = {a: u}
    for n in reversed(branch):
        g = cot.pop(n, None)
        if g is None:
            continue
        rule = plan.rules.get(n)
        c = _context(plan, rec, n, rule, report=False)
        outs = vjp(c, rule, _in_node_dtype(g, c), ctx)
        for i, (s, o) in enumerate(zip(plan.slots[n], outs)):
            if o is None or s not in members:
                continue
            if isinstance(o, Split):
                o = o.total()
            cot[s] = _add(cot.get(s), _fit(o, c, i, rule))
    return cot.get(b)


def vjp(c: NodeContext, rule, g, at: NodeContext) -> list:
    """The transposed Jacobian of node ``c`` applied to ``g``, one entry per slot (explicit maths,
    chosen by the node's rule). ``at``: the residual node, for the error messages."""
    try:
        return _vjp(c, rule, g, at)
    except (AttributeError, TypeError) as exc:
        if any(v is None for v, sh in zip(c.inputs, c.input_shapes) if sh is not None) or c.output is None:
            raise RuntimeError(f"{c.describe()} in the branch of {at.describe()}: a value its transposed "
                               "Jacobian needs was not recorded (its rule saves none)") from exc
        raise


def _vjp(c: NodeContext, rule, g, at: NodeContext) -> list:
    n = len(c.inputs)
    out: list = [None] * n
    inner = getattr(rule, "inner", None)
    if isinstance(inner, Structural):  # identity-like absLRP around an exact routing rule
        rule = inner
    more = formula(c, rule)  # a rule's own vjp; sub, GroupNorm, normalize, ... (rules/residual_vjp.py)
    if more is not None:
        return more(c, rule, g)
    if isinstance(rule, Structural):
        return list(rule(c, g))  # the exact routing is the transposed data movement
    if c.target is scale_query:
        scale = c.args[1] if len(c.args) > 1 else None
        out[0] = g * (scale if scale is not None else 1.0 / math.sqrt(c.input_shapes[0][-1]))
        return out
    if c.target in _SCALES or isinstance(rule, (AbsScale, AbsMul)):  # whatever rule a preset gave it
        if len(_activations(c)) >= 2:
            return _product_vjp(c, g)
        i, _, k = constant_operand(c)
        out[i] = g * k
        return out
    if c.target in ("masked_fill", torch.masked_fill):
        out[0] = g.masked_fill(c.args[1], 0)
        return out
    if c.target is attention_mask or isinstance(rule, ToFirst):  # masks: a constant added
        out[0] = g
        return out
    if isinstance(rule, AbsAffine):
        op = affine_of(c)
        return op.place(op.transpose(g, op.weight))
    if isinstance(rule, AbsElementwise):
        x = c.inputs[0]
        _, df = _bind(rule.f, rule.df, c)
        out[0] = g.reshape((g.shape[0],) + tuple(x.shape)) * df(x)
        return out
    if isinstance(rule, AbsLayerNorm):
        x, shape, w, _, eps = layer_norm_params(c)
        _, sd = _stats(x, len(shape), eps)
        out[0] = g / sd if w is None else g * w / sd
        return out
    if isinstance(rule, AbsSoftmax):
        out[0] = g * c.output  # maximum and denominator constant: dh_j/dx_j = h_j
        return out
    if isinstance(rule, AbsProduct):
        return _product_vjp(c, g)
    if isinstance(rule, AbsAdd):
        return [None if not isinstance(v, Tensor) or const else g for v, const in zip(c.inputs, c.is_parameter)]
    if isinstance(rule, AbsMaxPool):
        out[0] = scatter_max(c.inputs[0], g, maxpool_config(c))
        return out
    more = formula_by_op(c)  # powers, fold, transposed convolutions
    if more is not None:
        return more(c, rule, g)
    if rule is None:
        raise NotImplementedError(
            f"{c.describe()} lies in the branch of the residual addition {at.describe()} and has no rule "
            "in this preset, so no transposed-Jacobian formula either; abslrp-renorm needs one there "
            "(the authors' current code differentiates through the branch). Register a rule for the op "
            "and add its formula to rules/residual_vjp.py, or use preset 'abslrp'")
    raise NotImplementedError(
        f"{c.describe()} lies in the branch of the residual addition {at.describe()}, and its rule "
        f"{getattr(rule, 'name', rule)!r} has no transposed-Jacobian formula; abslrp-renorm needs one "
        "there (the authors' current code differentiates through the branch). Use preset 'abslrp', "
        "or add the op to rules/residual_vjp.py")


def _product_vjp(c: NodeContext, g: Tensor) -> list:
    p = _product(c)
    a, b = p.a, p.b
    if p.eq is not None:
        (sa, sb), so, k = _parse_einsum(p.eq, (a, b))
        ga = torch.einsum(f"{k}{so},{sb}->{k}{sa}", g, b) if p.want_a else None
        gb = torch.einsum(f"{k}{so},{sa}->{k}{sb}", g, a) if p.want_b else None
    elif c.target in MATMULS:
        a2, b2, g2, sq_a, sq_b = _promote(a, b, g)
        ga = g2 @ b2.transpose(-1, -2) if p.want_a else None
        gb = a2.transpose(-1, -2) @ g2 if p.want_b else None
        ga = ga.squeeze(-2) if ga is not None and sq_a else ga
        gb = gb.squeeze(-1) if gb is not None and sq_b else gb
    else:
        ga = g * b if p.want_a else None
        gb = g * a if p.want_b else None
    return p.place(c, ga, gb)


def residual_head(rule: AbsAdd, ctx: NodeContext, relevance: Tensor):
    """The current code's rule at ``y = a + b`` with ``b`` an ancestor of ``a`` (see module doc);
    ``None`` when no slot is an ancestor of another."""
    found = shortcut_branch(ctx)
    if found is None:
        return None
    ia, ib, branch = found
    a, b = ctx.inputs[ia], ctx.inputs[ib]
    s = relevance / rule.denominator(ctx)
    ua = (1 + torch.sign(a)) * s
    jb = branch_vjp(ctx, branch, ctx.plan.slots[ctx.node][ia], ctx.plan.slots[ctx.node][ib], ua)
    out: list = [None] * len(ctx.inputs)
    out[ia] = a * ua
    tb = (1 + torch.sign(b)) * s
    out[ib] = b * (tb if jb is None else tb + jb)
    return out
