"""``lrpgraph debug`` with the debugger's options."""
from __future__ import annotations

import json

import networkx as nx

from lrpgraph.cli import main


def test_debug_options(tmp_path, capsys):
    html, graph, plot = tmp_path / "r.html", tmp_path / "g.json", tmp_path / "a.png"
    rc = main(["debug", "--model", "resnet", "--rules", "lrp-0", "--no-contrastive", "--double", "--zero-bias",
               "--residuals", "--sinks", "--html", str(html), "--graph", str(graph), "--residual-plot", str(plot)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "6 residual additions" in out and "A (backward)" in out
    gap = float(out.split("start - input - sinks = ")[1].split()[0])
    assert abs(gap) < 1e-10
    assert "sink bias" not in out  # zero_bias: no bias left to absorb relevance
    assert "0 node(s) leak" in out
    assert html.stat().st_size > 10_000 and plot.stat().st_size > 1000
    data = json.loads(graph.read_text())
    assert any(n.get("A") for n in data["nodes"])


def test_debug_graphml_and_heads(tmp_path, capsys):
    gml, heads = tmp_path / "g.graphml", tmp_path / "h.png"
    assert main(["debug", "--model", "vit", "--n", "1", "--graph", str(gml), "--heads", str(heads)]) == 0
    assert "heads:" in capsys.readouterr().out
    assert heads.stat().st_size > 1000
    assert nx.read_graphml(str(gml)).number_of_nodes() > 50
