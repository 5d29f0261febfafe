"""Graph-level patterns of real models, reproduced with tiny modules (issue 9, graphfix):

* a weight that is a buffer or a plain tensor, used through ``F.linear`` / ``F.conv2d`` (timm's
  csatv2 DCT stem): a constant of the affine op like a Parameter;
* a sum or mean over the dim a ``torch.stack`` created (efficientvim's and crossvit's heads): the
  sum of the stacked tensors, not a reduction over the batch;
* ``with torch.autocast(..., enabled=False)`` in the forward (efficientvit's LiteMLA): the export
  tracer inlines the region's subgraph;
* a cast to float32 inside a float64 model (LiteMLA's ``q.float()``): each rule works in the dtype
  of its node;
* ``one_hot(ids).to(table)`` (gemma4's position table): the export tracer keeps the cast's dtype.

Every test compares against an equivalent model written without the pattern, or checks
conservation, in float64.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrpgraph
from lrpgraph.export import ExportTraceError

DT = torch.float64
PRESETS = ["abslrp", "abslrp-renorm", "lrp-epsilon"]


def _same(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-10) -> None:
    scale = float(b.abs().max())
    assert scale > 0
    assert float((a - b).abs().max()) <= tol * scale


def _conserved(e, tol: float = 1e-5) -> None:
    rep = e.conservation()
    assert len(rep) > 0 and not rep.leaks(tol), "\n" + rep.table(tol)


# --------------------------------------------------------------------------------------------
# weights that are not Parameters


class ConstWeights(nn.Module):
    """A conv and a linear whose weights are buffers (``as_parameters=False``) or Parameters."""

    def __init__(self, as_parameters: bool):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        conv_w = torch.randn(4, 3, 3, 3, generator=g, dtype=DT)
        lin_w = torch.randn(5, 16, generator=g, dtype=DT)  # float64 already: .double() skips plain tensors
        if as_parameters:
            self.conv_w, self.lin_w = nn.Parameter(conv_w), nn.Parameter(lin_w)
        else:
            self.register_buffer("conv_w", conv_w)
            self.lin_w = lin_w  # a plain tensor attribute, neither Parameter nor buffer

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.conv_w, padding=1))
        x = F.adaptive_avg_pool2d(x, 2).flatten(1)
        return F.linear(x, self.lin_w)


@pytest.mark.parametrize("rules", PRESETS)
def test_buffer_and_tensor_weights_are_constants(rules):
    x = torch.randn(2, 3, 6, 6, dtype=DT, generator=torch.Generator().manual_seed(1))
    ref = lrpgraph.Explainer(ConstWeights(True).double().eval(), rules=rules)(x, target=1)
    for tracer in ("fx", "export"):
        e = lrpgraph.Explainer(ConstWeights(False).double().eval(), rules=rules, tracer=tracer)(x, target=1)
        _same(e.relevance, ref.relevance)
    if rules == "abslrp":
        _conserved(e)


# --------------------------------------------------------------------------------------------
# reductions over a stacked dim


class Ensemble(nn.Module):
    """Heads combined as ``stack(...).sum(0)`` and ``mean(stack(..., dim=0), dim=0)``, or written
    out as additions (``stacked=False``), which is what they compute."""

    def __init__(self, stacked: bool):
        super().__init__()
        self.stacked = stacked
        self.heads = nn.ModuleList(nn.Linear(6, 4) for _ in range(3))
        self.w = nn.Parameter(torch.tensor([0.5, 1.5, 2.0]))

    def forward(self, x):
        a = [self.w[i] * h(x) for i, h in enumerate(self.heads)]
        b = [h(x).relu() for h in self.heads]
        if self.stacked:
            return torch.stack(a).sum(0) + torch.mean(torch.stack(b, dim=0), dim=0, keepdim=True)[0]
        return (a[0] + a[1] + a[2]) + ((b[0] + b[1] + b[2]) / 3.0).unsqueeze(0)[0]


@pytest.mark.parametrize("rules", PRESETS)
@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_reduction_over_stacked_dim_is_a_sum(rules, tracer):
    torch.manual_seed(0)
    stacked = Ensemble(True).double().eval()
    written = Ensemble(False).double().eval()
    written.load_state_dict(stacked.state_dict())
    x = torch.randn(3, 6, dtype=DT)  # batch 3 = number of heads: dim 0 sizes cannot tell them apart
    e = lrpgraph.Explainer(stacked, rules=rules, tracer=tracer)(x)
    ref = lrpgraph.Explainer(written, rules=rules, tracer=tracer)(x)
    _same(e.relevance, ref.relevance)
    assert not any("stack" in n.name for n in lrpgraph.Explainer(stacked, rules=rules).plan.nodes)
    if rules == "abslrp":
        _conserved(e)


def test_reduction_over_batch_still_refused():
    class BatchSum(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            y = self.lin(x)
            return y + y.sum(0, keepdim=True)

    with pytest.raises(lrpgraph.RuleError, match="mixes"):
        lrpgraph.Explainer(BatchSum().double().eval())(torch.randn(2, 4, dtype=DT))


# --------------------------------------------------------------------------------------------
# autocast regions (export) and casts inside a float64 model


class AutocastOff(nn.Module):
    """Part of the forward under ``torch.autocast(enabled=...)``, with a module inside it."""

    def __init__(self, enabled: bool = False):
        super().__init__()
        self.enabled = enabled
        self.a, self.inner, self.b = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        y = self.a(x)
        with torch.autocast(device_type="cpu", enabled=self.enabled):  # fx: a literal device
            z = torch.relu(self.inner(y)) * 2.0
        return self.b(z + y)


@pytest.mark.parametrize("rules", PRESETS)
def test_export_inlines_autocast_region(rules):
    torch.manual_seed(0)
    m = AutocastOff().double().eval()
    x = torch.randn(2, 6, dtype=DT)
    ex = lrpgraph.Explainer(m, rules=rules, tracer="export")
    e = ex(x)
    _same(e.relevance, lrpgraph.Explainer(m, rules=rules, tracer="fx")(x).relevance)
    names = [n.name for n in ex.plan.nodes]
    assert "inner" in names and not any("autocast" in n for n in names)  # the module inside, by its path


def test_export_refuses_enabled_autocast():
    m = AutocastOff(enabled=True).double().eval()
    with pytest.raises(ExportTraceError, match="autocast"):
        lrpgraph.Explainer(m, tracer="export")(torch.randn(2, 6, dtype=DT))


class Float32Region(nn.Module):
    """LiteMLA's pattern: a float64 model computes a product of activations in float32."""

    def __init__(self):
        super().__init__()
        self.qk, self.head = nn.Linear(6, 8), nn.Linear(16, 3)

    def forward(self, x):
        q, k = self.qk(x).reshape(x.shape[0], 2, 4).float().unbind(1)
        att = q.unsqueeze(-1) @ k.relu().unsqueeze(-2)  # (B, 4, 4) in float32
        return self.head(att.flatten(1).to(x.dtype))


@pytest.mark.parametrize("rules", PRESETS + ["lrp-0"])
def test_cast_to_float32_inside_float64_model(rules):
    torch.manual_seed(0)
    m = Float32Region().double().eval()
    x = torch.randn(2, 6, dtype=DT)
    e = lrpgraph.Explainer(m, rules=rules, zero_bias=True)(x)
    assert e.relevance.dtype == DT and bool(torch.isfinite(e.relevance).all())
    if rules == "lrp-0":  # conserved to float32 rounding inside the region
        _conserved(e, tol=1e-4)


class OneHotTable(nn.Module):
    """gemma4's position table: ``one_hot(ids).to(table) @ table`` with integer position ids."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(5, 4))
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        ids = torch.arange(x.shape[1], device=x.device).clamp(max=4).expand(x.shape[0], -1)
        pos = F.one_hot(ids, num_classes=5).to(self.table) @ self.table
        return (self.lin(x) + pos).mean(1)


def test_export_keeps_dtype_of_cast_to_tensor():
    torch.manual_seed(0)
    m = OneHotTable().double().eval()
    x = torch.randn(2, 6, 4, dtype=DT)
    e = lrpgraph.Explainer(m, tracer="export")(x)
    _same(e.relevance, lrpgraph.Explainer(m, tracer="fx")(x).relevance)


class Float32Branch(nn.Module):
    """A residual branch computed in float32 inside a float64 model (abslrp-renorm's shortcut term
    takes the transposed Jacobian through it)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        y = self.a(x)
        q = y.float()
        att = q.unsqueeze(-1) @ q.relu().unsqueeze(-2)  # a product of float32 activations
        return self.b(y + att.mean(-1).to(x.dtype))


@pytest.mark.parametrize("rules", PRESETS)
def test_float32_residual_branch(rules):
    torch.manual_seed(0)
    e = lrpgraph.Explainer(Float32Branch().double().eval(), rules=rules)(torch.randn(2, 6, dtype=DT))
    assert e.relevance.dtype == DT and bool(torch.isfinite(e.relevance).all())
