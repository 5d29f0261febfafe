"""Find fused projections: a Linear whose output is split into chunks (fused q/k/v).

timm's attention computes ``qkv = Linear(x)``, reshapes it to ``(B, N, 3, heads, head_dim)``,
permutes and unbinds it into q, k and v. The paper-era absLRP code explains q, k and v as three
separate Linear layers, each conserving its own positive and negative relevance mass. This pass
finds such splits in the traced graph and records, on the Linear node, which output feature goes
to which chunk (``node.meta["lrpgraph_options"]["out_groups"]``, a LongTensor of chunk ids), so
that a rule can conserve per chunk (see :mod:`lrpgraph.rules.abslrp_routing`). Rules that do not
read the option are unaffected, and the graph itself is not changed.

Recognised: a chain of single-user nodes from the Linear through ``reshape``/``view`` (splitting
the feature dim into factors), ``permute``/``transpose`` and ``contiguous``, ending in ``unbind``,
``chunk`` or ``split`` along an axis that is one factor of the feature dim.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from .passes import register_pass
from .record import _fetch_attr

_RESHAPE = ("reshape", "view", torch.reshape)
_PERMUTE = ("permute", torch.permute)
_TRANSPOSE = ("transpose", "swapaxes", torch.transpose, torch.swapaxes)
_SPLIT = ("unbind", "chunk", "split", torch.unbind, torch.chunk, torch.split)


def _out_features(gm: fx.GraphModule, node: fx.Node) -> Optional[int]:
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return m.out_features if isinstance(m, nn.Linear) else None
    if node.op == "call_function" and node.target is F.linear:
        w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        if isinstance(w, fx.Node) and w.op == "get_attr":  # a Parameter, a buffer or a plain tensor
            value = _fetch_attr(gm, w.target)
            return int(value.shape[0]) if isinstance(value, torch.Tensor) and value.dim() == 2 else None
    return None


def _ints(args) -> Optional[List[int]]:
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = args[0]
    return list(args)


def _arg(node: fx.Node, i: int, name: str, default):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def output_groups(gm: fx.GraphModule, node: fx.Node, features: int) -> Optional[List[int]]:
    """The chunk id of every output feature of ``node`` if its output is split into chunks along
    one factor of the feature dim (see the module doc), else ``None``."""
    factors, axes = [features], None  # axes: per axis the factor it holds (None: not a feature axis)
    cur = node
    while True:
        users = list(cur.users)
        if len(users) != 1:
            return None
        u = users[0]
        t = u.target
        if t in _RESHAPE and axes is None:
            shape = _ints(u.args[1:])
            m = 0
            prod = 1
            while m < len(shape) and isinstance(shape[-1 - m], int) and prod < features:
                prod *= shape[-1 - m]
                m += 1
            if prod != features or m == 0 or any(s == -1 for s in shape[len(shape) - m:]):
                return None
            factors = list(shape[len(shape) - m:])
            axes = [None] * (len(shape) - m) + list(range(m))
        elif t in _PERMUTE and axes is not None:
            dims = _ints(u.args[1:])
            if len(dims) != len(axes) or not all(isinstance(d, int) for d in dims):
                return None
            axes = [axes[d] for d in dims]
        elif t in _TRANSPOSE and axes is not None:
            a, b = u.args[1], u.args[2]
            if not (isinstance(a, int) and isinstance(b, int)):
                return None
            axes = list(axes)
            axes[a], axes[b] = axes[b], axes[a]
        elif t == "contiguous":
            pass
        elif t in _SPLIT:
            unbind = t in ("unbind", torch.unbind)
            dim = _arg(u, 1, "dim", 0) if unbind else _arg(u, 2, "dim", 0)
            if not isinstance(dim, int):
                return None
            if axes is None:
                if dim != -1:
                    return None
                factor = 0
            else:
                factor = axes[dim]
                if factor is None:
                    return None
            size = factors[factor]
            stride = math.prod(factors[factor + 1:])
            digits = [(f // stride) % size for f in range(features)]
            if unbind:
                groups = digits
            else:
                sizes = _arg(u, 1, "split_size_or_sections" if t in ("split", torch.split) else "chunks", None)
                if t in ("chunk", torch.chunk):
                    if not isinstance(sizes, int):
                        return None
                    sizes = math.ceil(size / sizes)
                if isinstance(sizes, int):
                    groups = [d // sizes for d in digits]
                elif isinstance(sizes, (list, tuple)) and all(isinstance(s, int) for s in sizes):
                    bounds = [sum(sizes[:i + 1]) for i in range(len(sizes))]
                    groups = [next(i for i, b in enumerate(bounds) if d < b) for d in digits]
                else:
                    return None
            return groups if len(set(groups)) > 1 else None
        else:
            return None
        cur = u


@register_pass
def mark_split_projections(gm: fx.GraphModule) -> None:
    """Record ``out_groups`` on every Linear node whose output is split into chunks."""
    for node in gm.graph.nodes:
        features = _out_features(gm, node)
        if features is None:
            continue
        groups = output_groups(gm, node, features)
        if groups is not None:
            opts = dict(node.meta.get("lrpgraph_options", {}))
            opts["out_groups"] = torch.tensor(groups, dtype=torch.long)
            node.meta["lrpgraph_options"] = opts
