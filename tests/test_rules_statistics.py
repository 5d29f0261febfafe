"""Powers with a constant exponent, normalising statistics written out as graph nodes (an RMS
norm ``x * rsqrt(mean(x ** 2) + eps)``, a renormalisation ``a / a.sum(-1, keepdim=True)``) and
the attention scale on the scores, against literal float64 references, on both tracers (fx, and
torch.export through the ATen adapters: ``aten.pow``, ``aten.rsqrt``, ``aten.col2im``, ``aten.im2col``,
``aten.convolution`` transposed).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrpgraph
from lrpgraph.rules.activations import AbsPow, PowPassThrough
from lrpgraph.rules.attention import AbsMul, attention_scale
from lrpgraph.rules.statistics import statistic_slots
from test_rules_dense import B, DT, EPS, Lambda, check_abs, close, node_of, rel_like, capture


# --------------------------------------------------------------------------------------------
# x ** p


POWERS = {
    "square_op": (lambda t: t ** 2, 2.0),
    "pow_method": (lambda t: t.pow(3), 3.0),
    "torch.pow_half": (lambda t: torch.pow(t, 0.5), 0.5),
    "torch.square": (torch.square, 2.0),
    "reciprocal": (lambda t: t ** -1, -1.0),
}


@pytest.mark.parametrize("variant", ["head", "paper"])
@pytest.mark.parametrize("name", list(POWERS))
def test_pow_is_the_elementwise_rule(name: str, variant: str) -> None:
    """``x ** p``: the element-wise absLRP rule of ``f(x) = x^p``, ``x f'(x) = p x^p``; paper
    ``|p x^p| (1 + sign h)`` (magnitude form), head ``p x^p + p |x|^p``."""
    f, p = POWERS[name]
    x = torch.randn(B, 3, 4, dtype=DT)
    if p != int(p):
        x = x.abs() + 0.1  # a fractional power of a negative number is not real
    c = node_of(Lambda(f), x, lambda c: isinstance(c.rule, AbsPow))
    h = f(x)
    R = rel_like(h)
    out = AbsPow(variant)(c.ctx, R)
    xfx = p * x ** p  # x f'(x), literally
    g = xfx + p * x.abs() ** p if variant == "head" else xfx.abs() * (1 + torch.sign(h))
    check_abs(out, [torch.diag_embed(g.reshape(B, -1))], h.reshape(B, -1), R, variant, [0])


class StarReLU(nn.Module):
    """timm's metaformer activation: ``s * relu(x) ** 2 + b`` between two linear layers."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 3)
        self.scale = nn.Parameter(torch.tensor([0.8]))

    def forward(self, x):
        return self.fc2(self.scale * F.relu(self.fc1(x)) ** 2)


def test_starrelu_conserves_and_classic_passes_through() -> None:
    torch.manual_seed(0)
    m, x = StarReLU().to(DT).eval(), torch.randn(B, 5, dtype=DT)
    assert lrpgraph.Explainer(m, rules="abslrp")(x).conservation().max_rel_error() < 1e-9
    c = node_of(m, x, lambda c: isinstance(c.rule, PowPassThrough), "lrp-epsilon")
    R = rel_like(c.ctx.output if c.ctx.output is not None else torch.zeros(B, 6, dtype=DT))
    close(c.rule(c.ctx, R)[0], R)  # identity, as for every element-wise activation
    for preset in ("abslrp-renorm", "lrp-epsilon", "lrp-gamma"):
        assert torch.isfinite(lrpgraph.Explainer(m, rules=preset)(x).relevance).all()


@pytest.mark.parametrize("preset", ["abslrp", "lrp-epsilon"])
def test_pow_with_a_tensor_exponent_is_refused_by_name(preset: str) -> None:
    m = nn.Sequential(nn.Linear(3, 3), Lambda(lambda t: 2.0 ** t), nn.Linear(3, 2)).to(DT).eval()
    with pytest.raises(Exception, match="tensor exponent"):
        lrpgraph.Explainer(m, rules=preset)(torch.randn(B, 3, dtype=DT))


# --------------------------------------------------------------------------------------------
# statistics as constant gates


class RMSNorm(nn.Module):
    """timm's ``rms_norm2d`` written out: ``x * rsqrt(mean(x^2, C) + eps) * w``."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4, 3)
        self.w = nn.Parameter(torch.linspace(-1, 1.5, 4))

    def forward(self, x):
        x = self.conv(x)
        v = x.pow(2).mean(1, keepdim=True)
        x = x * torch.rsqrt(v + 1e-5) * self.w.reshape(1, -1, 1, 1)
        return self.head(x.mean((2, 3)))


class SumNormalised(nn.Module):
    """convit's attention renormalisation: ``a / a.sum(-1, keepdim=True)`` of positive scores."""

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = inplace
        self.fc, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        a = torch.sigmoid(self.fc(x))
        if self.inplace:
            a /= a.sum(dim=-1).unsqueeze(-1)
        else:
            a = a / a.sum(-1, keepdim=True)
        return self.head(a)


def _gate_node(model: nn.Module, x, preset: str):
    """The product/division node whose second operand is a statistic of the first."""
    hits = [c for c in capture(model, x, preset) if statistic_slots(c.ctx)]
    assert len(hits) == 1, [c.node.name for c in hits]
    return hits[0]


@pytest.mark.parametrize("variant", ["head", "paper"])
@pytest.mark.parametrize("case", ["rms", "sum", "sum_inplace"])
def test_statistic_is_a_constant_gate_abslrp(case: str, variant: str) -> None:
    """absLRP: ``x * c`` with the statistic ``c`` constant: ``r_x = 2 (c x)+ S`` (the scaling
    rule), nothing to the statistic's branch."""
    torch.manual_seed(1)
    m = (RMSNorm() if case == "rms" else SumNormalised(case == "sum_inplace")).to(DT).eval()
    x = torch.randn((B, 3, 5, 5) if case == "rms" else (B, 4), dtype=DT)
    preset = "abslrp" if variant == "paper" else "abslrp-renorm"
    c = _gate_node(m, x, preset)
    xs, stat = c.ctx.inputs
    assert statistic_slots(c.ctx) == [1]
    gate = stat if case == "rms" else 1 / stat  # rsqrt(mean(x^2) + eps) | the sum
    h = c.ctx.output
    R = rel_like(h)
    out = c.rule(c.ctx, R)
    assert out[1] is None  # the statistic takes no relevance
    g = 2 * (gate * xs).clamp(min=0)
    check_abs(out, [torch.diag_embed(g.reshape(B, -1))], h.reshape(B, -1), R, variant, [0])


@pytest.mark.parametrize("case", ["rms", "sum"])
def test_statistic_gate_classic_is_identity_and_paper_conserves(case: str) -> None:
    torch.manual_seed(2)
    m = (RMSNorm() if case == "rms" else SumNormalised()).to(DT).eval()
    x = torch.randn((B, 3, 5, 5) if case == "rms" else (B, 4), dtype=DT)
    c = _gate_node(m, x, "lrp-epsilon")
    R = rel_like(c.ctx.output if c.ctx.output is not None else torch.zeros(c.ctx.output_shape, dtype=DT))
    out = c.rule(c.ctx, R)
    close(out[0], R)
    assert out[1] is None
    e = lrpgraph.Explainer(m, rules="abslrp")(x)
    assert e.conservation().max_rel_error() < 1e-9


def test_a_learned_gate_is_not_a_statistic() -> None:
    """Squeeze-excitation ``x * sigmoid(fc(mean(x)))`` has a weighted layer on the gate's path:
    it stays a product of two activations (the product rule)."""
    from test_rules_ops import Gate
    x = torch.randn(B, 3, 6, 6, dtype=DT)
    muls = [c for c in capture(Gate().to(DT).eval(), x) if c.node.name.startswith("mul")]
    assert muls and all(statistic_slots(c.ctx) == [] for c in muls)


class DivByActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.a(x) / torch.sigmoid(self.b(x)))


@pytest.mark.parametrize("preset", ["abslrp", "abslrp-renorm", "lrp-epsilon"])
def test_division_by_an_activation_that_is_not_a_statistic_is_refused(preset: str) -> None:
    with pytest.raises(Exception, match="divides by an activation"):
        lrpgraph.Explainer(DivByActivation().to(DT).eval(), rules=preset)(torch.randn(B, 3, dtype=DT))


class LinearAttention(nn.Module):
    """timm's EfficientViT ``LiteMLA``: ``v`` padded with a column of ``value``, then
    ``out = q @ (k^T @ v)`` and ``out[..., :-1] / (out[..., -1:] + eps)``. ``how`` breaks it:
    ``"zero"`` pads zeros, ``"left"`` pads only left factors (the product's columns are tokens),
    ``"overlap"`` divides by a column of v."""

    def __init__(self, how: str = "ok"):
        super().__init__()
        self.how = how
        self.qkv, self.head = nn.Linear(4, 12), nn.Linear(4, 3)

    def forward(self, x):
        q, k, v = F.relu(self.qkv(x)).chunk(3, -1)
        if self.how == "left":
            out = F.pad(q, (0, 1), value=1.0) @ F.pad(k, (0, 1), value=1.0).transpose(-1, -2)  # 5 tokens
            return self.head(out[..., :-1] / (out[..., -1:] + 1e-3)).mean(1)
        v = F.pad(v, (0, 1), mode="constant", value=0.0 if self.how == "zero" else 2.0)
        out = q.double() @ (k.transpose(-1, -2) @ v).contiguous()
        den = out[..., -2:-1] if self.how == "overlap" else out[..., -1:]
        return self.head(out[..., :-1] / (den + 1e-3)).mean(1)


@pytest.mark.parametrize("preset", ["abslrp", "abslrp-renorm", "lrp-epsilon"])
def test_normaliser_computed_in_the_same_product_is_a_constant_gate(preset: str) -> None:
    """Linear attention's ``M @ v / (c * rowsum(M))``: the denominator is held constant (the
    scaling rule on the numerator, nothing to the denominator's slice), literally in float64."""
    torch.manual_seed(3)
    m = LinearAttention().to(DT).eval()
    x = torch.randn(B, 5, 4, dtype=DT)
    c = _gate_node(m, x, preset)
    num, den = c.ctx.inputs
    assert statistic_slots(c.ctx) == [1]
    q, k, v = F.relu(m.qkv(x)).chunk(3, -1)
    scores = q @ k.transpose(-1, -2)
    close(den, 2.0 * scores.sum(-1, keepdim=True) + 1e-3)  # the normaliser: c * rowsum(M) + eps
    h = c.ctx.output
    R = rel_like(h)
    out = c.rule(c.ctx, R)
    assert out[1] is None
    if preset == "lrp-epsilon":
        close(out[0], R)
    else:
        g = 2 * (num / den).clamp(min=0)
        check_abs(out, [torch.diag_embed(g.reshape(B, -1))], h.reshape(B, -1), R,
                  "paper" if preset == "abslrp" else "head", [0])
    e = lrpgraph.Explainer(m, rules="abslrp")(x)
    assert e.conservation().max_rel_error() < 1e-9
    ee = lrpgraph.Explainer(m, rules=preset, tracer="export")(x)
    close(ee.relevance, lrpgraph.Explainer(m, rules=preset, tracer="fx")(x).relevance)


@pytest.mark.parametrize("how", ["zero", "left", "overlap"])
def test_a_slice_of_the_same_product_that_is_no_normaliser_is_refused(how: str) -> None:
    """Zero padding, ones padded to the left factor, or a divisor column that is not a padded
    one: no normaliser of the numerator, so the division by an activation is refused."""
    with pytest.raises(Exception, match="divides by an activation"):
        lrpgraph.Explainer(LinearAttention(how).to(DT).eval(), rules="lrp-epsilon")(torch.randn(B, 5, 4, dtype=DT))


# --------------------------------------------------------------------------------------------
# the attention scale on the scores


class ScoresScaled(nn.Module):
    """timm's non-fused attention: ``softmax((q @ k^T) * scale) @ v``; ``after`` puts the scale
    after the softmax instead (an ordinary scaling by a constant)."""

    def __init__(self, after: bool = False):
        super().__init__()
        self.after = after
        self.qkv, self.head = nn.Linear(4, 12), nn.Linear(4, 3)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        s = q @ k.transpose(-2, -1)
        a = s.softmax(-1) * 0.5 if self.after else (s * 0.5).softmax(-1)
        return self.head((a @ v).mean(1))


@pytest.mark.parametrize("preset", ["abslrp", "abslrp-renorm"])
def test_attention_scale_on_the_scores_passes_relevance_through(preset: str) -> None:
    torch.manual_seed(4)
    m, x = ScoresScaled().to(DT).eval(), torch.randn(B, 5, 4, dtype=DT)
    c = node_of(m, x, lambda c: isinstance(c.rule, AbsMul), preset)
    assert attention_scale(c.ctx)
    R = rel_like(c.ctx.output)
    out = c.rule(c.ctx, R)
    assert out[0] is R and out[1:] == [None] * (len(out) - 1)
    if preset == "abslrp":
        rep = lrpgraph.Explainer(m, rules=preset)(x).conservation()
        assert rep.max_rel_error() < 1e-9 and not rep.losses(1e-5)


def test_a_scale_after_the_softmax_is_the_scaling_rule() -> None:
    torch.manual_seed(5)
    m, x = ScoresScaled(after=True).to(DT).eval(), torch.randn(B, 5, 4, dtype=DT)
    c = node_of(m, x, lambda c: isinstance(c.rule, AbsMul))
    assert not attention_scale(c.ctx)
    xs, h = c.ctx.inputs[0], c.ctx.output
    R = rel_like(h)
    g = 2 * (0.5 * xs).clamp(min=0)
    check_abs(c.rule(c.ctx, R), [torch.diag_embed(g.reshape(B, -1))], h.reshape(B, -1), R, "paper", [0])


# --------------------------------------------------------------------------------------------
# the export path: the same rules through the ATen adapters


class NewOps(nn.Module):
    """StarReLU, an RMS norm, a transposed convolution and a fold, in one small model."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.up = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1)
        self.cols = nn.Conv2d(4, 4 * 4, 1)
        self.norm = RMSNorm()
        self.head = nn.Linear(4, 5)
        self.w = nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, x):
        h = F.relu(self.conv(x)) ** 2                                  # aten.pow
        h = self.up(h)                                                 # aten.convolution, transposed
        v = h.pow(2).mean(1, keepdim=True)
        h = h * torch.rsqrt(v + 1e-6) * self.w.reshape(1, -1, 1, 1)    # aten.rsqrt
        cols = F.unfold(self.cols(h), 1)                               # (B, 4 * 2 * 2, L), aten.im2col
        n = h.shape[-1]
        h = F.fold(cols, (n + 1, n + 1), 2)                            # aten.col2im
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("preset", ["abslrp", "abslrp-renorm", "lrp-epsilon"])
def test_new_ops_export_path_equals_fx_path(preset: str) -> None:
    torch.manual_seed(3)
    m = NewOps().to(DT).eval()
    x = torch.randn(B, 3, 9, 9, dtype=DT)
    ef = lrpgraph.Explainer(m, rules=preset, tracer="fx")(x, target=[0, 3])
    ee = lrpgraph.Explainer(m, rules=preset, tracer="export")(x, target=[0, 3])
    close(ee.relevance, ef.relevance, rtol=1e-9, atol=1e-12)
    ops = " ".join(r.op for r in ee.conservation())
    assert "aten" not in ops  # the torch-level rules served every op
    if preset == "abslrp":
        assert ee.conservation().max_rel_error() < 1e-9
