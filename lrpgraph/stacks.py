"""A reduction over the dim that a ``torch.stack`` created is the sum of the stacked tensors.

Ensembles of heads and multi-branch models combine their branches as
``torch.stack([h0, h1, h2]).sum(0)`` (timm's EfficientViM) or
``torch.mean(torch.stack(outs, dim=0), dim=0)`` (CrossViT). Dim 0 of the stack is then the branch
index, not the batch, but every rule takes dim 0 of a tensor as the batch: a reduction over it
would be refused as mixing samples, and the per-sample statistics of the sign split would be
taken per branch. This pass rewrites such a reduction into what it computes,
``h0 + h1 + h2`` (divided by the count for a mean; unsqueezed again for ``keepdim=True``), so the
branches meet at ordinary additions with their rules and the batch stays at dim 0 throughout.

Recognised: ``torch.stack(list, dim)`` (as ``torch.fx`` records it, and as the export tracer
lifts ``aten.stack``) whose result is reduced by ``torch.sum``/``torch.mean``/``Tensor.sum``/``Tensor.mean`` over exactly the
stacked dim (as an int or a one-element list), without ``dtype``. Other users of the stack are
left as they are; the stack is removed when nothing else uses it.
"""
from __future__ import annotations

import operator
from typing import Any, Optional, Tuple

import torch
from torch import fx

from .passes import register_pass

_KINDS = {torch.sum: "sum", torch.mean: "mean", "sum": "sum", "mean": "mean"}
_META = ("nn_module_stack", "stack_trace", "lrp_module")


def _arg(node: fx.Node, i: int, name: str, default: Any) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _reduction(node: fx.Node) -> Optional[Tuple[str, Any, bool]]:
    """``(kind, dim, keepdim)`` of a sum or mean over one given dim, else ``None``."""
    if node.op not in ("call_function", "call_method"):
        return None
    try:
        kind = _KINDS.get(node.target)
    except TypeError:  # an unhashable target
        return None
    if kind is None or node.kwargs.get("dtype") is not None or len(node.args) > 3:
        return None
    dim = _arg(node, 1, "dim", None)
    if isinstance(dim, (list, tuple)) and len(dim) == 1:
        dim = dim[0]
    keepdim = _arg(node, 2, "keepdim", False)
    if not isinstance(dim, int) or not isinstance(keepdim, bool):
        return None
    return kind, dim, keepdim


def _rank(node: fx.Node) -> Optional[int]:
    val = node.meta.get("val")
    return val.dim() if isinstance(val, torch.Tensor) else None


def _same_dim(a: int, b: int, rank: Optional[int]) -> bool:
    if a == b:
        return True
    return rank is not None and a % rank == b % rank


@register_pass
def sum_stacked(gm: fx.GraphModule) -> None:
    """Rewrite every sum or mean over a stacked dim into the additions it computes."""
    g = gm.graph
    for stack in list(g.nodes):
        if stack.op != "call_function" or stack.target is not torch.stack:
            continue
        items = _arg(stack, 0, "tensors", None)
        dim = _arg(stack, 1, "dim", 0)
        if not isinstance(items, (list, tuple)) or not items or not isinstance(dim, int) \
                or not all(isinstance(i, fx.Node) for i in items):
            continue
        for user in list(stack.users):
            red = _reduction(user)
            if red is None or user.args[0] is not stack or not _same_dim(red[1], dim, _rank(stack)):
                continue
            kind, _, keepdim = red
            with g.inserting_before(user):
                total = items[0]
                for item in items[1:]:
                    total = _like(g.call_function(operator.add, (total, item)), user)
                if kind == "mean" and len(items) > 1:
                    total = _like(g.call_function(operator.truediv, (total, float(len(items)))), user)
                if keepdim:
                    total = _like(g.call_function(torch.unsqueeze, (total, dim)), user)
            if total is not items[0] and "val" in user.meta:
                total.meta["val"] = user.meta["val"]
            user.replace_all_uses_with(total)
            g.erase_node(user)
        if not stack.users:
            g.erase_node(stack)


def _like(new: fx.Node, old: fx.Node) -> fx.Node:
    """Give an inserted node the module information of the node it replaces (for the report)."""
    for k in _META:
        if k in old.meta:
            new.meta[k] = old.meta[k]
    return new
