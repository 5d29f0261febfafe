"""abslrp-renorm's residual term through every kind of op that a branch may hold: the explicit
transposed-Jacobian walk (rules/residual.py, rules/residual_vjp.py) against autograd in float64, to
1e-10, with the statistics the authors' code and lrpgraph's rules hold constant detached (LayerNorm,
softmax, GroupNorm, RMS norm, the norm of ``F.normalize``); see docs/abslrp.md."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import lrpgraph
from lrpgraph.text import masked_mean
from lrpgraph.walk import RuleError
from test_abslrp_fidelity import _check_branches

DT = torch.float64
TOKENS = (2, 5, 8)
IMAGE = (2, 4, 6, 6)


class Res(nn.Module):
    """``x + fn(self, x)``: one residual addition whose branch is ``fn``."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        g = torch.Generator().manual_seed(0)
        self.l1, self.l2, self.l5 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(5, 5)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1)
        self.gn, self.gn1 = nn.GroupNorm(2, 4), nn.GroupNorm(1, 4, affine=False)
        self.fold = nn.Fold((6, 6), 3, padding=1)
        self.rms = nn.RMSNorm(8, eps=1e-6)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.register_buffer("wt", torch.randn(4, 2, 3, 3, generator=g) * 0.5)  # transposed conv, 2 groups
        self.register_buffer("mean", torch.randn(4, generator=g))
        self.register_buffer("var", torch.rand(4, generator=g) + 0.5)
        self.register_buffer("mask", torch.tensor([[1.0, 1, 0, 1, 0], [1, 1, 1, 1, 1]]))

    def forward(self, x):
        return x + self.fn(self, x)


def _pair(t):
    c = t.chunk(2, -1)
    return torch.cat([c[1], c[0]], -1)


def _unbind(t):
    u = t.reshape(2, 5, 2, 4).unbind(2)
    return torch.cat([u[1], u[0]], -1)


def _split(t):
    s = torch.split(t, [3, 5], -1)
    return torch.cat([s[1], s[0]], -1)


TOKEN_BRANCHES = {
    # arithmetic and normalisers (rules/residual_vjp.py)
    "sub": lambda m, x: m.l1(x) - m.l2(x),
    "rsub": lambda m, x: 1.5 - m.l1(x),
    "sub-alpha": lambda m, x: torch.sub(m.l1(x), x, alpha=0.5),
    "addcmul": lambda m, x: torch.addcmul(m.l1(x), m.l2(x), x, value=0.5),
    "normalize": lambda m, x: m.l1(F.normalize(x, dim=-1)),
    "normalize-p1": lambda m, x: F.normalize(m.l1(x), p=1.0, dim=1),
    "rms-norm": lambda m, x: m.l1(m.rms(x)),
    "rms-norm-f": lambda m, x: F.rms_norm(m.l1(x), (8,), m.l2.bias, 1e-6),
    "rms-norm-f-2d-no-weight": lambda m, x: F.rms_norm(m.l1(x), [5, 8]),
    "clamp": lambda m, x: torch.clamp(m.l1(x), -0.3, 0.4) + m.l2(x).clamp_min(-0.2) + m.l1(x).clamp(max=0.1),
    "amax": lambda m, x: m.l1(x).amax(-1, keepdim=True),
    "max-dim": lambda m, x: torch.max(m.l1(x), dim=1, keepdim=True)[0],
    "l2-norm": lambda m, x: m.l1(x).norm(dim=-1, keepdim=True),
    "pow": lambda m, x: m.l1(x) ** 2 + torch.pow(m.l2(x), 3) + (torch.square(m.l1(x)) + 1).pow(-0.5),
    "masked-mean": lambda m, x: masked_mean(m.l1(x), m.mask).unsqueeze(1),
    # pure data movement (the structural rules route it: their transposed data movement)
    "permute": lambda m, x: m.l5(x.permute(0, 2, 1).contiguous()).permute(0, 2, 1),
    "transpose-reshape": lambda m, x: m.l1(x.transpose(1, 2).reshape(2, 5, 8)),
    "flatten-view": lambda m, x: m.l1(x.flatten(1).view(2, 5, 8)),
    "roll-flip": lambda m, x: torch.flip(torch.roll(m.l1(x), 1, 1), [2]),
    "pad-slice": lambda m, x: F.pad(m.l1(x), (1, 2))[..., 1:-2] + F.pad(x, (0, 0, 2, 0))[:, ::2].repeat(1, 2, 1)[:, :5],
    "chunk-cat": lambda m, x: _pair(m.l1(x)),
    "unbind": lambda m, x: _unbind(m.l1(x)),
    "split": lambda m, x: _split(m.l1(x)),
    "expand": lambda m, x: m.l1(x).mean(1, keepdim=True).expand(-1, 5, -1),
    "repeat-index": lambda m, x: m.l1(x)[:, :1].repeat(1, 5, 1) * m.l2(x)[:, torch.tensor([0, 0, 2, 1, 4])],
    # (a sum over the stacked dim would be rewritten into additions: lrpgraph/stacks.py)
    "unsqueeze-squeeze-stack": lambda m, x: torch.stack([m.l1(x), x], 2).amax(2).unsqueeze(1).squeeze(1),
}

IMAGE_BRANCHES = {
    "group-norm": lambda m, x: m.conv(m.gn(x)),
    "group-norm-1-no-affine": lambda m, x: m.gn1(m.conv(x)),
    "group-norm-f": lambda m, x: F.group_norm(m.conv(x), 2, m.gn.weight, m.gn.bias),
    "fold": lambda m, x: F.fold(F.unfold(m.conv(x), 3, padding=1), (6, 6), 3, padding=1),
    "fold-module": lambda m, x: m.fold(F.unfold(m.conv(x), 3, padding=1)),
    "conv-transpose": lambda m, x: m.up(m.down(x)),
    "conv-transpose-f": lambda m, x: F.conv_transpose2d(m.down(x), m.wt, None, 2, 1, 1, 2),
    "pixel-shuffle": lambda m, x: F.pixel_unshuffle(F.pixel_shuffle(m.conv(x), 2), 2),
    "pool-resample": lambda m, x: F.interpolate(F.avg_pool2d(m.conv(x), 4, 2, ceil_mode=True), size=(6, 6),
                                                mode="bilinear"),
    "resample-bicubic": lambda m, x: F.interpolate(F.interpolate(m.conv(x), size=(4, 5), mode="bicubic"),
                                                   size=(6, 6), mode="bicubic", align_corners=True),
    "batch-norm-f": lambda m, x: F.batch_norm(m.conv(x), m.mean, m.var, m.gn.weight, m.gn.bias),
    "sum": lambda m, x: m.conv(x).sum(1, keepdim=True),
    "hardswish-sigmoid": lambda m, x: F.hardswish(m.conv(x)) * torch.sigmoid(x),
}


@pytest.mark.parametrize("case", sorted(TOKEN_BRANCHES) + sorted(IMAGE_BRANCHES))
def test_branch_vjp_per_op_matches_autograd(case):
    fn = TOKEN_BRANCHES.get(case) or IMAGE_BRANCHES[case]
    shape = TOKENS if case in TOKEN_BRANCHES else IMAGE
    x = torch.randn(shape, dtype=DT, generator=torch.Generator().manual_seed(1))
    _check_branches(Res(fn).eval().to(DT), x, n_expected=1)


def test_shape_query_is_no_branch():
    """A summand that depends on the shortcut only through its shape (a position embedding
    resized to the input, as in hieradet_sam2) is a constant: no Jacobian term, and it explains."""
    class Pos(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.randn(1, 4, 3, 3, dtype=DT))
            self.conv = nn.Conv2d(4, 4, 3, padding=1).to(DT)

        def forward(self, x):
            h = self.conv(x)
            return h + F.interpolate(self.pos, size=h.shape[-2:]).permute(0, 1, 3, 2)

    x = torch.randn(IMAGE, dtype=DT)
    _check_branches(Pos().eval(), x, n_expected=0)
    e = lrpgraph.Explainer(Pos().eval(), rules="abslrp-renorm")(x, output_relevance=torch.randn((1,) + IMAGE, dtype=DT))
    assert bool(torch.isfinite(e.relevance).all())


def test_op_without_rule_in_branch_is_named():
    """An LSTM in a branch has no rule (and so no transposed-Jacobian formula): the error names it."""
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(8, 8, batch_first=True).to(DT)

        def forward(self, x):
            return x + self.rnn(x)[0]

    with pytest.raises(RuleError, match=r"LSTM.*no rule in this preset"):
        lrpgraph.Explainer(Seq().eval(), rules="abslrp-renorm")(torch.randn(TOKENS, dtype=DT),
                                                                output_relevance=torch.randn((1,) + TOKENS, dtype=DT))


@pytest.mark.parametrize("name, n_branches", [("swiftformer_xs", 28), ("shvit_s1", 39)])
def test_branch_vjp_matches_autograd_timm(timm, name, n_branches):
    """Real branches: F.normalize in SwiftFormer's additive attention, GroupNorm in SHViT."""
    m = timm.create_model(name, pretrained=False).eval().to(DT)
    _check_branches(m, torch.randn(1, 3, 64, 64, dtype=DT, generator=torch.Generator().manual_seed(0)), n_branches)


BY_OP_CASES = {
    "pow": lambda m, x: m.l1(x) ** 3,
    "fold-module": lambda m, x: m.fold(F.unfold(m.conv(x), 3, padding=1)),
    "fold-f": lambda m, x: F.fold(F.unfold(m.conv(x), 3, padding=1), (6, 6), 3, padding=1),
    "conv-transpose": lambda m, x: m.up(m.down(x)),
    "conv-transpose-f": lambda m, x: F.conv_transpose2d(m.down(x), m.wt, None, 2, 1, 1, 2),
}


@pytest.mark.parametrize("case", sorted(BY_OP_CASES))
def test_by_op_formula_matches_autograd(case):
    """The formulas by op (for a rule that no formula knows): each node's VJP against autograd."""
    from lrpgraph.record import record
    from lrpgraph.rules.residual_vjp import formula_by_op
    from lrpgraph.walk import _context

    shape = TOKENS if case == "pow" else IMAGE
    m = Res(BY_OP_CASES[case]).eval().to(DT)
    x = torch.randn(shape, dtype=DT, generator=torch.Generator().manual_seed(2))
    ex = lrpgraph.Explainer(m, rules="abslrp-renorm")
    plan = ex.plan
    plan.keep.update(plan.nodes)
    rec = record(plan, [x])
    checked = 0
    for node in plan.nodes:
        ctx = _context(plan, rec, node, plan.rules.get(node), report=False)
        f = formula_by_op(ctx)
        if f is None:
            continue
        a = ctx.inputs[0].detach().clone().requires_grad_(True)
        first = node.all_input_nodes[0]
        env = lambda n: a if n is first else rec.values[n]  # noqa: E731
        args, kwargs = fx.node.map_arg(node.args, env), fx.node.map_arg(node.kwargs, env)
        fn = getattr(ex.graph_module, node.target) if node.op == "call_module" else node.target
        with torch.enable_grad():
            y = fn(*args, **kwargs)
        g = torch.randn((2,) + tuple(y.shape), dtype=DT)
        want = torch.stack([torch.autograd.grad(y, a, g[k], retain_graph=True)[0] for k in range(2)])
        got = f(ctx, None, g)[0]
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        checked += 1
    assert checked == 1
