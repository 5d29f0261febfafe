"""Transformers end to end: the SDPA rewrite, timm ViTs under every preset, conservation (spec 2.6-2.10).

Small image sizes and depths keep this fast; ``benchmarks/bench_vit.py`` runs the real configs.
"""
from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrpgraph
from lrpgraph.attention import attention_mask, scale_query
from lrpgraph.rules.attention import SOFTMAXES, AbsSoftmax
from lrpgraph.rules.transformer import ToFirst

PRESETS = ["abslrp", "abslrp-renorm", "lrp-0", "lrp-epsilon", "lrp-gamma", "lrp-alpha1beta0",
           "lrp-alpha2beta1", "epsilon-plus-flat", "epsilon-gamma-box"]


def vit(timm, name="vit_tiny_patch16_224", dtype=torch.float64, **kw):
    kw = {"img_size": 32, "depth": 2, **kw}
    return timm.create_model(name, pretrained=False, **kw).eval().to(dtype)


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [m.training for m in model.modules()], {n for n, _ in model.named_modules()})


def assert_unchanged(model, snap, x, out_before):
    state, flags, names = snapshot(model)
    assert names == snap[2]
    assert flags == snap[1]
    assert state.keys() == snap[0].keys()
    for k in state:
        assert torch.equal(state[k], snap[0][k]), k
    with torch.no_grad():
        assert torch.equal(model(x), out_before)


# ------------------------------------------------------------------------------------------
# the SDPA pass


class SDPAModel(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.out = nn.Linear(8, 3)
        self.mode = mode
        self.register_buffer("keep", torch.ones(5, 5, dtype=torch.bool).tril(1))
        self.register_buffer("bias", torch.linspace(-1, 1, 25).reshape(5, 5))

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        if self.mode == "plain":
            y = F.scaled_dot_product_attention(q, k, v)
        elif self.mode == "causal":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
        elif self.mode == "bool":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.keep)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias, dropout_p=0.0)
        return self.out(y.transpose(1, 2).reshape(B, N, 8).mean(1))


@pytest.mark.parametrize("mode", ["plain", "causal", "bool", "float"])
def test_sdpa_rewrite_is_explicit_and_exact(mode):
    m = SDPAModel(mode).eval().double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    ex = lrpgraph.Explainer(m)
    targets = [n.target for n in ex.graph_module.graph.nodes if n.op == "call_function"]
    assert F.scaled_dot_product_attention not in targets
    assert torch.softmax in targets and targets.count(torch.matmul) == 2
    assert (attention_mask in targets) == (mode != "plain")
    assert scale_query in targets
    with torch.no_grad():
        torch.testing.assert_close(ex.graph_module(x), m(x), rtol=0, atol=1e-5)
    e = ex(x)
    assert e.relevance.shape == x.shape and torch.isfinite(e.relevance).all()
    assert e.conservation().leaks(1e-5) == []


@pytest.mark.parametrize("batch", [3, 4])
def test_report_finds_the_batch_axis_when_another_axis_has_its_size(batch):
    """At batch 3 the qkv tensor is (3, B, H, N, d) = (3, 3, ...): the report must sum per sample
    over dim 1 there, not over the qkv axis (a size guess did), and show every node conserved."""
    m = SDPAModel("plain").eval().double()
    x = torch.randn(batch, 5, 8, dtype=torch.float64)
    # the paper-era softmax flips the sign of part of a stream (signs="flip"), which changes the
    # signed total; the conserving variant keeps it, so per-sample totals are exact checks here
    sm = AbsSoftmax("paper", signs="keep")
    ex = lrpgraph.Explainer(m, rules=lrpgraph.get_composite("abslrp").derive(table={k: sm for k in SOFTMAXES}))
    e = ex(x, contrastive=False)  # a one-signed start: per-sample sums are exact checks
    rep = e.conservation()
    assert rep.max_rel_error(masses=True) < 1e-9, rep.table()
    # per sample: the relevance that reached the input equals what started at the logits
    start = {r.name: r for r in rep}[ex._start_node.name]
    torch.testing.assert_close(start.in_sum[0], e.relevance.sum(dim=(1, 2)), rtol=1e-9, atol=1e-12)
    axes = next(iter(ex._axes.values()))
    permute = [n for n in ex.plan.nodes if n.op == "call_method" and n.target == "permute"]
    assert permute and all(axes[n] == 1 for n in permute)
    unbind = [n for n in ex.plan.nodes if n.op == "call_method" and n.target == "unbind"]
    assert unbind and all(axes[n] == (0, 0, 0) for n in unbind)


def test_sdpa_with_dropout_is_refused():
    class Drop(nn.Module):
        def forward(self, x):
            return F.scaled_dot_product_attention(x, x, x, dropout_p=0.1).sum(1)

    with pytest.raises(ValueError, match="dropout_p=0.1.*scaled_dot_product_attention|scaled_dot_product_attention.*dropout_p=0.1"):
        lrpgraph.Explainer(Drop().eval())


def test_vit_sdpa_graph_matches_model_logits(timm):
    """Fused timm attention (the default) is rewritten; logits equal the model's to 1e-5."""
    m = vit(timm, dtype=torch.float32)
    assert m.blocks[0].attn.fused_attn
    x = torch.randn(2, 3, 32, 32)
    ex = lrpgraph.Explainer(m)
    with torch.no_grad():
        err = (ex.graph_module(x) - m(x)).abs().max().item()
    assert err <= 1e-5
    e = ex(x, report=False)
    torch.testing.assert_close(e.logits, m(x).detach(), rtol=0, atol=1e-5)


def test_fused_and_unfused_attention_give_the_same_relevance(timm):
    m = vit(timm)
    unfused = copy.deepcopy(m)
    for blk in unfused.blocks:
        blk.attn.fused_attn = False
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for preset in ("abslrp", "abslrp-renorm", "lrp-epsilon"):
        a = lrpgraph.Explainer(m, rules=preset)(x, target=3).relevance
        # timm's unfused code scales q with a plain `q * scale` (the only mul in a ViT); give it the
        # attention-scale rule that the rewritten SDPA uses
        comp = lrpgraph.get_composite(preset).derive(table={operator.mul: ToFirst("attention scale")})
        b = lrpgraph.Explainer(unfused, rules=comp)(x, target=3).relevance
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------
# conservation and shapes


def test_vit_tiny_abslrp_conserves_every_node(timm):
    m = vit(timm)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    e = lrpgraph.Explainer(m, rules="abslrp")(x)
    rep = e.conservation()
    assert rep.leaks(1e-5) == [], rep.table()
    assert rep.max_rel_error(masses=True) < 1e-10  # the signed total and both sign masses, every node
    rules = {r.rule for r in rep}
    for want in ("abslrp.product[paper]", "abslrp.softmax[paper]", "abslrp.layernorm[paper]",
                 "abslrp.gelu[paper]", "attention scale", "abslrp.routing[paper](cat)",
                 "abslrp.routing[paper](unbind)", "abslrp.routing[paper](permute)"):
        assert want in rules, want
    pos = rep["pos_embed"]
    assert pos.by_design and "absorbed by a parameter" in pos.note
    assert float(pos.in_pos.abs().sum() + pos.in_neg.abs().sum()) > 0  # it does absorb a share
    assert "by design" in rep.table()
    assert e.relevance.shape == x.shape
    # the input map holds what reached the pixels: the target's mass minus what the position
    # embedding, the class token and the biases absorbed
    assert torch.isfinite(e.relevance).all() and float(e.relevance.abs().sum()) > 0


def test_vit_renorm_gives_unit_mass_per_operand(timm):
    """HEAD variant (spec 2.8): Q, K and V each reach the qkv projection with unit mass."""
    m = vit(timm, depth=1)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    g = lrpgraph.Explainer(m).graph_module.graph
    unbind = next(n for n in g.nodes if n.target == "unbind")
    q, k, v = [u.name for u in sorted(unbind.users, key=lambda u: u.args[1])]
    e = lrpgraph.Explainer(m, rules="abslrp-renorm")(x, keep=[q, k, v])
    for n in (q, k, v):
        mass = e.latent[n].abs().sum(dim=tuple(range(2, e.latent[n].dim())))
        torch.testing.assert_close(mass, torch.ones_like(mass))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_runs_on_vit(timm, preset):
    m = vit(timm, depth=1)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    e = lrpgraph.Explainer(m, rules=preset)(x, target=[1, 2])
    assert e.relevance.shape == x.shape
    assert torch.isfinite(e.relevance).all() and float(e.relevance.abs().sum()) > 0


@pytest.mark.parametrize("name,kw", [
    ("vit_small_patch16_224", {}),
    ("deit_small_patch16_224", {}),
    ("vit_base_patch16_224", {"depth": 1}),
    ("vit_tiny_patch16_224", {"global_pool": "avg", "class_token": False, "fc_norm": True}),
])
def test_timm_vits_explain_and_stay_unchanged(timm, name, kw):
    m = vit(timm, name, dtype=torch.float32, img_size=32, **kw)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = m(x)
    snap = snapshot(m)
    r = lrpgraph.explain(m, x, rules="abslrp")
    assert r.shape == x.shape and torch.isfinite(r).all()
    e = lrpgraph.Explainer(m, rules="abslrp")(x)
    assert e.conservation().max_rel_error() < 1e-4  # float32
    assert_unchanged(m, snap, x, before)


def test_avg_pool_vit_conserves(timm):
    m = vit(timm, global_pool="avg", class_token=False, fc_norm=True)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    e = lrpgraph.Explainer(m)(x)
    rep = e.conservation()
    assert rep.leaks(1e-5) == [], rep.table()
    assert any(r.op in ("torch.mean", "Tensor.mean") for r in rep)


@pytest.mark.parametrize("preset", ["abslrp", "abslrp-renorm"])
def test_fast_path_without_report_gives_the_same_relevance(timm, preset):
    """Without a report the paper-era sign split runs in one pass; the result must not change."""
    m = vit(timm, global_pool="avg", class_token=False, fc_norm=True)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ex = lrpgraph.Explainer(m, rules=preset)
    a = ex(x, report=True).relevance
    b = ex(x, report=False).relevance
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-13)
