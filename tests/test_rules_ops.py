"""The op-family rules (activations, arithmetic, normalization, pooling, routing) against slow
literal references in float64, with the helpers of ``test_rules_dense``: dense matrices from unit
basis vectors for the linear ops, explicit element-wise gains, loops for max reductions, and the
vector-Jacobian product for the routing ops (autograd is the reference only; rules never use it).
"""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrpgraph
from lrpgraph.rules import abslrp as A
from lrpgraph.rules import activations as ACT
from lrpgraph.rules import classic as C
from lrpgraph.rules.normalization import AbsBatchNormF, AbsGroupNorm, AbsRmsNorm
from lrpgraph.rules.structural import PassThrough
from lrpgraph.rules.pooling import AbsMaxReduce, MaxReduceWinner
from lrpgraph.rule import Absorbed
from lrpgraph.rules.routing import IndexRoute
from lrpgraph.rules.arithmetic import AbsSub, SubEpsilon
from test_rules_dense import (B, DT, EPS, K, Lambda, affine_G, autograd_derivative, capture, check_abs, close,
                              dense_op, node_of, not_structural, rel_like, split_parts)


def _bn_f():
    """A module that calls F.batch_norm in eval mode, as timm's BatchNormAct2d does."""
    bn = nn.BatchNorm2d(3).to(DT).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()

    class FBatchNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = bn

        def forward(self, x):
            b = self.bn
            return F.batch_norm(x, b.running_mean, b.running_var, b.weight, b.bias, False, 0.1, b.eps)
    return FBatchNorm()


#: linear ops described for the affine rules: (module factory, input shape)
LINEAR_CASES = {
    "avgpool_ceil": (lambda: nn.AvgPool2d(3, stride=2, ceil_mode=True), (B, 2, 6, 7)),
    "avgpool_nocount": (lambda: nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), (B, 2, 7, 6)),
    "avgpool_ceil_nocount": (lambda: nn.AvgPool2d(2, stride=2, padding=1, ceil_mode=True,
                                                  count_include_pad=False), (B, 2, 5, 6)),
    "avgpool_divisor": (lambda: nn.AvgPool2d(2, divisor_override=3), (B, 2, 4, 5)),
    "f.avg_pool1d_ceil": (lambda: Lambda(lambda x: F.avg_pool1d(x, 3, 2, 1, True, False)), (B, 2, 8)),
    "sum23": (lambda: Lambda(lambda x: x.sum((2, 3))), (B, 3, 4, 5)),
    "torch.sum_keep": (lambda: Lambda(lambda x: torch.sum(x, dim=-1, keepdim=True)), (B, 3, 4)),
    "bilinear": (lambda: Lambda(lambda x: F.interpolate(x, scale_factor=2, mode="bilinear")), (B, 2, 3, 4)),
    "bilinear_ac": (lambda: Lambda(lambda x: F.interpolate(x, size=(5, 7), mode="bilinear", align_corners=True)),
                    (B, 2, 3, 4)),
    "upsample_nearest": (lambda: nn.Upsample(scale_factor=2), (B, 2, 3, 3)),
    "linear1d": (lambda: Lambda(lambda x: F.interpolate(x, size=7, mode="linear")), (B, 2, 4)),
    # bicubic: signed separable matrices (negative lobes), up, down and mixed, with and without corners
    "bicubic": (lambda: Lambda(lambda x: F.interpolate(x, size=(5, 7), mode="bicubic")), (B, 2, 3, 4)),
    "bicubic_down_ac": (lambda: Lambda(lambda x: F.interpolate(x, scale_factor=0.5, mode="bicubic",
                                                               align_corners=True)), (B, 2, 6, 5)),
    "upsample_bicubic": (lambda: nn.Upsample(scale_factor=(1.5, 0.7), mode="bicubic"), (B, 2, 4, 9)),
    "f.batch_norm": (_bn_f, (B, 3, 4, 4)),
    "f.fold_overlap": (lambda: Lambda(lambda x: F.fold(x, (5, 4), 3, padding=1)), (B, 2 * 9, 20)),
    "nn.fold_strided": (lambda: nn.Fold((5, 6), (2, 3), dilation=(2, 1), stride=(1, 2)), (B, 3 * 6, 6)),
}


def _linear_node(case: str, preset: str = "abslrp-renorm"):
    make, shape = LINEAR_CASES[case]
    m = make()
    x = torch.randn(shape, dtype=DT)
    c = node_of(m, x, not_structural, preset)
    W, b = dense_op(lambda t: m(t), shape[1:])
    with torch.no_grad():
        h = m(x)
    close(x.reshape(B, -1) @ W.T + b, h.reshape(B, -1))  # the reference reproduces the op
    return x, c, W, b, h


@pytest.mark.parametrize("variant", ["head", "paper"])
@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_abs_affine_new_linear_ops(case: str, variant: str) -> None:
    x, c, W, _, h = _linear_node(case)
    R = rel_like(h)
    out = A.AbsAffine(variant)(c.ctx, R)
    assert all(o is None for o in out[1:])  # statistics, weights: no relevance
    check_abs(out, [affine_G(x, W)], h.reshape(B, -1), R, variant, [0])


@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_epsilon_new_linear_ops(case: str) -> None:
    """Classic presets: R_i = sum_j x_i w_ji R_j / (z_j + eps sign z_j)."""
    x, c, W, _, h = _linear_node(case, "lrp-epsilon")
    assert isinstance(c.rule, C.Epsilon)
    R = rel_like(h)
    out = c.rule(c.ctx, R)
    hf = h.reshape(B, -1)
    z = hf + 1e-6 * torch.where(hf >= 0, 1.0, -1.0)
    for k in range(K):
        for b in range(B):
            ref = x[b].reshape(-1) * (W.T @ (R[k, b].reshape(-1) / z[b]))
            close(out[0][k, b].reshape(-1), ref)


def test_batch_norm_functional_paper_two_stage_matches_module() -> None:
    """abslrp: F.batch_norm takes the BatchNorm module's two-stage rule, to the last bit."""
    m = _bn_f()
    x = torch.randn(B, 3, 4, 4, dtype=DT)
    c = node_of(m, x, not_structural, "abslrp")
    assert isinstance(c.rule, AbsBatchNormF)
    cm = node_of(m.bn, x, not_structural, "abslrp")
    assert isinstance(cm.rule, A.AbsBatchNormTwoStage)
    R = rel_like(c.ctx.output)
    close(split_parts(c.rule(c.ctx, R)[0])[0], split_parts(cm.rule(cm.ctx, R)[0])[0])
    # literal: the product of the two stages' gains 2 x+ / sigma / |h1| and 2 (g h1)+ / |h|
    bn = m.bn
    sh = (1, -1, 1, 1)
    sigma = (bn.running_var + bn.eps).sqrt().reshape(sh)
    h1 = (x - bn.running_mean.reshape(sh)) / sigma
    h = c.ctx.output
    g = 2 * x.clamp(min=0) / sigma / (h1.abs() + EPS) * 2 * (bn.weight.reshape(sh) * h1).clamp(min=0)
    check_abs(c.rule(c.ctx, R), [torch.diag_embed(g.reshape(B, -1))], h.reshape(B, -1), R, "paper", [0])


# --------------------------------------------------------------------------------------------
# activations


NEW_ACTS = {
    "relu6": (nn.ReLU6(), F.relu6),
    "hardsigmoid": (nn.Hardsigmoid(), F.hardsigmoid),
    "hardswish": (nn.Hardswish(), F.hardswish),
    "mish": (nn.Mish(), F.mish),
    "f.hardtanh": (Lambda(F.hardtanh), F.hardtanh),
    "neg": (Lambda(lambda t: -t), lambda t: -t),
    "sigmoid": (nn.Sigmoid(), torch.sigmoid),
}


@pytest.mark.parametrize("name", [n for n in ACT.ACTIVATIONS] + list(ACT.GATES))
def test_new_derivatives_match_autograd(name: str) -> None:
    f, df, _ = {**ACT.ACTIVATIONS, **ACT.GATES}[name]
    x = torch.linspace(-7, 7, 141, dtype=DT)
    x = x[(x.abs() - 3).abs() > 1e-9]  # the kinks at +-3 (and 0, 6, +-1 below)
    x = x[(x != 0) & (x != 6) & (x.abs() != 1)]
    # PyTorch's hardsigmoid / hardswish backward uses 1/6 rounded to float32 (5e-9 off): our 1/6 is exact
    close(df(x), autograd_derivative(f, x), rtol=1e-7)


@pytest.mark.parametrize("variant", ["head", "paper"])
@pytest.mark.parametrize("name", list(NEW_ACTS))
def test_new_activations(name: str, variant: str) -> None:
    m, f = NEW_ACTS[name]
    x = torch.randn(B, 3, 4, dtype=DT) * 3
    c = node_of(m, x, not_structural)
    assert isinstance(c.rule, A.AbsElementwise)
    rule = type(c.rule)(c.rule.f, c.rule.df, variant, label=c.rule.label)
    with torch.no_grad():
        h = f(x)
    R = rel_like(h)
    out = rule(c.ctx, R)
    # hardsigmoid / hardswish: PyTorch's backward rounds 1/6 to float32, so take the explicit
    # derivative (checked against autograd above); autograd for the others
    deriv = rule.df if name in ("hardsigmoid", "hardswish") else (lambda t: autograd_derivative(f, t))
    d = deriv(x)
    if variant == "head":
        g = x * d + x.abs() * deriv(x.abs())
    elif name == "sigmoid" or name == "hardsigmoid":  # the gates keep the stream's sign: magnitude
        g = (x * d).abs() * (1 + torch.sign(h))
    else:
        g = x * d * (1 + torch.sign(h))
    check_abs(out, [torch.diag_embed(g.reshape(B, -1))], h.reshape(B, -1), R, variant, [0])


class Clip(nn.Module):
    """A clamp by buffer bounds (timm's ``Gemma4ClippableLinear``), by numbers, or by one side."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.register_buffer("lo", torch.tensor([-1.0, -0.5, -2.0, -3.0], dtype=DT))
        self.register_buffer("hi", torch.tensor(1.5, dtype=DT))

    def forward(self, t):
        if self.how == "buffers":
            return torch.clamp(t, self.lo, self.hi)
        if self.how == "numbers":
            return t.clamp(min=-1.0, max=2.0)
        return torch.clamp_min(t, -0.5)

    def bounds(self):
        return {"buffers": (self.lo, self.hi), "numbers": (-1.0, 2.0), "min": (-0.5, float("inf"))}[self.how]


@pytest.mark.parametrize("variant", ["head", "paper", "classic"])
@pytest.mark.parametrize("how", ["buffers", "numbers", "min"])
def test_clamp_with_constant_bounds(how: str, variant: str) -> None:
    m = Clip(how)
    x = torch.randn(B, 3, 4, dtype=DT) * 2
    c = node_of(m, x, lambda c: isinstance(c.rule, (ACT.AbsClamp, ACT.ClampPassThrough)),
                "lrp-epsilon" if variant == "classic" else "abslrp")
    h = c.ctx.output
    R = rel_like(h)
    if variant == "classic":
        close(c.rule(c.ctx, R)[0], R)
        return
    out = ACT.AbsClamp(variant)(c.ctx, R)
    lo, hi = (torch.as_tensor(b, dtype=DT).expand(4) for b in m.bounds())
    f = lambda v, j: min(max(v, lo[j].item()), hi[j].item())  # noqa: E731
    d = lambda v, j: 1.0 if lo[j].item() < v < hi[j].item() else 0.0  # noqa: E731
    g = torch.zeros_like(x)
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in x.shape)).tolist():
        v, j = x[tuple(idx)].item(), idx[-1]
        y = f(v, j)
        assert h[tuple(idx)].item() == y
        if variant == "head":
            g[tuple(idx)] = v * d(v, j) + abs(v) * d(abs(v), j)
        else:
            g[tuple(idx)] = v * d(v, j) * (1 + (y > 0) - (y < 0))
    check_abs(out, [torch.diag_embed(g.reshape(B, -1))], h.reshape(B, -1), R, variant, [0])


@pytest.mark.parametrize("preset", ["abslrp", "lrp-epsilon"])
def test_clamp_by_an_activation_is_refused_by_name(preset: str) -> None:
    m = nn.Sequential(nn.Linear(4, 4), Lambda(lambda t: torch.clamp(t, t.mean(-1, keepdim=True)))).to(DT).eval()
    with pytest.raises(Exception, match="clamp whose bound is an activation"):
        lrpgraph.explain(m, torch.randn(B, 4, dtype=DT), rules=preset)


class Gate(nn.Module):
    """Squeeze-excitation: ``x * sigmoid(fc(mean(x)))``."""

    def __init__(self, act=nn.Sigmoid):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Conv2d(4, 4, 1)
        self.act = act()
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        x = F.relu(self.conv(x))
        x = x * self.act(self.fc(x.mean((2, 3), keepdim=True)))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("act", [nn.Sigmoid, nn.Hardsigmoid])
def test_gate_conserves_both_streams(act) -> None:
    """The squeeze-excitation leak (relative error ~1): conserved at every node now."""
    torch.manual_seed(0)
    e = lrpgraph.Explainer(Gate(act).to(DT).eval(), rules="abslrp")(torch.randn(B, 3, 6, 6, dtype=DT))
    assert e.conservation().max_rel_error() < 1e-9


# --------------------------------------------------------------------------------------------
# subtraction


class Sub(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.p = nn.Parameter(torch.randn(4, dtype=DT))

    def forward(self, x):
        a, b = x.relu() + 0.3, x * 2
        if self.how == "two":
            return a - b
        if self.how == "torch":
            return torch.sub(a, b)
        if self.how == "rsub":
            return 1.0 - a
        return a - self.p


@pytest.mark.parametrize("variant", ["head", "paper"])
@pytest.mark.parametrize("how", ["two", "torch", "rsub"])
def test_abs_sub(how: str, variant: str) -> None:
    x = torch.randn(B, 4, dtype=DT)
    c = node_of(Sub(how), x, lambda c: isinstance(c.rule, AbsSub))
    h = c.ctx.output
    R = rel_like(h)
    out = AbsSub(variant)(c.ctx, R)
    sign = [1.0, -1.0] if how != "rsub" else [-1.0]
    G = [torch.diag_embed(2 * (s * v).clamp(min=0)) for s, v in zip(sign, c.ctx.inputs)]
    check_abs(out, G, h, R, variant, list(range(len(G))))


def test_sub_epsilon() -> None:
    x = torch.randn(B, 4, dtype=DT)
    c = node_of(Sub("two"), x, lambda c: isinstance(c.rule, SubEpsilon), "lrp-epsilon")
    a, b = c.ctx.inputs
    R = rel_like(c.ctx.output)
    z = a - b
    s = R / (z + 1e-6 * torch.where(z >= 0, 1.0, -1.0))
    ra, rb = c.rule(c.ctx, R)
    close(ra, a * s)
    close(rb, -b * s)
    close(ra + rb, R, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# GroupNorm


@pytest.mark.parametrize("variant", ["head", "paper"])
@pytest.mark.parametrize("functional", [False, True])
def test_abs_group_norm(functional: bool, variant: str) -> None:
    gn = nn.GroupNorm(2, 4).to(DT)
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    class FGroupNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.gn = gn

        def forward(self, t):
            return F.group_norm(t, 2, self.gn.weight, self.gn.bias, 1e-5)
    m = FGroupNorm() if functional else gn
    x = torch.randn(B, 4, 3, 3, dtype=DT)
    c = node_of(m, x, not_structural)
    assert isinstance(c.rule, AbsGroupNorm)
    h = c.ctx.output
    R = rel_like(h)
    out = AbsGroupNorm(variant)(c.ctx, R)
    g = gn.weight.reshape(1, -1, 1, 1)
    coef = torch.zeros_like(x)
    for b in range(B):  # per sample and group, the statistics by loops
        for grp in range(2):
            xs = x[b, 2 * grp:2 * grp + 2]
            mu, sd = xs.mean(), (xs.var(unbiased=False) + 1e-5).sqrt()
            sda = (xs.abs().var(unbiased=False) + 1e-5).sqrt()
            gg = g[0, 2 * grp:2 * grp + 2]
            if variant == "paper":
                coef[b, 2 * grp:2 * grp + 2] = (xs * (gg + gg.abs() * torch.sign(xs - mu)) / sd).abs()
            else:
                coef[b, 2 * grp:2 * grp + 2] = xs * gg / sd + xs.abs() * gg.abs() / sda
    check_abs(out, [torch.diag_embed(coef.reshape(B, -1))], h.reshape(B, -1), R, variant, [0])


# --------------------------------------------------------------------------------------------
# RMS norm


class FRmsNorm(nn.Module):
    """``F.rms_norm`` over the last two dims with the dtype's eps (``eps=None``), no weight."""

    def forward(self, t):
        return F.rms_norm(t, (3, 4))


@pytest.mark.parametrize("variant", ["head", "paper", "classic"])
@pytest.mark.parametrize("functional", [False, True])
def test_rms_norm(functional: bool, variant: str) -> None:
    """Literal per-row loops: ``paper`` ``x (g + |g| sign(x)) / s`` (LayerNorm's with ``mu = 0``),
    ``head`` ``x g / s + |x| |g| / s_abs`` (statistics recomputed on ``|x|``); classic: identity."""
    m = FRmsNorm() if functional else nn.RMSNorm(4, eps=1e-3).to(DT)
    if not functional:
        with torch.no_grad():
            m.weight.normal_()
    x = torch.randn(B, 2, 3, 4, dtype=DT)
    c = node_of(m, x, lambda c: isinstance(c.rule, (AbsRmsNorm, PassThrough)),
                "lrp-epsilon" if variant == "classic" else "abslrp")
    h = c.ctx.output
    R = rel_like(h)
    if variant == "classic":
        assert isinstance(c.rule, PassThrough)
        close(c.rule(c.ctx, R)[0], R)
        return
    assert isinstance(c.rule, AbsRmsNorm)
    out = AbsRmsNorm(variant)(c.ctx, R)
    coef = torch.zeros_like(x)
    for b in range(B):
        for i in range(2):
            rows = [(i, j) for j in range(3)] if not functional else [(i, slice(None))]
            for row in rows:
                xs = x[b][row]
                g = torch.ones_like(xs) if functional else m.weight.detach()
                eps = torch.finfo(DT).eps if functional else 1e-3
                sd = ((xs * xs).mean() + eps).sqrt()
                sda = ((xs.abs() * xs.abs()).mean() + eps).sqrt()
                if variant == "paper":
                    coef[b][row] = xs * (g + g.abs() * torch.sign(xs)) / sd
                else:
                    coef[b][row] = xs * g / sd + xs.abs() * g.abs() / sda
    check_abs(out, [torch.diag_embed(coef.reshape(B, -1))], h.reshape(B, -1), R, variant, [0])


# --------------------------------------------------------------------------------------------
# max reductions


@pytest.mark.parametrize("variant", ["head", "paper", "classic"])
@pytest.mark.parametrize("how", ["amax", "max_dim"])
def test_max_reduction(how: str, variant: str) -> None:
    fn = (lambda t: t.amax(dim=-1)) if how == "amax" else (lambda t: torch.max(t, 1, keepdim=True)[0])
    x = torch.randn(B, 3, 5, dtype=DT)
    c = node_of(Lambda(fn), x, lambda c: isinstance(c.rule, (AbsMaxReduce, MaxReduceWinner)),
                "lrp-epsilon" if variant == "classic" else "abslrp")
    h = fn(x)
    R = rel_like(h)
    r_in = R if how == "amax" else [R, None]
    rule = MaxReduceWinner() if variant == "classic" else AbsMaxReduce(variant)
    out = rule(c.ctx, r_in)
    dim = 2 if how == "amax" else 1
    # G[b, j, i]: output j reads input i (its winner; for head also the winner of |x|)
    xf = x.reshape(B, -1)
    G = torch.zeros(B, h[0].numel(), xf.shape[1], dtype=DT)
    idx = torch.arange(xf.shape[1]).reshape(x.shape[1:])
    for b in range(B):
        for j, group in enumerate(idx.movedim(dim - 1, -1).reshape(-1, x.shape[dim])):
            vals = xf[b, group]
            w, wa = group[vals.argmax()], group[vals.abs().argmax()]
            if variant == "classic":
                G[b, j, w] = 1.0
            elif variant == "paper":
                G[b, j, w] = xf[b, w] * (1 + torch.sign(xf[b, w]))
            else:
                G[b, j, w] += xf[b, w]
                G[b, j, wa] += xf[b, wa].abs()
    hf = h.reshape(B, -1)
    if variant == "classic":
        for k in range(K):
            for b in range(B):
                close(out[0][k, b].reshape(-1), G[b].T @ R[k, b].reshape(-1))
    else:
        check_abs(out, [G], hf, R, variant, [0])


# --------------------------------------------------------------------------------------------
# routing


ROUTES = {
    "f.pad": lambda t: F.pad(t, (1, 2, 0, 1)),
    "f.pad_crop": lambda t: F.pad(t, (-1, 1, 1, -1)),
    "f.pad_reflect": lambda t: F.pad(t, (2, 1, 1, 2), mode="reflect"),
    "zeropad": nn.ZeroPad2d((1, 0, 2, 1)),
    "replicationpad": nn.ReplicationPad2d(1),
    "roll": lambda t: torch.roll(t, (2, -1), dims=(2, 3)),
    "roll_method": lambda t: t.roll(1, 3),
    "flip": lambda t: t.flip(2),
    "tensor.unfold": lambda t: t.unfold(2, 2, 1),
    "f.unfold": lambda t: F.unfold(t, 2, padding=1, stride=2),
    "repeat_interleave": lambda t: t.repeat_interleave(2, dim=1),
    "repeat": lambda t: t.repeat(1, 2, 1, 1),
    "pixel_shuffle": nn.PixelShuffle(2),
}


def _route(m: nn.Module):
    """Input, output, relevance and the exact-routing rule's output for ``m`` on a (B, 4, 4, 5) input."""
    x = torch.randn(B, 4, 4, 5, dtype=DT)
    c = node_of(m, x, lambda c: isinstance(c.rule, IndexRoute), preset="lrp-0")
    with torch.no_grad():
        h = m(x)
    R = rel_like(h)
    return x, h, R, c.rule(c.ctx, R)


@pytest.mark.parametrize("case", list(ROUTES))
def test_routing_is_vjp(case: str) -> None:
    """Exact routing: the relevance of an input entry is the sum over the output entries copied
    from it, i.e. the op's vector-Jacobian product."""
    op = ROUTES[case]
    m = op if isinstance(op, nn.Module) else Lambda(op)
    # the exact route (the classic presets' and the current-code preset's treatment of moves;
    # the paper preset wraps it in the identity-like rule, tested in test_abslrp_fidelity.py)
    x, h, R, out = _route(m)
    got = split_parts(out[0])
    for k in range(K):
        t = x.clone().requires_grad_(True)
        (ref,) = torch.autograd.grad(m(t), t, R[k])
        close(got[0][k] + got[1][k], ref)
        t = x.clone().requires_grad_(True)  # each stream is the VJP of that sign's relevance
        (ref_p,) = torch.autograd.grad(m(t), t, R[k].clamp(min=0))
        close(got[0][k], ref_p)


@pytest.mark.parametrize("case", ["f.pad_value", "constantpad"])
def test_constant_pad_hands_its_entries_to_the_constant(case: str) -> None:
    """A pad with a non-zero value: the data entries are routed exactly, the relevance of the
    entries it adds is handed to the constant (absorbed, as a parameter's share)."""
    m = (Lambda(lambda t: F.pad(t, (1, 2, 0, 1), value=1.5)) if case == "f.pad_value"
         else nn.ConstantPad2d((2, 0, 1, 1), -0.5))
    x, h, R, out = _route(m)
    assert len(out) == 2 and isinstance(out[1], Absorbed)
    pad = (1, 2, 0, 1) if case == "f.pad_value" else (2, 0, 1, 1)
    data = torch.zeros_like(h, dtype=torch.bool)
    data[..., pad[2]:h.shape[-2] - pad[3], pad[0]:h.shape[-1] - pad[1]] = True
    got = split_parts(out[0])
    close(got[0] + got[1], R[..., pad[2]:h.shape[-2] - pad[3], pad[0]:h.shape[-1] - pad[1]])
    close(out[1].relevance, torch.where(data, torch.zeros_like(R), R))


class PadOnes(nn.Module):
    """A row of ones padded onto an activation before a linear layer (LiteMLA pads ``v`` so)."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 4), nn.Linear(5, 3)
        with torch.no_grad():
            self.l2.weight[:, 4] = torch.tensor([0.3, 0.5, -0.2])  # the constant column takes relevance

    def forward(self, x):
        return self.l2(F.pad(torch.relu(self.l1(x)), (0, 1), value=1.0))


@pytest.mark.parametrize("preset", ["abslrp", "abslrp-renorm", "lrp-epsilon"])
def test_constant_pad_share_is_absorbed_by_design(preset: str) -> None:
    """The pad's row conserves, the constant's share gets a by-design row ``<pad>.constant`` and
    the named absorbed relevance; under ``abslrp`` nothing leaks."""
    torch.manual_seed(1)
    e = lrpgraph.Explainer(PadOnes().to(DT).eval(), rules=preset)(torch.randn(B, 4, dtype=DT))
    rows = {r.name: r for r in e.conservation()}
    assert rows["pad.constant"].by_design and "pad value 1" in rows["pad.constant"].note
    assert rows["pad"].worst() < 1e-12
    absorbed = e.absorbed["pad.constant"]
    assert bool((absorbed[..., :4] == 0).all()) and bool((absorbed[..., 4] != 0).any())
    close(rows["pad.constant"].in_sum, absorbed.sum(-1).to(rows["pad"].in_sum.dtype))
    if preset == "abslrp":
        assert e.conservation().max_rel_error() < 1e-12


def test_routing_end_to_end_every_preset() -> None:
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, bias=False)
            self.fc = nn.Linear(4 * 8 * 8, 3, bias=False)

        def forward(self, x):
            y = torch.roll(F.pad(self.conv(x), (1, 1, 1, 1)), 1, dims=3)
            return self.fc(F.interpolate(y, scale_factor=2, mode="nearest")[..., :8, :8].flatten(1))
    model = Net().to(DT).eval()
    x = torch.randn(B, 3, 6, 6, dtype=DT)
    for preset in ("abslrp", "abslrp-renorm", "lrp-epsilon", "lrp-0"):
        e = lrpgraph.Explainer(model, rules=preset)(x)
        assert torch.isfinite(e.relevance).all() and e.relevance.shape == x.shape
    assert e.conservation().max_rel_error() < 1e-5  # lrp-0, no biases (the resampling keeps epsilon 1e-6)


class _BicubicNet(nn.Module):
    """A conv, a bicubic resize (signed interpolation weights) and a linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.fc = nn.Linear(4 * 7 * 5, 3, bias=False)

    def forward(self, x):
        return self.fc(F.interpolate(self.conv(x), size=(7, 5), mode="bicubic").flatten(1))


def test_bicubic_end_to_end_conserves_and_sign_split_rules_refuse_it() -> None:
    model = _BicubicNet().to(DT).eval()
    x = torch.randn(B, 3, 6, 6, dtype=DT)
    for preset in ("abslrp", "abslrp-renorm", "lrp-epsilon", "lrp-0"):
        e = lrpgraph.Explainer(model, rules=preset)(x)
        assert torch.isfinite(e.relevance).all() and e.relevance.shape == x.shape
        if preset == "abslrp":  # both sign masses at every node, the resize included
            assert not e.conservation().leaks(1e-9)
    assert e.conservation().max_rel_error() < 1e-5  # lrp-0 (the resize keeps epsilon 1e-6)
    base = lrpgraph.registry.get_composite("lrp-epsilon")
    for rule in (C.Gamma(0.25), C.AlphaBeta(2.0, 1.0), C.Flat()):
        ex = lrpgraph.Explainer(model, rules=base.derive(table={F.interpolate: rule}))
        with pytest.raises(lrpgraph.RuleError, match=r"interpolate.*signed \(bicubic\)"):
            ex(x)


def test_operator_neg_is_registered() -> None:
    x = torch.randn(B, 4, dtype=DT)
    c = node_of(Lambda(lambda t: operator.neg(t)), x, not_structural)
    assert c.rule.label == "neg"


@pytest.mark.parametrize("variant", ["head", "paper"])
def test_conv_padding_same(variant: str) -> None:
    m = nn.Conv2d(2, 3, (3, 5), padding="same", dilation=(2, 1)).to(DT)
    x = torch.randn(B, 2, 5, 6, dtype=DT)
    c = node_of(m, x, not_structural)
    W, b = dense_op(lambda t: m(t), x.shape[1:])
    with torch.no_grad():
        h = m(x)
    R = rel_like(h)
    check_abs(A.AbsAffine(variant)(c.ctx, R), [affine_G(x, W)], h.reshape(B, -1), R, variant, [0])


class Addcmul(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, dtype=DT))

    def forward(self, x):
        a, t1, t2 = x * 2, x.relu() + 0.1, torch.tanh(x)
        return torch.addcmul(a, t1, t2, value=0.5) + torch.addcmul(a, t1, self.w)


@pytest.mark.parametrize("variant", ["head", "paper", "classic"])
def test_addcmul(variant: str) -> None:
    from lrpgraph.rules.arithmetic import AbsAddcmul, AddcmulEpsilon
    x = torch.randn(B, 4, dtype=DT)
    preset = "lrp-epsilon" if variant == "classic" else "abslrp"
    cs = [c for c in capture(Addcmul(), x, preset)
          if isinstance(c.rule, (AbsAddcmul, AddcmulEpsilon))]
    assert len(cs) == 2
    for c, v, n_act in zip(cs, (0.5, 1.0), (2, 1)):
        a, t1, t2 = c.ctx.args[0], c.ctx.args[1], c.ctx.args[2]
        p = v * t1 * t2
        h = c.ctx.output
        R = rel_like(h)
        if variant == "classic":
            z = h + 1e-6 * torch.where(h >= 0, 1.0, -1.0)
            out = c.rule(c.ctx, R)
            close(out[0], a * R / z)
            for o in out[1:1 + n_act]:
                close(o, p * R / z / n_act)
            continue
        out = AbsAddcmul(variant)(c.ctx, R)
        G = [torch.diag_embed(2 * a.clamp(min=0))] + [torch.diag_embed(2 * p.clamp(min=0))] * n_act
        assert all(o is None for o in out[1 + n_act:])  # the parameter factor takes none
        check_abs(out, G, h, R, variant, list(range(1 + n_act)))



def test_sum_over_dim0_is_refused_by_name() -> None:
    with pytest.raises(lrpgraph.RuleError, match="dim 0"):
        lrpgraph.Explainer(Lambda(lambda t: t.sum(0, keepdim=True) * 2).to(DT).eval(),
                           rules="lrp-epsilon")(torch.randn(3, 4, dtype=DT), output_relevance=torch.ones(1, 4, dtype=DT))


@pytest.mark.parametrize("variant", ["head", "paper", "classic"])
@pytest.mark.parametrize("how", ["method", "keepdim"])
def test_l2_norm(how: str, variant: str) -> None:
    from lrpgraph.rules.pooling import AbsNorm, NormEpsilon
    fn = (lambda t: t.norm(dim=-1)) if how == "method" else (lambda t: torch.norm(t, 2, 1, True))
    x = torch.randn(B, 3, 4, dtype=DT)
    preset = "lrp-epsilon" if variant == "classic" else "abslrp"
    c = node_of(Lambda(fn), x, lambda c: isinstance(c.rule, (AbsNorm, NormEpsilon)), preset)
    h = fn(x)
    R = rel_like(h)
    dim = 2 if how == "method" else 1
    xf = x.reshape(B, -1)
    idx = torch.arange(xf.shape[1]).reshape(x.shape[1:])
    G = torch.zeros(B, h[0].numel(), xf.shape[1], dtype=DT)
    for b in range(B):  # z_ji = x_i^2 / h_j for the entries i of group j
        for j, group in enumerate(idx.movedim(dim - 1, -1).reshape(-1, x.shape[dim])):
            G[b, j, group] = xf[b, group] ** 2 / xf[b, group].pow(2).sum().sqrt()
    hf = h.reshape(B, -1)
    if variant == "classic":
        out = c.rule(c.ctx, R)
        for k in range(K):
            for b in range(B):
                close(out[0][k, b].reshape(-1), G[b].T @ (R[k, b].reshape(-1) / (hf[b] + 1e-6)))
    else:
        check_abs(AbsNorm(variant)(c.ctx, R), [2 * G], hf, R, variant, [0])


def test_abslrp_maxpool_after_minus_inf_padding_is_finite() -> None:
    """timm's "same" max-pool pads with -inf: the padding never wins a window with a finite entry,
    so it gets no relevance, and the map stays finite (it was NaN: -inf * 0)."""
    class SamePool(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4, 5)

        def forward(self, x):
            h = F.max_pool2d(F.pad(self.conv(x), (0, 1, 0, 1), value=-float("inf")), 3, 2)
            return self.head(h.mean((2, 3)))

    model = SamePool().eval().to(DT)
    x = torch.randn(B, 3, 8, 8, dtype=DT)
    for preset in ("abslrp", "abslrp-renorm"):
        e = lrpgraph.Explainer(model, rules=preset)(x, target=[1, 2])
        assert torch.isfinite(e.relevance).all() and float(e.relevance.abs().sum()) > 0
    rep = lrpgraph.Explainer(model, rules="abslrp")(x, target=[1, 2]).conservation()
    assert rep.max_rel_error() < 1e-10, rep.table()
