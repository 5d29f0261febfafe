"""Named sinks close the books; residual ratios against a literal computation; zero_bias;
relevance per attention head."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lrpgraph
from lrpgraph import zoo
from lrpgraph.heads import plot_heads
from lrpgraph.residuals import plot_residuals, residual_table
from lrpgraph.sinks import books, by_kind, sink_table


@pytest.fixture(scope="module")
def bundled():
    x, _ = zoo.load_samples(2)
    return {name: zoo.load(name).double() for name in ("vgg", "resnet", "vit")}, x.double()


@pytest.mark.parametrize("rules", lrpgraph.composite_names())
def test_sinks_close_the_books(bundled, rules):
    models, x = bundled
    for name, m in models.items():
        e = lrpgraph.Explainer(m, rules=rules)(x)
        b = books(e)
        scale = max(1.0, float(np.abs(b["start"]).max()), *(float(np.abs(v).max()) for v in by_kind(e).values()))
        np.testing.assert_allclose(b["input"] + b["sinks"], b["start"], rtol=0, atol=1e-8 * scale,
                                   err_msg=f"{name} {rules}")
        if not any(e._plan.rules[n].renormalise for n in e._plan.rules):  # the input's relevance as returned
            got = e.relevance.reshape(2, -1).sum(1).double().numpy()
            np.testing.assert_allclose(b["input"].sum(0), got, rtol=1e-9, atol=1e-9 * scale)
    if rules == "abslrp-renorm":
        assert "renormalisation" in by_kind(e)
    if name == "vit":
        kinds = set(by_kind(e))
        assert "position embedding" in kinds, kinds
        # the paper preset gives the class token's slot nothing at the concat (its share moves to
        # the patch tokens, as the paper-era code does); every other preset absorbs it there
        assert ("token" in kinds) == (rules != "abslrp"), kinds
    assert "start relevance" in sink_table(e)


def test_zero_bias_conserves_lrp0():
    """LRP-0 with every bias zero loses nothing to biases; the model is not modified."""
    m = zoo.load("resnet").double()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = zoo.load_samples(2)[0].double()
    e = lrpgraph.Explainer(m, rules="lrp-0", zero_bias=True)(x, contrastive=False)
    b = books(e)
    start = b["start"]
    np.testing.assert_allclose(b["input"], start, rtol=1e-8)
    assert "bias" not in by_kind(e)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    plain = books(lrpgraph.Explainer(m, rules="lrp-0")(x, contrastive=False))
    assert np.abs(plain["input"] - plain["start"]).max() > 1e-3  # with biases, relevance is absorbed
    # the logits explained are those of the bias-free model
    z = lrpgraph.Explainer(m, rules="lrp-0", zero_bias=True)(x).logits
    assert not torch.allclose(z, m(x))


class TwoBranch(nn.Module):
    """out = a(x) + b(x): each summand is used by the addition only, so keep= sees R_in, R_up."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.a(x) + self.b(x))


@pytest.mark.parametrize("rules", ["abslrp", "lrp-epsilon", "lrp-0"])
def test_residual_ratios_literal(rules):
    m = TwoBranch().double().eval()
    x = torch.randn(3, 6, dtype=torch.float64)
    e = lrpgraph.Explainer(m, rules=rules)(x, keep=["a", "b", "add"])
    (r,) = e.residuals()
    assert r.name == "add" and list(r.inputs) == ["a", "b"]
    za, zb = m.a(x), m.b(x)
    C = (za.abs().sum(1) + zb.abs().sum(1)) / (za + zb).abs().sum(1)
    torch.testing.assert_close(r.C, C.detach(), rtol=1e-12, atol=0)
    Ra, Rb, Ro = (e.latent[k] for k in ("a", "b", "add"))
    A = (Ra.abs().flatten(2).sum(2) + Rb.abs().flatten(2).sum(2)) / Ro.abs().flatten(2).sum(2)
    torch.testing.assert_close(r.A, A, rtol=1e-10, atol=0)
    g = e.graph()
    np.testing.assert_allclose(g.nodes["add"]["A"], A.numpy(), rtol=1e-10)
    assert "add" in residual_table(e.residuals())
    assert [x.name for x in e.conservation().residuals] == ["add"]


def test_residual_plot(tmp_path):
    e = lrpgraph.Explainer(zoo.load("resnet"))(zoo.load_samples(1)[0])
    p = plot_residuals(e.residuals(), str(tmp_path / "a.png"), title="SmallResNet")
    assert (tmp_path / "a.png").stat().st_size > 1000 and p.endswith("a.png")


def test_heads(timm, tmp_path):
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    ex = lrpgraph.Explainer(m, rules="abslrp")
    e = ex(x, heads=True, keep=["head"])
    assert len(e.heads) == 12 and set(e.latent) == {"head"}
    name, h = next(iter(e.heads.items()))
    K = e.latent["head"].shape[0]
    assert h["map"].shape == (K, 2, 3, 5, 5) and h["per_head"].shape == (K, 2, 3)
    # per head sums to the relevance of the whole attn @ v output
    e2 = ex(x, keep=[h["output"]])
    torch.testing.assert_close(h["per_head"].sum(-1), e2.latent[h["output"]].flatten(2).sum(2))
    assert (tmp_path / "h.png").exists() is False
    plot_heads(e.heads, str(tmp_path / "h.png"), layers=list(e.heads)[:2])
    assert (tmp_path / "h.png").stat().st_size > 1000
    assert ex(x).heads == {}
