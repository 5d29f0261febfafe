"""A self-contained interactive HTML page of the conservation graph (``lrpgraph debug --html``).

One file, no network: the template ``data/debugger.html`` with inline CSS and JS, the graph as
JSON, the input heatmap as a PNG data URI. The layout is computed here: nodes are layered by the
longest path from the input (forward order, drawn top to bottom), constants sit just above their
user, and nodes within a layer are ordered by the mean position of their inputs. The page only
positions what is visible (collapsed blocks, the "leaking nodes only" filter).
"""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import networkx as nx
import numpy as np

from .graph import collapse

TEMPLATE = Path(__file__).parent / "data" / "debugger.html"
_ROW_FIGS = ("in_sum", "out_sum", "in_pos", "out_pos", "in_neg", "out_neg", "cancelled", "abs_err", "rel_err",
             "sink", "A")


def layout(g: nx.DiGraph) -> Dict[str, tuple]:
    """``{node: (layer, column)}``: layers by longest path from the inputs (relevance edges point
    from a node to its inputs, so a node's forward inputs are its successors)."""
    order = sorted(g.nodes, key=lambda n: g.nodes[n]["order"])
    layer: Dict[str, int] = {}
    for n in order:  # forward order is a topological order of the forward graph
        ins = [v for v in g.successors(n) if v in layer]
        layer[n] = 1 + max((layer[v] for v in ins), default=-1)
    for n in order:  # constants and parameters: just above their first user
        if g.out_degree(n) == 0 and g.nodes[n].get("kind") != "input" and g.in_degree(n):
            layer[n] = max(0, min(layer[u] for u in g.predecessors(n)) - 1)
    rows: Dict[int, List[str]] = {}
    for n in order:
        rows.setdefault(layer[n], []).append(n)
    col: Dict[str, float] = {}
    for lay in sorted(rows):
        nodes = rows[lay]
        def bary(n):
            xs = [col[v] for v in g.successors(n) if v in col]
            return (sum(xs) / len(xs)) if xs else 0.0
        nodes.sort(key=lambda n: (bary(n), g.nodes[n]["order"]))
        w = len(nodes)
        for i, n in enumerate(nodes):
            col[n] = i - (w - 1) / 2
    return {n: (layer[n], col[n]) for n in g.nodes}


def _figs(d: dict) -> Dict[str, Any]:
    out = {}
    for k in _ROW_FIGS:
        v = d.get(k)
        if isinstance(v, np.ndarray):
            out[k] = [[float(f"{x:.6g}") for x in row] for row in np.atleast_2d(v).tolist()]
    if isinstance(d.get("C"), np.ndarray):
        out["C"] = [[float(f"{x:.6g}") for x in d["C"].tolist()]]
    return out


def page_data(g: nx.DiGraph, title: str = "") -> Dict[str, Any]:
    """The JSON the page draws: nodes with layout and figures, edges with mass, blocks."""
    pos = layout(g)
    nodes = []
    for n, d in g.nodes(data=True):
        lay, c = pos[n]
        nodes.append(dict(id=n, op=d.get("op", ""), rule=d.get("rule", ""), module=d.get("module", ""),
                          block=d.get("block", ""), shape=d.get("shape", ""), kind=d.get("kind", ""),
                          note=d.get("note", ""), sink_kind=d.get("sink_kind", ""), layer=lay, col=c,
                          worst=float(d.get("worst", 0.0)), leak=bool(d.get("leak", False)), figs=_figs(d)))
    edges = [dict(s=u, t=v, mass=float(d.get("mass", 0.0)), sum=float(np.asarray(d["sum"])[0].sum()))
             for u, v, d in g.edges(data=True)]
    blocks = {n: dict(members=len(d["members"]), n_leaks=d["n_leaks"], worst=float(d["worst"]),
                      figs=_figs({k: d[k] for k in ("in_sum", "out_sum", "sink", "cancelled")}))
              for n, d in collapse(g).nodes(data=True) if d.get("kind") == "block"}
    return dict(title=title, preset=g.graph.get("preset", ""), tol=g.graph.get("tol", 1e-5),
                start=g.graph.get("start", ""), nodes=nodes, edges=edges, blocks=blocks)


def _heatmap_uri(relevance: Any, sample: int = 0) -> Optional[str]:
    """The input relevance of one sample as a PNG data URI (seismic palette), or ``None``."""
    try:
        from PIL import Image
    except ImportError:
        return None
    from .image import max_normalise, seismic

    r = relevance[sample].detach().float().cpu()
    while r.dim() > 3:  # several targets (T, C, H, W): the first
        r = r[0]
    if r.dim() == 3:
        r = r.sum(0)
    if r.dim() != 2:
        return None
    rgb = seismic(max_normalise(r[None])[0]).numpy()
    img = Image.fromarray(rgb)
    scale = max(1, 256 // max(r.shape))
    img = img.resize((r.shape[1] * scale, r.shape[0] * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def write_html(e: Any, path: str, title: str = "", tol: float = 1e-5, level: int = 1, sample: int = 0) -> str:
    """Write the interactive page of explanation ``e`` (explained with ``report=True``) to ``path``."""
    g = e.graph(tol=tol, level=level)
    data = page_data(g, title=title)
    data["heatmap"] = _heatmap_uri(e.relevance, sample)
    from .sinks import books, by_kind
    b, kinds = books(e), by_kind(e)
    data["books"] = [["start relevance", float(b["start"][0, sample])], ["input relevance", float(b["input"][0, sample])]] + \
        [[f"sink: {k}", float(v[0, sample])] for k, v in kinds.items() if k != "total"] + \
        [["sinks, total", float(kinds["total"][0, sample])]]
    data["sample"] = sample
    blob = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    html = TEMPLATE.read_text().replace("/*__DATA__*/null", blob).replace("__TITLE__", _esc(title or "lrpgraph"))
    Path(path).write_text(html)
    return path


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
