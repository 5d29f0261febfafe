"""Inline the bodies of ``torch.export``'s wrapper higher-order ops.

``torch.export`` records a region of the forward that runs under a context manager as one
higher-order op that calls a subgraph: ``with torch.autocast(..., enabled=False):`` (timm's
``LiteMLA`` computes its linear attention so) becomes ``wrap_with_autocast(device, dtype, enabled,
cache, body, *operands)``, ``with torch.no_grad():`` / ``torch.enable_grad()`` becomes
``wrap_with_set_grad_enabled(enabled, body, *operands)``. No rule could see inside such a node.

lrpgraph explains under ``torch.no_grad`` without autocast, so those context managers change
nothing in the values it records when they *disable* autocast or set the grad mode: the body's ops
are copied into the graph in place of the wrapper (with the wrapper's module path where a body
node has none), and every op gets its usual rule. A region that *enables* autocast computes in a
lower precision than the rest of the model; inlining it would change the output, so it is refused
with an error that says so.
"""
from __future__ import annotations

import operator
from typing import Any, Dict, List, Optional

import torch
from torch import fx

_WRAPPERS = ("wrap_with_autocast", "wrap_with_set_grad_enabled", "wrap")


class WrapperError(ValueError):
    """A wrapper higher-order op whose body cannot be inlined without changing the model."""


def _hop_name(target: Any) -> Optional[str]:
    if isinstance(target, torch._ops.HigherOrderOperator):
        return target.name()
    return None


def _body_slot(n: fx.Node) -> Optional[int]:
    """Index of the argument that names the body subgraph (a ``get_attr`` of a GraphModule)."""
    for i, a in enumerate(n.args):
        if isinstance(a, fx.Node) and a.op == "get_attr":
            return i
    return None


def inline_wrappers(gm: fx.GraphModule) -> int:
    """Inline every wrapper higher-order op of ``gm`` (lrpgraph's own copy) in place; the number
    inlined. Raises :class:`WrapperError` for an autocast region that enables autocast."""
    count = 0
    for _ in range(32):  # nested wrappers surface as the outer ones are inlined
        todo = [n for n in gm.graph.nodes if n.op == "call_function" and _hop_name(n.target) in _WRAPPERS]
        if not todo:
            break
        for n in todo:
            _inline(gm, n)
            count += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return count


def _inline(gm: fx.GraphModule, n: fx.Node) -> None:
    name = _hop_name(n.target)
    slot = _body_slot(n)
    if slot is None:
        raise WrapperError(f"node `{n.name}` ({name}): no body subgraph found among its arguments")
    if name == "wrap_with_autocast" and n.args[2]:  # (device_type, dtype, enabled, cache_enabled, body, ...)
        raise WrapperError(f"node `{n.name}` ({name}) runs part of the model under torch.autocast "
                           f"({n.args[0]}, {n.args[1]}): lrpgraph explains in the input's dtype and "
                           "cannot follow a change of precision inside the model. Explain a copy "
                           "whose forward does not enable autocast")
    body: fx.GraphModule = getattr(gm, n.args[slot].target)
    operands = list(n.args[slot + 1:])
    g = gm.graph
    env: Dict[fx.Node, Any] = {}
    placeholders = [b for b in body.graph.nodes if b.op == "placeholder"]
    if len(placeholders) != len(operands):
        raise WrapperError(f"node `{n.name}` ({name}): {len(operands)} operands for a body with "
                           f"{len(placeholders)} inputs")
    env.update(zip(placeholders, operands))
    result: Any = None
    with g.inserting_before(n):
        for b in body.graph.nodes:
            if b.op == "placeholder":
                continue
            if b.op == "output":
                result = fx.node.map_arg(b.args[0], lambda a: env[a])
                break
            if b.op == "get_attr":  # a body's own constant: give it a name on the outer module
                target = f"{n.args[slot].target}_{b.target}".replace(".", "_")
                value: Any = body
                for part in b.target.split("."):
                    value = getattr(value, part)
                setattr(gm, target, value)
                new = g.get_attr(target)
                new.meta.update(b.meta)
            else:
                new = g.node_copy(b, lambda a: env[a])
            for k in ("nn_module_stack", "stack_trace"):  # the wrapper's module where the body has none
                if not new.meta.get(k) and n.meta.get(k):
                    new.meta[k] = n.meta[k]
            env[b] = new
    outs: List[Any] = list(result) if isinstance(result, (tuple, list)) else [result]
    for user in list(n.users):
        if user.target is not operator.getitem or not isinstance(user.args[1], int):
            raise WrapperError(f"node `{n.name}` ({name}): its output is used by `{user.name}` "
                               "other than by index")
        user.replace_all_uses_with(outs[user.args[1]])
        g.erase_node(user)
    g.erase_node(n)
