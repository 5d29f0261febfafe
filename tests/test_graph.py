"""The conservation debugger as a graph: node figures equal the report rows, edges into a node sum
to its incoming relevance, collapsing blocks preserves totals, exports round-trip."""
from __future__ import annotations

import json

import networkx as nx
import numpy as np
import pytest
import torch

import lrpgraph
from lrpgraph import zoo
from lrpgraph.graph import FIGURES, block_of, collapse, to_node_link, write_graphml, write_json


def _check_graph(e, tol=1e-9):
    g = e.graph()
    rows = e.conservation().rows
    assert len([n for n, d in g.nodes(data=True) if d["kind"] != "input"]) == len([r for r in rows if r.rule != "input"])
    assert {r.name for r in rows} <= set(g.nodes)  # an input's row (its fan-out check) is its node
    for r in rows:  # node figures are the report's rows
        d = g.nodes[r.name]
        assert d["rule"] == r.rule
        for f in FIGURES:
            np.testing.assert_array_equal(d[f], getattr(r, f).numpy())
    scale = max(1.0, max(float(np.abs(d["in_pos"]).max() + np.abs(d["in_neg"]).max())
                         for _, d in g.nodes(data=True) if "in_pos" in d))
    for n, d in g.nodes(data=True):  # the edges into a node carry its incoming relevance
        if n == g.graph["start"]:
            assert g.in_degree(n) == 0
            continue
        assert g.in_degree(n) > 0, n
        got = sum(g.edges[u, n]["sum"] for u in g.predecessors(n))
        np.testing.assert_allclose(got, d["in_sum"], rtol=0, atol=tol * scale, err_msg=n)
    return g


def _check_collapse(g, atol):
    h = collapse(g)
    blocks = {d["block"] for _, d in g.nodes(data=True) if d["block"]}
    assert blocks and blocks <= set(h.nodes)
    assert h.number_of_nodes() < g.number_of_nodes()
    total = lambda G: sum(d["sink"] for _, d in G.nodes(data=True) if "sink" in d)  # noqa: E731
    np.testing.assert_allclose(total(h), total(g), atol=atol)
    for n, d in h.nodes(data=True):
        if d["kind"] == "block":  # what came in = what went out + what its members kept
            np.testing.assert_allclose(d["in_sum"], d["out_sum"] + d["sink"], atol=atol, err_msg=n)
        if n != h.graph["start"]:
            got = sum(h.edges[u, n]["sum"] for u in h.predecessors(n))
            np.testing.assert_allclose(got, d["in_sum"], atol=atol, err_msg=n)
    inp = [n for n, d in g.nodes(data=True) if d["kind"] == "input"][0]
    np.testing.assert_allclose(h.nodes[inp]["in_sum"], g.nodes[inp]["in_sum"], atol=atol)
    return h


@pytest.mark.parametrize("name", ["vgg", "resnet", "vit"])
@pytest.mark.parametrize("rules", ["abslrp", "abslrp-renorm", "lrp-epsilon"])
def test_graph_bundled(name, rules):
    m = zoo.load(name).double()
    x, _ = zoo.load_samples(2)
    g = _check_graph(lrpgraph.Explainer(m, rules=rules)(x.double()))
    if name != "vgg":  # the VGG has no numbered blocks of more than one node
        _check_collapse(g, atol=1e-9 * max(1.0, float(np.abs(g.nodes[g.graph["start"]]["in_pos"]).max())))


@pytest.mark.parametrize("arch", ["resnet50", "vit_tiny_patch16_224"])
def test_graph_timm(timm, arch):
    kw = {"img_size": 64} if arch.startswith("vit") else {}
    m = timm.create_model(arch, pretrained=False, num_classes=10, **kw).eval()
    x = torch.randn(2, 3, 64, 64)
    e = lrpgraph.Explainer(m, rules="abslrp")(x)
    g = _check_graph(e, tol=1e-5)
    h = _check_collapse(g, atol=1e-4)
    want = {"layer3.2", "layer4.0"} if arch == "resnet50" else {"blocks.0", "blocks.11"}
    assert want <= set(h.nodes)
    res = e.residuals()
    assert len(res) == (16 if arch == "resnet50" else 24)
    assert all(r.A is not None and torch.isfinite(r.A).all() and (r.C >= 1 - 1e-6).all() for r in res)


def test_block_of():
    assert block_of("layer3.2.conv1") == "layer3.2"
    assert block_of("blocks.7.attn.qkv") == "blocks.7"
    assert block_of("stages.1.blocks.2.mlp", level=2) == "stages.1.blocks.2"
    assert block_of("head") is None and block_of("") is None


def test_exports(tmp_path):
    m = zoo.load("resnet")
    e = lrpgraph.Explainer(m)(zoo.load_samples(2)[0])
    g = e.graph()
    data = json.loads(json.dumps(to_node_link(g)))
    assert {n["id"] for n in data["nodes"]} == set(g.nodes)
    assert len(data["edges"]) == g.number_of_edges()
    write_json(g, str(tmp_path / "g.json"))
    write_graphml(g, str(tmp_path / "g.graphml"))
    back = nx.read_graphml(str(tmp_path / "g.graphml"))
    assert set(back.nodes) == set(g.nodes) and back.number_of_edges() == g.number_of_edges()
    r = e.conservation().rows[3]
    np.testing.assert_allclose(json.loads(back.nodes[r.name]["in_sum"]), r.in_sum.numpy(), rtol=1e-12)


def test_graph_needs_report():
    e = lrpgraph.Explainer(zoo.load("vgg"))(zoo.load_samples(1)[0], report=False)
    for fn in (e.graph, e.residuals, e.sinks):
        with pytest.raises(ValueError, match="report=True"):
            fn()
