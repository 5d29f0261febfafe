"""Graph rewrites that put a traced graph into the canonical form the rules expect.

Every pass edits the ``GraphModule`` that lrpgraph traced (never the user's model) and keeps the
forward function identical:

* in-place operations become out-of-place (``x += y`` -> ``x + y``, ``x.relu_()`` -> ``x.relu()``,
  ``F.relu(x, inplace=True)`` -> ``F.relu(x)``), so recorded activations are never overwritten;
* every addition is one op, ``operator.add`` (``torch.add``, ``Tensor.add``, ``iadd``; an
  ``alpha`` factor becomes an explicit multiplication);
* ``Tensor.add(x, y)``-style method calls on two tensors are rewritten the same way.

Further passes (e.g. making ``scaled_dot_product_attention`` explicit) register themselves in
:data:`PASSES` and run in order.
"""
from __future__ import annotations

import operator
from typing import Callable, List

import torch
from torch import fx

_INPLACE_FUNCTIONS = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}

# out-of-place twins of in-place tensor methods that may appear in traced code
_INPLACE_METHODS = {
    "add_": "add", "sub_": "sub", "mul_": "mul", "div_": "div", "relu_": "relu",
    "sigmoid_": "sigmoid", "tanh_": "tanh", "clamp_": "clamp", "clamp_min_": "clamp_min",
    "neg_": "neg", "abs_": "abs", "exp_": "exp", "unsqueeze_": "unsqueeze",
    "squeeze_": "squeeze", "transpose_": "transpose", "masked_fill_": "masked_fill",
}

_INPLACE_TORCH = {
    torch.relu_: torch.relu,
    torch.sigmoid_: torch.sigmoid,
    torch.tanh_: torch.tanh,
}

_ADD_FUNCTIONS = (operator.add, torch.add)


def remove_inplace(gm: fx.GraphModule) -> None:
    """Rewrite in-place ops and ``inplace=True`` flags into their out-of-place forms."""
    for node in gm.graph.nodes:
        if node.op == "call_function":
            if node.target in _INPLACE_FUNCTIONS:
                node.target = _INPLACE_FUNCTIONS[node.target]
            elif node.target in _INPLACE_TORCH:
                node.target = _INPLACE_TORCH[node.target]
            if node.kwargs.get("inplace", False):
                node.kwargs = {**node.kwargs, "inplace": False}
        elif node.op == "call_method" and node.target in _INPLACE_METHODS:
            node.target = _INPLACE_METHODS[node.target]


def canonical_add(gm: fx.GraphModule) -> None:
    """Make every addition ``operator.add(a, b)``; ``alpha`` becomes ``operator.mul(b, alpha)``."""
    g = gm.graph
    for node in list(g.nodes):
        is_fn_add = node.op == "call_function" and node.target in _ADD_FUNCTIONS
        is_method_add = node.op == "call_method" and node.target == "add"
        if not (is_fn_add or is_method_add):
            continue
        args = list(node.args)
        kwargs = dict(node.kwargs)
        if len(args) < 2 and "other" in kwargs:
            args.append(kwargs.pop("other"))
        alpha = kwargs.pop("alpha", 1)
        if len(args) == 3:
            alpha = args.pop()
        if kwargs or len(args) != 2:
            continue  # out=..., leave it to the registry (it will report a missing rule)
        a, b = args
        if alpha != 1:
            with g.inserting_before(node):
                b = g.call_function(operator.mul, (b, alpha))
        node.op = "call_function"
        node.target = operator.add
        node.args = (a, b)
        node.kwargs = {}


#: Passes run in order on every traced graph.
PASSES: List[Callable[[fx.GraphModule], None]] = [remove_inplace, canonical_add]


def register_pass(fn: Callable[[fx.GraphModule], None]) -> Callable[[fx.GraphModule], None]:
    """Add a graph pass (run after the built-in ones). Returns ``fn`` so it can decorate."""
    PASSES.append(fn)
    return fn


def normalise(gm: fx.GraphModule) -> fx.GraphModule:
    """Run every registered pass, then lint and recompile ``gm``."""
    for p in PASSES:
        p(gm)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm

