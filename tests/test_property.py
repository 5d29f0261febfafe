"""Property tests on random small networks (hypothesis): conservation through whole graphs.

Random MLPs and CNNs with residual additions (``x = x + f(x)``), BatchNorm, ReLU and average
pooling, in float64:

* preset ``abslrp`` (paper-era sign split): at every node of ``Explanation.conservation()`` the
  positive and the negative relevance mass that came in leave again, and the input map's total
  equals the start's total;
* preset ``lrp-0`` with every bias, BN running mean and BN beta zero: the input relevance sums to
  the start relevance (the target logit, ``contrastive=False``), and every node keeps the total.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import lrpgraph

DT = torch.float64
B, C_OUT = 2, 3
TOL = 1e-5

MLP_BLOCKS = ("linear", "relu", "bn", "residual", "residual_bn")
CNN_BLOCKS = ("conv", "relu", "bn", "residual", "avgpool")


class Residual(nn.Module):
    """``x + f(x)``: a residual addition with a fan-out of x."""

    def __init__(self, f: nn.Module):
        super().__init__()
        self.f = f

    def forward(self, x):
        return x + self.f(x)


@dataclass
class Arch:
    kind: str  # "mlp" or "cnn"
    width: int
    blocks: List[str]
    seed: int


@st.composite
def architectures(draw) -> Arch:
    """A random small architecture description."""
    kind = draw(st.sampled_from(["mlp", "cnn"]))
    blocks = draw(st.lists(st.sampled_from(MLP_BLOCKS if kind == "mlp" else CNN_BLOCKS),
                           min_size=1, max_size=4))
    return Arch(kind, draw(st.integers(4, 8)), blocks, draw(st.integers(0, 2 ** 31 - 1)))


def _bn(n: int, dims: int, zero_shift: bool) -> nn.Module:
    """A BatchNorm in eval mode with random statistics and signed gamma (no shift if asked)."""
    bn = (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(n).to(DT)
    with torch.no_grad():
        bn.running_var.copy_(torch.rand(n, dtype=DT) + 0.5)
        bn.weight.copy_(torch.randn(n, dtype=DT) + 1.0)  # signed, mostly positive like trained nets
        if not zero_shift:
            bn.running_mean.copy_(0.5 * torch.randn(n, dtype=DT))
            bn.bias.copy_(0.3 * torch.randn(n, dtype=DT))
    return bn


def build(arch: Arch, zero_bias: bool) -> tuple:
    """The model (eval, float64) and an input batch for ``arch``."""
    torch.manual_seed(arch.seed)
    w = arch.width
    if arch.kind == "mlp":
        layers: list = [nn.Linear(5, w)]
        for b in arch.blocks:
            if b == "linear":
                layers.append(nn.Linear(w, w))
            elif b == "relu":
                layers.append(nn.ReLU())
            elif b == "bn":
                layers.append(_bn(w, 1, zero_bias))
            elif b == "residual":
                layers.append(Residual(nn.Sequential(nn.Linear(w, w), nn.ReLU())))
            else:
                layers.append(Residual(nn.Sequential(nn.Linear(w, w), _bn(w, 1, zero_bias), nn.ReLU())))
        layers.append(nn.Linear(w, C_OUT))
        x = torch.randn(B, 5, dtype=DT)
    else:
        side = 4
        layers = [nn.Conv2d(2, w, 3, padding=1)]
        for b in arch.blocks:
            if b == "conv":
                layers.append(nn.Conv2d(w, w, 3, padding=1))
            elif b == "relu":
                layers.append(nn.ReLU())
            elif b == "bn":
                layers.append(_bn(w, 2, zero_bias))
            elif b == "residual":
                layers.append(Residual(nn.Sequential(nn.Conv2d(w, w, 3, padding=1),
                                                     _bn(w, 2, zero_bias), nn.ReLU())))
            elif side >= 2:  # avgpool while the map is large enough
                layers.append(nn.AvgPool2d(2))
                side //= 2
        layers += [nn.Flatten(), nn.Linear(w * side * side, C_OUT)]
        x = torch.randn(B, 2, 4, 4, dtype=DT)
    model = nn.Sequential(*layers).to(DT).eval()
    if zero_bias:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
                    m.bias.zero_()
    return model, x


SETTINGS = dict(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@settings(**SETTINGS)
@given(arch=architectures(), contrastive=st.booleans(), target=st.one_of(st.none(), st.integers(0, C_OUT - 1)))
def test_abslrp_conserves_both_signs_at_every_node(arch: Arch, contrastive: bool, target) -> None:
    model, x = build(arch, zero_bias=False)
    e = lrpgraph.Explainer(model, rules="abslrp")(x, target=target, contrastive=contrastive)
    rows = list(e.conservation())
    assert rows, "the report is empty"
    # a sign's mass is lost only if no input of a node makes a positive contribution to the outputs
    # that carry it (the rule has nothing to route it to); such draws say nothing about the rules
    assume(not any(bool(((r.in_pos > 0) & (r.out_pos == 0)).any()) or
                   bool(((r.in_neg < 0) & (r.out_neg == 0)).any()) for r in rows))
    for r in rows:
        scale = r.in_pos + r.in_neg.abs()
        assert bool(((r.in_pos - r.out_pos).abs() <= TOL * scale).all()), f"positive mass leaks at {r.name}"
        assert bool(((r.in_neg - r.out_neg).abs() <= TOL * scale).all()), f"negative mass leaks at {r.name}"
        assert bool(((r.in_sum - r.out_sum).abs() <= TOL * scale).all()), f"total leaks at {r.name}"
    assert e.conservation().max_rel_error(masses=True) < TOL
    # the input map keeps the start's total: +1 on the target, -1/(C-1) on the others (sum 0), or
    # the one-hot (sum 1)
    start_total = 0.0 if contrastive else 1.0
    got = e.relevance.reshape(B, -1).sum(1)
    assert torch.allclose(got, torch.full_like(got, start_total), atol=TOL * 2), got
    # and the positive mass of the start (1) reaches the input up to what cancels on the way
    assert bool((e.relevance.reshape(B, -1).clamp(min=0).sum(1) <= 1 + TOL).all())


@settings(**SETTINGS)
@given(arch=architectures(), target=st.integers(0, C_OUT - 1))
def test_lrp0_without_biases_conserves_the_logit(arch: Arch, target: int) -> None:
    model, x = build(arch, zero_bias=True)
    e = lrpgraph.Explainer(model, rules="lrp-0")(x, target=target, contrastive=False)
    logit = e.logits[:, target]
    with torch.no_grad():
        assert torch.allclose(model(x)[:, target], logit)
    got = e.relevance.reshape(B, -1).sum(1)
    # z-rule with zero biases: the sum is kept exactly (up to the 1e-12 division guard and
    # rounding, which scale with the relevance's absolute mass)
    mass = e.relevance.reshape(B, -1).abs().sum(1) + logit.abs()
    assert bool(((got - logit).abs() <= 1e-8 * mass).all()), (got, logit)
    assert e.conservation().max_rel_error() < 1e-8
