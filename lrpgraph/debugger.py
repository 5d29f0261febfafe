"""The debugger's extra outputs for ``lrpgraph debug``: the interactive HTML page, the graph
files, the residual table and plot, the named sinks and the attention-head grid."""
from __future__ import annotations

import argparse
from typing import Any


def add_arguments(d: argparse.ArgumentParser) -> None:
    """The debugger options of ``lrpgraph debug``."""
    d.add_argument("--html", metavar="PATH", help="write the interactive conservation graph (one self-contained file)")
    d.add_argument("--graph", metavar="PATH", help="write the graph as GraphML (.graphml) or node-link JSON (.json)")
    d.add_argument("--residuals", action="store_true", help="print C and A at every residual addition")
    d.add_argument("--residual-plot", metavar="PNG", help="plot A (and C) per residual addition")
    d.add_argument("--sinks", action="store_true", help="print where the relevance went, per kind of sink")
    d.add_argument("--zero-bias", action="store_true", help="explain as if every bias were zero (model untouched)")
    d.add_argument("--heads", metavar="PNG", help="plot the relevance of every attention head as a grid")


def run(a: argparse.Namespace, e: Any, title: str) -> None:
    """Write and print what the options ask for."""
    from pathlib import Path

    for path in (a.html, a.graph, a.residual_plot, a.heads):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    if a.residuals:
        from .residuals import residual_table
        print("\n" + residual_table(e.residuals(), sample=a.sample))
    if a.residual_plot:
        from .residuals import plot_residuals
        print(f"residual plot: {plot_residuals(e.residuals(), a.residual_plot, title=title, sample=a.sample)}")
    if a.sinks:
        from .sinks import sink_table
        print("\n" + sink_table(e, sample=a.sample))
    if a.graph:
        from .graph import write_graphml, write_json
        g = e.graph(tol=a.tol)
        path = write_json(g, a.graph) if a.graph.endswith(".json") else write_graphml(g, a.graph)
        print(f"graph: {path} ({g.number_of_nodes()} nodes, {g.number_of_edges()} edges)")
    if a.html:
        from .html import write_html
        print(f"html: {write_html(e, a.html, title=title, tol=a.tol, sample=a.sample)}")
    if a.heads:
        if not e.heads:
            raise SystemExit("--heads: the model has no attention maps (a 4-D softmax followed by a matmul)")
        from .heads import plot_heads
        print(f"heads: {plot_heads(e.heads, a.heads, sample=a.sample)}")
