"""absLRP rules that follow the authors' code (see docs/abslrp.md), against literal references.

* abslrp-renorm's residual term: the transposed-Jacobian walk over a branch equals autograd
  through the same branch (LayerNorm statistics and softmax max/denominator held constant).
* abslrp's identity-like rule on routing ops, written out entry by entry.
* abslrp's fused projection: a fused q/k/v Linear split downstream explains like three Linears.
"""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import lrpgraph
from lrpgraph.projections import output_groups
from lrpgraph.record import record
from lrpgraph.rules.abslrp import AbsAdd
from lrpgraph.rules.abslrp_routing import AbsRouting
from lrpgraph.rules.attention import SOFTMAXES
from lrpgraph.rules.layernorm import LAYERNORMS
from lrpgraph.rules.residual import branch_vjp, shortcut_branch
from lrpgraph.walk import _context

DT = torch.float64
EPS = 1e-9


# ------------------------------------------------------------------------------------------
# the residual term of abslrp-renorm: explicit VJP walk vs autograd


def _values(gm: fx.GraphModule, x):
    vals = {}

    class Rec(fx.Interpreter):
        def run_node(self, n):
            v = super().run_node(n)
            vals[n] = v
            return v

    with torch.no_grad():
        Rec(gm).run(x)
    return vals


def _autograd_vjp(gm, vals, branch, a, b, u):
    """J^T u by autograd: recompute the branch from a leaf at b, statistics detached."""
    leaf = vals[b].detach().clone().requires_grad_(True)
    env = {b: leaf}
    get = lambda n: env[n] if n in env else vals[n]  # noqa: E731
    for n in branch:
        args, kwargs = fx.node.map_arg(n.args, get), fx.node.map_arg(n.kwargs, get)
        mod = gm.get_submodule(n.target) if n.op == "call_module" else None
        if n.target in LAYERNORMS or isinstance(mod, nn.LayerNorm):
            x = args[0]
            p = list(args) + [None] * 5
            w, bias, eps = ((mod.weight, mod.bias, mod.eps) if mod is not None else
                            (kwargs.get("weight", p[2]), kwargs.get("bias", p[3]), kwargs.get("eps", p[4] or 1e-5)))
            mu = x.mean(-1, keepdim=True).detach()
            var = x.var(-1, keepdim=True, unbiased=False).detach()
            env[n] = (x - mu) / torch.sqrt(var + eps) * w + bias
        elif n.target is F.group_norm or isinstance(mod, nn.GroupNorm):
            env[n] = _group_norm_detached(args, kwargs, mod)
        elif n.target is F.rms_norm or isinstance(mod, nn.RMSNorm):
            env[n] = _rms_norm_detached(args, kwargs, mod)
        elif n.target is F.normalize:  # the norm constant
            p = list(args) + [None] * 4
            pn, dim, eps = [kwargs.get(k, d if v is None else v) for k, v, d in zip(("p", "dim", "eps"), p[1:4], (2.0, 1, 1e-12))]
            env[n] = args[0] / args[0].norm(p=pn, dim=dim, keepdim=True).clamp(min=eps).detach()
        elif n.target in SOFTMAXES:
            x = args[0]
            e = torch.exp(x - x.amax(-1, keepdim=True).detach())
            env[n] = e / e.sum(-1, keepdim=True).detach()
        elif n.op == "call_module":
            env[n] = mod(*args, **kwargs)
        elif n.op == "call_function":
            env[n] = n.target(*args, **kwargs)
        else:
            env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
    return torch.stack([torch.autograd.grad(env[a], leaf, u[k], retain_graph=True)[0] for k in range(u.shape[0])])


def _group_norm_detached(args, kwargs, mod):
    """GroupNorm with the per-group mean and variance detached (as LayerNorm's)."""
    x = args[0]
    p = list(args) + [None] * 5
    groups, w, b, eps = ((mod.num_groups, mod.weight, mod.bias, mod.eps) if mod is not None else
                         (kwargs.get("num_groups", p[1]), kwargs.get("weight", p[2]), kwargs.get("bias", p[3]),
                          kwargs.get("eps", p[4] or 1e-5)))
    g = x.reshape(x.shape[0], groups, -1)
    mu = g.mean(-1, keepdim=True).detach()
    var = g.var(-1, keepdim=True, unbiased=False).detach()
    h = ((g - mu) / torch.sqrt(var + eps)).reshape(x.shape)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    h = h if w is None else h * w.reshape(shape)
    return h if b is None else h + b.reshape(shape)


def _rms_norm_detached(args, kwargs, mod):
    """RMS norm with the root mean square detached (as LayerNorm's statistics)."""
    x = args[0]
    p = list(args) + [None] * 4
    shape, w, eps = ((mod.normalized_shape, mod.weight, mod.eps) if mod is not None else
                     (kwargs.get("normalized_shape", p[1]), kwargs.get("weight", p[2]), kwargs.get("eps", p[3])))
    dims = tuple(range(x.dim() - len(shape), x.dim()))
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    h = x / torch.sqrt((x * x).mean(dims, keepdim=True) + eps).detach()
    return h if w is None else h * w


def _check_branches(model, x, n_expected):
    ex = lrpgraph.Explainer(model, rules="abslrp-renorm")
    plan = ex.plan
    plan.keep.update(plan.nodes)
    rec = record(plan, [x])
    vals = _values(ex.graph_module, x)
    seen = 0
    for node in plan.nodes:
        rule = plan.rules.get(node)
        if not isinstance(rule, AbsAdd):
            continue
        ctx = _context(plan, rec, node, rule, report=False)
        found = shortcut_branch(ctx)
        if found is None:
            continue
        ia, ib, branch = found
        a, b = plan.slots[node][ia], plan.slots[node][ib]
        u = torch.randn((2,) + tuple(vals[a].shape), dtype=DT)
        got = branch_vjp(ctx, branch, a, b, u)
        want = _autograd_vjp(ex.graph_module, vals, branch, a, b, u)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        seen += 1
    assert seen == n_expected


def test_branch_vjp_matches_autograd_vit(timm):
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2).eval().to(DT)
    _check_branches(m, torch.randn(2, 3, 32, 32, dtype=DT), n_expected=4)  # two adds per block


def test_branch_vjp_matches_autograd_resnet(timm):
    from test_engine import randomise_bn
    m = randomise_bn(timm.create_model("resnet18", pretrained=False, num_classes=10)).eval().to(DT)
    # resnet18: 8 blocks, 3 with a downsample shortcut (not an ancestor of the branch)
    _check_branches(m, torch.randn(2, 3, 32, 32, dtype=DT), n_expected=5)


def test_residual_head_rule_literal():
    """y = a + b with a = W relu(b): R_a = 2 a+ S, R_b = b [(1 + sign b) S + J^T((1 + sign a) S)]."""
    lin = nn.Linear(6, 6).to(DT)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return x + self.lin(torch.relu(x))

    x = torch.randn(3, 6, dtype=DT)
    R = torch.randn(1, 3, 6, dtype=DT)
    e = lrpgraph.Explainer(Block().eval(), rules="abslrp-renorm")(x, output_relevance=R, keep=["x"])
    with torch.no_grad():
        a = lin(torch.relu(x))
        y = x + a
    S = R / (y.abs() + EPS)
    ua = (1 + torch.sign(a)) * S
    jt = (ua @ lin.weight) * (x > 0)
    rb = x * ((1 + torch.sign(x)) * S + jt)
    ra = a * ua
    unit = lambda t: t / (t.abs().sum(-1, keepdim=True) + EPS)  # noqa: E731
    got = e.latent["x"]
    # the walker adds unit(R_b) and the branch's relevance at x (through the Linear and the ReLU)
    lin_in = torch.relu(x)
    s2 = unit(ra) / (a.abs() + EPS)
    r_lin = lin_in * (s2 @ lin.weight) + lin_in.abs() * (s2 @ lin.weight.abs())
    r_relu = unit(r_lin)
    h = torch.relu(x)
    g = (x * (x > 0) + x.abs() * (x.abs() > 0)) / (h.abs() + EPS)
    r_x_branch = unit(g * r_relu)
    torch.testing.assert_close(got, unit(rb) + r_x_branch, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------
# identity-like routing (paper preset)


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize("case", ["permute", "getitem", "flatten", "transpose"])
def test_routing_rule_literal(case):
    fn = {"permute": lambda x: x.permute(0, 2, 1), "getitem": lambda x: x[:, 0],
          "flatten": lambda x: x.flatten(1), "transpose": lambda x: x.transpose(1, 2)}[case]
    x = torch.randn(2, 5, 6, dtype=DT)
    with torch.no_grad():
        h = fn(x)
    R = torch.randn((2,) + tuple(h.shape), dtype=DT)
    ex = lrpgraph.Explainer(Lambda(fn).eval(), rules="abslrp")
    assert any(isinstance(r, AbsRouting) for r in ex.plan.rules.values())
    got = ex(x, output_relevance=R).relevance.movedim(1, 0)  # (B, K, ...) -> (K, B, ...)
    # literal: r = x * VJP((1 + sign h) S), S = R / |h| (1e-9 where h == 0); each sign's mass conserved
    want = torch.zeros_like(got)
    xl = x.clone().requires_grad_(True)
    hl = fn(xl)
    for k in range(R.shape[0]):
        for b in range(x.shape[0]):
            for part in (R[k].clamp(min=0), R[k].clamp(max=0)):
                part = part * (torch.arange(x.shape[0]) == b).reshape((-1,) + (1,) * (h.dim() - 1))
                S = part * (1 + torch.sign(h)) / torch.where(h == 0, EPS, h.abs())  # the paper-era eta
                r = xl.detach() * torch.autograd.grad(hl, xl, S, retain_graph=True)[0]
                mass = part.sum()
                if float(r.abs().sum()) > 0:
                    want[k] += r * (mass.abs() / r.abs().sum())
                else:  # no positive entry for this stream: lrpgraph routes it exactly (no loss)
                    want[k] += torch.autograd.grad(hl, xl, part, retain_graph=True)[0]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    # with a positive entry for every stream, both masses are conserved exactly
    rep = ex(x.abs() + 0.1, output_relevance=R).conservation()
    assert rep.max_rel_error(masses=True) < 1e-9


def test_routing_flags():
    from lrpgraph.rules import structural as S
    assert S.Permute.moves_data and S.GetItem.selects and not S.PassThrough.moves_data
    renorm = lrpgraph.get_composite("abslrp-renorm").table
    assert isinstance(renorm.functions[operator.getitem], AbsRouting)
    assert not isinstance(renorm.methods["permute"], AbsRouting)  # exact in the current code
    assert isinstance(lrpgraph.get_composite("abslrp").table.methods["permute"], AbsRouting)


# ------------------------------------------------------------------------------------------
# fused projections (paper preset)


class Attn(nn.Module):
    """A small attention block, with q/k/v fused (timm style) or as three Linears."""

    def __init__(self, fused: bool, w: torch.Tensor, b: torch.Tensor, how: str = "unbind"):
        super().__init__()
        self.fused, self.how = fused, how
        if fused:
            self.qkv = nn.Linear(8, 24)
            self.qkv.weight.data, self.qkv.bias.data = w.clone(), b.clone()
        else:
            self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
            for i, lin in enumerate((self.q, self.k, self.v)):
                lin.weight.data, lin.bias.data = w[8 * i:8 * i + 8].clone(), b[8 * i:8 * i + 8].clone()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        B, N, C = x.shape
        if self.fused and self.how == "unbind":
            q, k, v = self.qkv(x).reshape(B, N, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        elif self.fused:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            q, k, v = [t.reshape(B, N, 2, 4).transpose(1, 2) for t in (q, k, v)]
        else:
            q, k, v = [lin(x).reshape(B, N, 2, 4).transpose(1, 2) for lin in (self.q, self.k, self.v)]
        a = torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1)
        y = (a @ v).transpose(1, 2).reshape(B, N, C)
        return self.head(y.mean(1))


@pytest.mark.parametrize("how", ["unbind", "chunk"])
def test_fused_qkv_explains_like_three_linears(how):
    w, b = torch.randn(24, 8, dtype=DT) / 3, torch.randn(24, dtype=DT) * 0.1
    fused, split = Attn(True, w, b, how).eval().to(DT), Attn(False, w, b).eval().to(DT)
    split.head.load_state_dict(fused.head.state_dict())
    x = torch.randn(2, 5, 8, dtype=DT)
    torch.testing.assert_close(fused(x), split(x))
    exf = lrpgraph.Explainer(fused, rules="abslrp")
    groups = [n.meta["lrpgraph_options"]["out_groups"] for n in exf.graph_module.graph.nodes
              if "lrpgraph_options" in n.meta]
    assert len(groups) == 1 and groups[0].tolist() == [0] * 8 + [1] * 8 + [2] * 8
    for report in (True, False):
        a = exf(x, target=1, report=report).relevance
        c = lrpgraph.Explainer(split, rules="abslrp")(x, target=1, report=report).relevance
        # equal up to the 1e-9 stabilisers (the fused graph has one more routing step)
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-9)
    assert exf(x, target=1).conservation().max_rel_error(masses=True) < 1e-9


def test_output_groups_follow_the_split_axis():
    """Splitting the heads axis (not the outermost factor) gives strided groups."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 12)

        def forward(self, x):
            a, b = self.lin(x).reshape(x.shape[0], 3, 2, 2).unbind(2)
            return a + b

    gm = fx.symbolic_trace(M())
    lin = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert output_groups(gm, lin, 12) == [0, 0, 1, 1] * 3
