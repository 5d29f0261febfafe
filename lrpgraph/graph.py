"""The conservation debugger as a :class:`networkx.DiGraph`.

:func:`build` turns an :class:`~lrpgraph.explainer.Explanation` (explained with ``report=True``)
into one node per graph node that carried relevance, plus the input placeholders. Edges point the
way relevance flows, from a node to its inputs, so the edges *into* a node carry what it received.

Node attributes: ``op``, ``rule``, ``module`` (module path), ``block`` (see :func:`block_of`),
``shape``, ``order`` (forward position), ``kind`` (``input``, ``op``, ``absorbed``), the report's
figures per pass and sample as ``(K, B)`` float64 arrays (``in_sum in_pos in_neg out_sum out_pos
out_neg cancelled abs_err rel_err``), ``worst`` (the row's worst relative error), ``leak``, the
named ``sink`` (``(K, B)``) and ``sink_kind`` (:mod:`lrpgraph.sinks`), and at residual additions
``C`` (``(B,)``) and ``A`` (``(K, B)``, :mod:`lrpgraph.residuals`). Input placeholders have
``in_sum`` only (the sum of their incoming edges).

Edge attributes: ``sum`` (the signed relevance added to the input, after any renormalisation,
``(K, B)``), ``sent_sum``, ``sent_pos``, ``sent_neg`` (what the rule sent, before renormalisation),
``mass`` (mean absolute mass sent, a scalar for drawing) and ``slots`` (input slot indices). A node
used twice by one user (``x + x``) has one edge with both slots summed.
"""
from __future__ import annotations

import json
import re
from typing import Any, Callable, Dict, Iterable, Optional, Union

import networkx as nx
import numpy as np
from torch import fx

FIGURES = ("in_sum", "in_pos", "in_neg", "out_sum", "out_pos", "out_neg", "cancelled", "abs_err", "rel_err")


def module_path(node: fx.Node) -> str:
    """The module path of an fx node: its target for modules and parameters, else the innermost
    module whose forward created it (``""`` at the top level)."""
    if node.op in ("call_module", "get_attr"):
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        last = list(stack.values())[-1]
        return str(last[0] if isinstance(last, tuple) else last)
    return ""


def module_paths(nodes: Iterable[fx.Node]) -> Dict[fx.Node, str]:
    """:func:`module_path` of every node; a node that a graph pass inserted without module
    information (explicit attention, normalised additions) takes the common module prefix of its
    neighbours, so that it lands in the right block."""
    nodes = list(nodes)
    out = {n: module_path(n) for n in nodes}
    for _ in range(4):  # chains of inserted nodes fill in from both ends
        changed = False
        for n in nodes:
            if out[n] or n.op in ("placeholder", "get_attr", "output"):
                continue
            near = [out[m] for m in list(n.all_input_nodes) + list(n.users) if out.get(m) and m.op != "get_attr"]
            if near:
                parts = [p.split(".") for p in near]
                common = []
                for col in zip(*parts):
                    if any(c != col[0] for c in col):
                        break
                    common.append(col[0])
                if common:
                    out[n], changed = ".".join(common), True
        if not changed:
            break
    return out


_NUMBERED = re.compile(r"^\d+$")


def block_of(path: str, level: int = 1) -> Optional[str]:
    """The block of a module path: the prefix up to its ``level``-th numbered component
    (``layer3.2.conv1`` -> ``layer3.2``, ``blocks.7.attn.qkv`` -> ``blocks.7``), or ``None``."""
    parts = path.split(".") if path else []
    seen = 0
    for i, p in enumerate(parts):
        if _NUMBERED.match(p):
            seen += 1
            if seen == level:
                return ".".join(parts[:i + 1])
    return None


def _np(t) -> np.ndarray:
    return t.detach().to("cpu").double().numpy()


def build(e: Any, tol: float = 1e-5, level: int = 1) -> nx.DiGraph:
    """The graph of an explanation (see the module doc). ``tol``: the relative error marked as a
    leak; ``level``: which numbered module level names a block."""
    from .residuals import residuals
    from .sinks import node_sinks

    if e._plan is None:
        raise ValueError("this Explanation has no graph: explain with report=True")
    masses = e.sign_split
    floor = e.conservation().noise_floor()  # as the report judges a row
    g = nx.DiGraph(preset=e.preset, tol=tol, start=e._rows[0].name if e._rows else "")
    rows = {r.name: r for r in e._rows}
    touched = set(rows) | {u for u, *_ in e._edges} | {v for _, v, *_ in e._edges}
    order = {n.name: i for i, n in enumerate(e._plan.nodes)}
    sinks = node_sinks(e)
    first = e._plan.placeholders[0] if e._plan.placeholders else None
    paths = module_paths(e._plan.nodes)
    for n in e._plan.nodes:
        if n.name not in touched and n is not first:  # size queries, inputs no relevance reached
            continue
        path = paths[n]
        shape = e._shapes.get(n.name)
        attrs: Dict[str, Any] = dict(op=n.op, module=path, block=block_of(path, level) or "",
                                     shape=str(tuple(shape)) if shape is not None else "", order=order[n.name],
                                     rule="", kind="input" if n.op == "placeholder" else "op", note="",
                                     worst=0.0, leak=False)
        r = rows.get(n.name)
        if r is not None:
            kind = "input" if n.op == "placeholder" else ("absorbed" if r.by_design else "op")
            attrs.update(op=r.op, rule=r.rule, note=r.note, kind=kind,
                         worst=r.worst(masses, floor), leak=r.worst(masses, floor) > tol,
                         **{f: _np(getattr(r, f)) for f in FIGURES})
        if n.name in sinks:
            attrs["sink"], attrs["sink_kind"] = sinks[n.name]
        g.add_node(n.name, **attrs)
    for user, inp, slot, sent, got in e._edges:
        s = [_np(t) for t in sent]
        if g.has_edge(user, inp):
            d = g.edges[user, inp]
            d["sum"] = d["sum"] + _np(got)
            for key, v in zip(("sent_sum", "sent_pos", "sent_neg"), s):
                d[key] = d[key] + v
            d["slots"] = d["slots"] + [slot]
        else:
            g.add_edge(user, inp, sum=_np(got), sent_sum=s[0], sent_pos=s[1], sent_neg=s[2], slots=[slot])
    for _u, _v, d in g.edges(data=True):
        d["mass"] = float(np.mean(d["sent_pos"] - d["sent_neg"]))
    for n, d in g.nodes(data=True):
        if d["kind"] == "input":
            d["in_sum"] = sum((g.edges[u, n]["sum"] for u in g.predecessors(n)), np.zeros_like(_start(e)))
    for res in residuals(e):
        if res.name in g:
            g.nodes[res.name]["C"] = _np(res.C)
            if res.A is not None:
                g.nodes[res.name]["A"] = _np(res.A)
    return g


def _start(e: Any) -> np.ndarray:
    return _np(e._rows[0].in_sum) if e._rows else np.zeros((1, 1))


def collapse(g: nx.DiGraph, blocks: Union[None, Iterable[str], Callable[[str, dict], Optional[str]]] = None) -> nx.DiGraph:
    """Collapse every block into one node with summed figures.

    ``blocks``: ``None`` (the ``block`` attribute of every node), a list of module prefixes
    (``["layer3.2", "blocks.7"]``), or ``fn(node, attrs) -> group name or None``. A block node has
    ``kind="block"``, ``members``, ``in_sum`` (what entered it from outside, plus the start relevance
    if it holds the start node), ``out_sum`` (what it sent outside), the summed ``sink``, ``cancelled``
    and ``worst``/``leak`` over its members. Edges between groups sum their figures, so every total
    (start, input relevance, sinks) is preserved.
    """
    if blocks is None:
        key = lambda n, d: d.get("block") or None  # noqa: E731
    elif callable(blocks):
        key = blocks
    else:
        prefixes = sorted(blocks, key=len, reverse=True)
        key = lambda n, d: next((p for p in prefixes if d.get("module", "") == p  # noqa: E731
                                 or d.get("module", "").startswith(p + ".")), None)
    group = {n: (key(n, d) or n) for n, d in g.nodes(data=True)}
    h = nx.DiGraph(**g.graph)
    members: Dict[str, list] = {}
    for n in g.nodes:
        members.setdefault(group[n], []).append(n)
    start = g.graph.get("start")
    for name, ms in members.items():
        if len(ms) == 1 and ms[0] == name:
            h.add_node(name, **g.nodes[name])
            continue
        data = [g.nodes[m] for m in ms]
        like = next((d["in_sum"] for d in data if "in_sum" in d), None)
        zero = np.zeros_like(like) if like is not None else np.zeros((1, 1))
        inside = set(ms)
        in_sum = sum((d["sum"] for u, v, d in g.in_edges(ms, data=True) if u not in inside), zero.copy())
        if start in inside:
            in_sum = in_sum + g.nodes[start]["in_sum"]
        out_sum = sum((d["sum"] for u, v, d in g.out_edges(ms, data=True) if v not in inside), zero.copy())
        h.add_node(name, kind="block", op="block", rule="", module=name, block=name, members=ms,
                   order=min(d["order"] for d in data), shape="", note=f"{len(ms)} nodes",
                   in_sum=in_sum, out_sum=out_sum,
                   sink=sum((d["sink"] for d in data if "sink" in d), zero.copy()),
                   cancelled=sum((d["cancelled"] for d in data if "cancelled" in d), zero.copy()),
                   worst=max(d.get("worst", 0.0) for d in data), leak=any(d.get("leak") for d in data),
                   n_leaks=sum(bool(d.get("leak")) for d in data))
    for u, v, d in g.edges(data=True):
        a, b = group[u], group[v]
        if a == b:
            continue
        if h.has_edge(a, b):
            e = h.edges[a, b]
            for k in ("sum", "sent_sum", "sent_pos", "sent_neg"):
                e[k] = e[k] + d[k]
            e["mass"] += d["mass"]
        else:
            h.add_edge(a, b, **{k: (v_.copy() if isinstance(v_, np.ndarray) else v_) for k, v_ in d.items()})
    return h


def _plain(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        return v.item()
    return v


def to_node_link(g: nx.DiGraph) -> dict:
    """A JSON-ready node-link dict (arrays as nested lists)."""
    data = nx.node_link_data(g, edges="edges")
    for item in data["nodes"] + data["edges"]:
        for k, v in list(item.items()):
            item[k] = _plain(v)
    data["graph"] = {k: _plain(v) for k, v in data["graph"].items()}
    return data


def write_json(g: nx.DiGraph, path: str) -> str:
    """Write the node-link JSON of ``g``."""
    with open(path, "w") as f:
        json.dump(to_node_link(g), f)
    return path


def write_graphml(g: nx.DiGraph, path: str) -> str:
    """Write ``g`` as GraphML: scalars as they are, arrays and lists as JSON strings."""
    h = nx.DiGraph()
    h.graph.update({k: v for k, v in g.graph.items() if isinstance(v, (str, int, float, bool))})
    conv = lambda v: v if isinstance(v, (str, int, float, bool)) else json.dumps(_plain(v))  # noqa: E731
    for n, d in g.nodes(data=True):
        h.add_node(n, **{k: conv(_plain(v)) for k, v in d.items()})
    for u, v, d in g.edges(data=True):
        h.add_edge(u, v, **{k: conv(_plain(x)) for k, x in d.items()})
    nx.write_graphml(h, path)
    return path
