"""Every relevance rule against a slow reference that follows its formula literally.

Each reference builds the layer's dense (out x in) matrix by pushing unit basis vectors through
the op (or loops over pooling windows), forms the contributions ``z_ij = x_i w_ij`` explicitly and
sums over them, in float64. The rules are called directly with a recorded
:class:`lrpgraph.rule.NodeContext` (captured through the Explainer's plan and recorder), on a
relevance tensor with K = 2 stacked passes, and, where simpler, end to end through
:class:`lrpgraph.Explainer`. Structural rules are checked against the op's vector-Jacobian
product (autograd is the reference here; rules themselves never use it).
"""
from __future__ import annotations

import operator
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

import lrpgraph
from lrpgraph.record import record
from lrpgraph.rule import NodeContext, Split
from lrpgraph.rules import abslrp as A
from lrpgraph.rules import classic as C
from lrpgraph.rules import structural as S
from lrpgraph.walk import _context

DT = torch.float64
EPS = 1e-9  # absLRP stabiliser (spec 1.1)
K = 2  # stacked relevance passes
B = 2  # samples


def close(a: Tensor, b: Tensor, rtol: float = 1e-9, atol: float = 1e-12) -> None:
    """Assert ``a == b`` within float64 tolerances, with a readable message."""
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert torch.allclose(a, b, rtol=rtol, atol=atol), f"max abs err {err:.3e} (scale {b.abs().max().item():.3e})"


# --------------------------------------------------------------------------------------------
# capturing node contexts through the Explainer's own plan and recorder


class Captured:
    """One node of a traced model with its recorded context and the preset's rule."""

    def __init__(self, ex: lrpgraph.Explainer, node: fx.Node, ctx: NodeContext, rule):
        self.ex, self.node, self.ctx, self.rule = ex, node, ctx, rule


def capture(model: nn.Module, x: Tensor, preset: str = "abslrp") -> List[Captured]:
    """Trace ``model`` with ``preset``, record a forward on ``x`` keeping every value, and return
    the context of every node that has a rule, in forward order."""
    # wrapped so that a torch.nn module stays one call_module node (fx traces into a root module)
    model = nn.Sequential(model).eval()
    ex = lrpgraph.Explainer(model, rules=preset)
    ex.plan.keep.update(ex.plan.nodes)  # keep everything so that references can read it
    rec = record(ex.plan, [x])
    out = []
    for n in ex.plan.nodes:
        rule = ex.plan.rules.get(n)
        if rule is not None:
            out.append(Captured(ex, n, _context(ex.plan, rec, n, rule), rule))
    return out


def node_of(model: nn.Module, x: Tensor, pick: Callable[[Captured], bool], preset: str = "abslrp") -> Captured:
    """The single captured node for which ``pick`` is true."""
    hits = [c for c in capture(model, x, preset) if pick(c)]
    assert len(hits) == 1, f"expected one node, got {[c.node.name for c in hits]}"
    return hits[0]


def not_structural(c: Captured) -> bool:
    return not isinstance(c.rule, S.Structural)


def hand_ctx(module: Optional[nn.Module], x: Tensor, target=None, args=None, kwargs=None) -> NodeContext:
    """A context built by hand for a one-input op (module call or function on ``x``)."""
    with torch.no_grad():
        out = module(x) if module is not None else target(*(args or (x,)), **(kwargs or {}))
    return NodeContext(name="n", op="call_module" if module is not None else "call_function",
                       target=target if module is None else "m", module=module,
                       args=tuple(args or (x,)), kwargs=dict(kwargs or {}), inputs=[x],
                       input_shapes=[x.shape], output=out, output_shape=out.shape,
                       batch_size=x.shape[0], is_parameter=[False])


# --------------------------------------------------------------------------------------------
# dense references


def dense_op(f: Callable[[Tensor], Tensor], in_shape: Sequence[int]) -> Tuple[Tensor, Tensor]:
    """The dense matrix ``W`` (out x in) and bias ``b`` of an affine map ``f`` on one sample of
    shape ``in_shape``, found by pushing the unit basis vectors through it: ``W e_i = f(e_i) - f(0)``."""
    n = int(torch.tensor(in_shape).prod())
    with torch.no_grad():
        eye = torch.eye(n, dtype=DT).reshape((n,) + tuple(in_shape))
        zero = torch.zeros((1,) + tuple(in_shape), dtype=DT)
        b = f(zero).reshape(-1)
        W = (f(eye).reshape(n, -1) - b).T.contiguous()
    return W, b


def head_ref(G: Sequence[Tensor], h: Tensor, R: Tensor, divide: bool = True) -> List[Tensor]:
    """absLRP HEAD building block (spec 1.1) from per-sample contribution matrices.

    ``G[slot]`` is ``(B, out, in_slot)`` with ``G_ji = z_ij + |z_ij|`` (or the element-wise analogue);
    ``h`` is ``(B, out)``, ``R`` is ``(K, B, out)``. Returns, per slot, ``r_i = sum_j G_ji R_j / (|h_j|+1e-9)``
    as ``(K, B, in_slot)``, computed with explicit loops over k and b.
    """
    out = []
    for g in G:
        r = torch.zeros((R.shape[0], R.shape[1], g.shape[2]), dtype=DT)
        for k in range(R.shape[0]):
            for b in range(R.shape[1]):
                s = R[k, b] / (h[b].abs() + EPS) if divide else R[k, b]
                r[k, b] = (g[b] * s[:, None]).sum(0)
        out.append(r)
    return out


def paper_ref(G: Sequence[Tensor], h: Tensor, R: Tensor, divide: bool = True) -> List[Tuple[Tensor, Tensor]]:
    """absLRP paper-era sign split (spec 1.3), jointly over all slots.

    ``S = R/|h|``, ``r+ = G^T S+``, ``r- = G^T S-``, slot gets ``P r+/||r+|| + |N| r-/||r-||`` where the
    norms sum over every slot. Returns per slot the ``(pos, neg)`` streams, each ``(K, B, in_slot)``.
    The ratio is exact (0 where a norm is 0); the reference code's ``+1e-9`` on the norm is a
    ~1e-9 relative leak that lrpgraph removes on purpose (``lrpgraph.rule._ratio``).
    """
    res = [(torch.zeros((R.shape[0], R.shape[1], g.shape[2]), dtype=DT),
            torch.zeros((R.shape[0], R.shape[1], g.shape[2]), dtype=DT)) for g in G]
    for k in range(R.shape[0]):
        for b in range(R.shape[1]):
            s = R[k, b] / (h[b].abs() + EPS) if divide else R[k, b]
            P = R[k, b].clamp(min=0).sum()
            N = R[k, b].clamp(max=0).sum()
            rp = [(g[b] * s.clamp(min=0)[:, None]).sum(0) for g in G]
            rn = [(g[b] * s.clamp(max=0)[:, None]).sum(0) for g in G]
            norm_p = sum(r.abs().sum() for r in rp)
            norm_n = sum(r.abs().sum() for r in rn)
            for i in range(len(G)):
                res[i][0][k, b] = P * rp[i] / norm_p if norm_p > 0 else 0.0
                res[i][1][k, b] = N.abs() * rn[i] / norm_n if norm_n > 0 else 0.0
    return res


def affine_G(x: Tensor, W: Tensor) -> Tensor:
    """``G_ji = z_ij + |z_ij|`` with ``z_ij = x_i w_ij`` for each sample: ``(B, out, in)``."""
    z = x.reshape(x.shape[0], 1, -1) * W[None]
    return z + z.abs()


def split_parts(r) -> Tuple[Tensor, Tensor]:
    """The (pos, neg) streams of a rule's paper-variant output (zeros for a missing stream).

    A plain tensor is accepted from element-wise rules (``conserve_diagonal``): with a diagonal,
    non-negative gain the two streams never share an entry, so they are its positive and negative
    parts.
    """
    if isinstance(r, Tensor):
        return r.clamp(min=0), r.clamp(max=0)
    assert isinstance(r, Split), f"paper variant must return Split, got {type(r).__name__}"
    ref = r.pos if r.pos is not None else r.neg
    z = torch.zeros_like(ref)
    return (r.pos if r.pos is not None else z), (r.neg if r.neg is not None else z)


def check_abs(rule_out: Sequence, G: Sequence[Tensor], h: Tensor, R: Tensor, variant: str,
              slots: Sequence[int], divide: bool = True) -> None:
    """Compare an absLRP rule's per-slot output with :func:`head_ref` / :func:`paper_ref`."""
    Rf = R.reshape(R.shape[0], R.shape[1], -1)
    if variant == "head":
        refs = head_ref(G, h, Rf, divide)
        for slot, ref in zip(slots, refs):
            got = rule_out[slot]
            close(got.reshape(ref.shape), ref)
    else:
        refs = paper_ref(G, h, Rf, divide)
        for slot, (rp, rn) in zip(slots, refs):
            gp, gn = split_parts(rule_out[slot])
            close(gp.reshape(rp.shape), rp)
            close(gn.reshape(rn.shape), rn)
        # each sign's mass is conserved in L1 jointly over the slots, wherever its stream is
        # non-zero (if no input has a positive contribution to a sign's outputs, that mass is lost
        # by definition of the rule)
        for i, sign in ((0, 1.0), (1, -1.0)):
            mass = sum(split_parts(rule_out[s])[i].reshape(K, B, -1).abs().sum(-1) for s in slots)
            want = (Rf * sign).clamp(min=0).sum(-1)
            live = sum(r[i].abs().sum(-1) for r in refs) > 0
            close(mass[live], want[live], rtol=1e-9)
            assert bool((mass[~live] == 0).all())


def rel_like(out: Tensor) -> Tensor:
    """A signed relevance with K = 2 different passes for an output ``(B, ...)``."""
    return torch.randn((K,) + tuple(out.shape), dtype=DT)


# --------------------------------------------------------------------------------------------
# affine layers under absLRP


class FLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 5, dtype=DT))
        self.b = nn.Parameter(torch.randn(4, dtype=DT))

    def forward(self, x):
        return F.linear(x, self.w, self.b)


class FConv2d(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 2, 3, 3, dtype=DT))
        self.b = nn.Parameter(torch.randn(6, dtype=DT))

    def forward(self, x):
        return F.conv2d(x, self.w, self.b, stride=2, padding=1, dilation=2, groups=2)


class Lambda(nn.Module):
    """A module whose forward is ``fn(x)`` (traced by fx like any forward)."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _conv2d() -> nn.Module:
    return nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2).to(DT)


class _ConvTOutputSize(nn.Module):
    """A ConvTranspose2d called with ``output_size=``: the output padding is chosen per call."""

    def __init__(self):
        super().__init__()
        self.t = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1).to(DT)

    def forward(self, x):
        return self.t(x, output_size=(6, 5))


AFFINE_CASES = {
    "linear": (lambda: nn.Linear(5, 4).to(DT), (B, 5)),
    "linear3d": (lambda: nn.Linear(5, 3).to(DT), (B, 2, 5)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2).to(DT), (B, 4, 9)),
    "conv2d": (_conv2d, (B, 4, 7, 7)),
    "f.linear": (FLinear, (B, 5)),
    "f.conv2d": (FConv2d, (B, 4, 7, 6)),
    "avgpool2d": (lambda: nn.AvgPool2d(3, stride=2, padding=1), (B, 2, 7, 7)),
    "avgpool2d_nopad": (lambda: nn.AvgPool2d(2), (B, 2, 5, 4)),
    "adaptive7to3": (lambda: nn.AdaptiveAvgPool2d(3), (B, 2, 7, 7)),
    "adaptive7x5to3x2": (lambda: nn.AdaptiveAvgPool2d((3, 2)), (B, 2, 7, 5)),
    "f.adaptive1d": (lambda: Lambda(lambda x: F.adaptive_avg_pool1d(x, 4)), (B, 2, 7)),
    "mean23": (lambda: Lambda(lambda x: x.mean((2, 3))), (B, 3, 4, 5)),
    "torch.mean_keep": (lambda: Lambda(lambda x: torch.mean(x, dim=1, keepdim=True)), (B, 3, 4)),
    "mean_neg": (lambda: Lambda(lambda x: x.mean(-1)), (B, 3, 5)),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2,
                                                    dilation=1).to(DT), (B, 4, 3, 4)),
    "conv_transpose2d_output_size": (lambda: Lambda(_ConvTOutputSize()), (B, 2, 3, 3)),
    "f.conv_transpose1d": (lambda: Lambda(lambda x: F.conv_transpose1d(
        x, torch.linspace(-1, 1, 4 * 3 * 3, dtype=DT).reshape(4, 3, 3), torch.tensor([0.1, -0.2, 0.3], dtype=DT),
        stride=2, padding=1, dilation=2)), (B, 4, 5)),
}


def _affine_node(case: str, nonneg: bool, preset: str = "abslrp"):
    make, shape = AFFINE_CASES[case]
    m = make()
    x = torch.randn(shape, dtype=DT)
    if nonneg:
        x = x.clamp(min=0)  # exercises the fast path for x >= 0 (with exact zeros)
    c = node_of(m, x, not_structural, preset)
    fwd = lambda t: m(t)  # noqa: E731
    W, b = dense_op(fwd, shape[1:])
    with torch.no_grad():
        h = m(x)
    # the dense matrix reproduces the forward (sanity of the reference itself)
    close((x.reshape(B, -1) @ W.T + b), h.reshape(B, -1))
    return m, x, c, W, h


def check_fast(rule_out: Sequence, G: Sequence[Tensor], h: Tensor, R: Tensor, variant: str,
               slots: Sequence[int]) -> None:
    """The fast path (``report=False``, what ``lrpgraph.explain`` runs) against the same slow
    references: it may return one signed tensor per slot instead of two streams, so the totals
    are compared."""
    Rf = R.reshape(R.shape[0], R.shape[1], -1)
    refs = head_ref(G, h, Rf) if variant == "head" else [rp + rn for rp, rn in paper_ref(G, h, Rf)]
    for slot, ref in zip(slots, refs):
        got = rule_out[slot]
        got = got.total() if isinstance(got, Split) else got
        close(got.reshape(ref.shape), ref)


@pytest.mark.parametrize("report", [True, False], ids=["report", "fast"])
@pytest.mark.parametrize("variant", ["head", "paper"])
@pytest.mark.parametrize("nonneg", [False, True], ids=["signed", "nonneg"])
@pytest.mark.parametrize("case", list(AFFINE_CASES))
def test_abs_affine(case: str, nonneg: bool, variant: str, report: bool) -> None:
    m, x, c, W, h = _affine_node(case, nonneg)
    assert isinstance(c.rule, A.AbsAffine)
    R = rel_like(h)
    c.ctx.report = report
    out = A.AbsAffine(variant)(c.ctx, R)
    assert len(out) == len(c.ctx.inputs)
    assert all(o is None for i, o in enumerate(out) if i != 0)  # weights passed functionally get none
    (check_abs if report else check_fast)(out, [affine_G(x, W)], h.reshape(B, -1), R, variant, [0])


def test_abs_affine_head_only_positive_contributions() -> None:
    """HEAD: with non-negative relevance the raw input relevance is non-negative (2 z+ only)."""
    m, x, c, W, h = _affine_node("conv2d", False)
    out = A.AbsAffine("head")(c.ctx, rel_like(h).abs())
    assert bool((out[0] >= 0).all())


@pytest.mark.parametrize("case", ["linear", "conv2d"])
def test_abs_affine_end_to_end_renorm(case: str) -> None:
    """Through the Explainer (preset abslrp-renorm): input relevance = unit-L1 of the raw rule."""
    m, x, c, W, h = _affine_node(case, False, preset="abslrp-renorm")
    R = rel_like(h)
    e = lrpgraph.Explainer(m.eval(), rules="abslrp-renorm")(x, output_relevance=R)
    raw = head_ref([affine_G(x, W)], h.reshape(B, -1), R.reshape(K, B, -1))[0]
    ref = raw / (raw.abs().sum(-1, keepdim=True) + EPS)
    close(e.relevance.movedim(1, 0).reshape(K, B, -1), ref)  # (B, K, ...) for K passes


def test_abs_affine_end_to_end_paper_linear() -> None:
    m = nn.Linear(6, 3).to(DT)
    x = torch.randn(B, 6, dtype=DT)
    with torch.no_grad():
        h = m(x)
    R = rel_like(h)
    e = lrpgraph.Explainer(m.eval(), rules="abslrp")(x, output_relevance=R)
    W, _ = dense_op(m, (6,))
    (rp, rn), = paper_ref([affine_G(x, W)], h, R)
    close(e.relevance.movedim(1, 0), rp + rn)
    assert e.conservation().max_rel_error() < 1e-9


# --------------------------------------------------------------------------------------------
# BatchNorm


def _bn(C_: int = 3) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(C_).to(DT)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(C_, dtype=DT))
        bn.running_var.copy_(torch.rand(C_, dtype=DT) + 0.5)
        bn.weight.copy_(torch.tensor([1.3, -0.7, 0.4], dtype=DT)[:C_])  # signed gamma
        bn.bias.copy_(torch.randn(C_, dtype=DT))
    return bn.eval()


def test_batchnorm_head_one_stage() -> None:
    bn = _bn()
    x = torch.randn(B, 3, 4, 4, dtype=DT)
    c = node_of(bn, x, not_structural, preset="abslrp-renorm")
    assert isinstance(c.rule, A.AbsAffine)
    with torch.no_grad():
        h = bn(x)
    R = rel_like(h)
    out = c.rule(c.ctx, R)
    sigma = torch.sqrt(bn.running_var + bn.eps).reshape(1, -1, 1, 1)
    gamma = bn.weight.reshape(1, -1, 1, 1)
    ref = 2 * (gamma * x).clamp(min=0) / sigma * R / (h.abs() + EPS)  # spec 2.3
    close(out[0], ref)
    # and the dense contribution form agrees
    W, _ = dense_op(bn, x.shape[1:])
    check_abs(out, [affine_G(x, W)], h.reshape(B, -1), R, "head", [0])


def test_batchnorm_paper_two_stage() -> None:
    bn = _bn()
    x = torch.randn(B, 3, 4, 4, dtype=DT)
    c = node_of(bn, x, not_structural, preset="abslrp")
    assert isinstance(c.rule, A.AbsBatchNormTwoStage)
    with torch.no_grad():
        h = bn(x)
    R = rel_like(h)
    out = c.rule(c.ctx, R)
    sigma = torch.sqrt(bn.running_var + bn.eps).reshape(1, -1, 1, 1)
    mu = bn.running_mean.reshape(1, -1, 1, 1)
    gamma = bn.weight.reshape(1, -1, 1, 1)
    h1 = (x - mu) / sigma
    # stage 2: h = gamma h1 + beta, twin |gamma||h1| + |beta|  =>  G = diag(2 (gamma h1)+)
    g2 = torch.diag_embed(2 * (gamma * h1).clamp(min=0).reshape(B, -1))
    (p2, n2), = paper_ref([g2], h.reshape(B, -1), R.reshape(K, B, -1))
    R1 = p2 + n2
    # stage 1: h1 = (x - mu)/sigma, twin (|x| - |mu|)/sqrt(|var| + eps)  =>  G = diag(2 x+ / sigma)
    g1 = torch.diag_embed((2 * x.clamp(min=0) / sigma).reshape(B, -1))
    (p1, n1), = paper_ref([g1], h1.reshape(B, -1), R1)
    gp, gn = split_parts(out[0])
    close(gp.reshape(K, B, -1), p1)
    close(gn.reshape(K, B, -1), n1)
    assert bool((_total(out[0])[:, x <= 0] == 0).all())  # relevance reaches only x > 0


# --------------------------------------------------------------------------------------------
# max pooling


def maxpool_windows(shape: Sequence[int], k: Sequence[int], s: Sequence[int], p: Sequence[int],
                    d: Sequence[int]) -> List[Tuple[Tuple[int, ...], List[Tuple[int, ...]]]]:
    """For an input ``(C, *spatial)`` list every output position with the valid input positions
    of its window (explicit loops; padding positions are skipped)."""
    spatial = shape[1:]
    nd = len(spatial)
    outs = [(spatial[a] + 2 * p[a] - d[a] * (k[a] - 1) - 1) // s[a] + 1 for a in range(nd)]
    res = []
    for c_ in range(shape[0]):
        for o in torch.cartesian_prod(*[torch.arange(n) for n in outs]).reshape(-1, nd).tolist():
            win = []
            for t in torch.cartesian_prod(*[torch.arange(n) for n in k]).reshape(-1, nd).tolist():
                pos = [o[a] * s[a] - p[a] + t[a] * d[a] for a in range(nd)]
                if all(0 <= pos[a] < spatial[a] for a in range(nd)):
                    win.append((c_,) + tuple(pos))
            res.append(((c_,) + tuple(o), win))
    return res


def argmax_matrix(v: Tensor, windows) -> Tensor:
    """``M_ji = 1`` if input i is the (first) maximum of window j of the sample ``v``."""
    flat = v.reshape(-1)
    idx = torch.arange(flat.numel()).reshape(v.shape)
    M = torch.zeros(len(windows), flat.numel(), dtype=DT)
    for j, (_, win) in enumerate(windows):
        best = max(win, key=lambda q: (v[q].item(), -int(idx[q])))
        M[j, int(idx[best])] = 1.0
    return M


MAXPOOLS = {
    "2d_overlap": (lambda: nn.MaxPool2d(3, stride=2, padding=1), (B, 2, 7, 7), (3, 3), (2, 2), (1, 1), (1, 1)),
    "2d_dilated": (lambda: nn.MaxPool2d(2, stride=1, dilation=2), (B, 2, 5, 5), (2, 2), (1, 1), (0, 0), (2, 2)),
    "1d_overlap": (lambda: nn.MaxPool1d(3, stride=1), (B, 2, 7), (3,), (1,), (0,), (1,)),
    "f.max_pool2d": (lambda: Lambda(lambda x: F.max_pool2d(x, 3, 2)), (B, 2, 7, 7), (3, 3), (2, 2), (0, 0), (1, 1)),
}


@pytest.mark.parametrize("divide", [True, False])
@pytest.mark.parametrize("variant", ["head", "paper"])
@pytest.mark.parametrize("case", list(MAXPOOLS))
def test_abs_maxpool(case: str, variant: str, divide: bool) -> None:
    make, shape, k, s, p, d = MAXPOOLS[case]
    m = make()
    x = torch.randn(shape, dtype=DT)
    c = node_of(m, x, not_structural)
    with torch.no_grad():
        h = m(x)
    R = rel_like(h)
    out = A.AbsMaxPool(variant, divide=divide)(c.ctx, R)
    win = maxpool_windows(shape[1:], k, s, p, d)
    hf = h.reshape(B, -1)
    G = []
    for b in range(B):
        xb = x[b].reshape(-1)
        Mx = argmax_matrix(x[b], win)
        # the reference's window order matches PyTorch's output order
        assert torch.allclose(Mx @ xb, hf[b])
        if variant == "head":  # twin maxpool(|x|): x * scatter_x + |x| * scatter_|x|
            G.append(Mx * xb[None] + argmax_matrix(x[b].abs(), win) * xb.abs()[None])
        else:  # twin |h|: VJP = scatter_x(sign(h) .)
            G.append(Mx * xb[None] * (1 + torch.sign(hf[b]))[:, None])
    check_abs(out, [torch.stack(G)], hf, R, variant, [0], divide=divide)


def test_winner_takes_all() -> None:
    make, shape, k, s, p, d = MAXPOOLS["2d_overlap"]
    m = make()
    x = torch.randn(shape, dtype=DT)
    c = node_of(m, x, not_structural, preset="lrp-epsilon")
    assert isinstance(c.rule, C.WinnerTakesAll)
    with torch.no_grad():
        h = m(x)
    R = rel_like(h)
    out = c.rule(c.ctx, R)
    win = maxpool_windows(shape[1:], k, s, p, d)
    for b in range(B):
        M = argmax_matrix(x[b], win)
        for kk in range(K):
            close(out[0][kk, b].reshape(-1), M.T @ R[kk, b].reshape(-1))
    close(out[0].sum(dim=(2, 3, 4)), R.sum(dim=(2, 3, 4)))


# --------------------------------------------------------------------------------------------
# element-wise activations


def autograd_derivative(f: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """f'(x) element-wise, by autograd (test side only)."""
    t = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(t).sum(), t)
    return g


ACTS = {
    "relu": (lambda: nn.ReLU(), F.relu),
    "f.relu": (lambda: Lambda(F.relu), F.relu),
    "leaky_module": (lambda: nn.LeakyReLU(0.2), lambda t: F.leaky_relu(t, 0.2)),
    "leaky_default": (lambda: nn.LeakyReLU(), lambda t: F.leaky_relu(t, 0.01)),
    "f.leaky_relu": (lambda: Lambda(lambda t: F.leaky_relu(t, 0.3)), lambda t: F.leaky_relu(t, 0.3)),
    "gelu_erf": (lambda: nn.GELU(), F.gelu),
    "gelu_tanh": (lambda: nn.GELU(approximate="tanh"), lambda t: F.gelu(t, approximate="tanh")),
    "f.gelu_tanh": (lambda: Lambda(lambda t: F.gelu(t, approximate="tanh")),
                    lambda t: F.gelu(t, approximate="tanh")),
    "silu": (lambda: nn.SiLU(), F.silu),
    "sigmoid": (lambda: nn.Sigmoid(), torch.sigmoid),
    "tanh": (lambda: nn.Tanh(), torch.tanh),
}


@pytest.mark.parametrize("name", list(A.ELEMENTWISE))
def test_explicit_derivatives_match_autograd(name: str) -> None:
    f, df = A.ELEMENTWISE[name]
    x = torch.linspace(-4, 4, 101, dtype=DT)
    x = x[x != 0]  # the kink of relu / leaky_relu
    close(df(x), autograd_derivative(f, x))
    assert df(x).dtype == DT
    if name == "gelu":
        close(A.d_gelu_tanh(x), autograd_derivative(A.gelu_tanh, x))


@pytest.mark.parametrize("report", [True, False], ids=["report", "fast"])
@pytest.mark.parametrize("variant", ["head", "paper"])
@pytest.mark.parametrize("name", list(ACTS))
def test_abs_elementwise(name: str, variant: str, report: bool) -> None:
    make, f = ACTS[name]
    m = make()
    x = torch.randn(B, 3, 4, dtype=DT) * 2
    c = node_of(m, x, not_structural)
    assert isinstance(c.rule, A.AbsElementwise)
    with torch.no_grad():
        h = f(x)
        close(c.ctx.output, h)
    R = rel_like(h)
    rule = A.AbsElementwise(c.rule.f, c.rule.df, variant, label=c.rule.label)
    c.ctx.report = report
    out = rule(c.ctx, R)
    d = autograd_derivative(f, x)
    if variant == "head":  # twin f(|x|): [x f'(x) + |x| f'(|x|)]
        g = x * d + x.abs() * autograd_derivative(f, x.abs())
    else:  # twin |f(x)|: x f'(x) (1 + sign f(x))
        g = x * d * (1 + torch.sign(h))
    (check_abs if report else check_fast)(out, [torch.diag_embed(g.reshape(B, -1))], h.reshape(B, -1), R, variant, [0])


def test_abs_flatten_identity_rule() -> None:
    """nn.Flatten under absLRP: identity-like rule, relevance only on positive entries (spec 1.1)."""
    x = torch.randn(B, 2, 3, dtype=DT)
    c = node_of(nn.Flatten(), x, lambda c: True)
    R = rel_like(x.reshape(B, -1))
    out = c.rule(c.ctx, R)
    g = torch.diag_embed((2 * x.clamp(min=0)).reshape(B, -1))
    check_abs(out, [g], x.reshape(B, -1), R, "paper", [0])


# --------------------------------------------------------------------------------------------
# additions and constant scalings under absLRP


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 5).to(DT)

    def forward(self, x):
        return x + self.lin(x)


class AddParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.randn(1, 5, dtype=DT))

    def forward(self, x):
        return x + self.p


@pytest.mark.parametrize("variant", ["head", "paper"])
@pytest.mark.parametrize("model", [Residual, AddParam])
def test_abs_add(model, variant: str) -> None:
    m = model()
    x = torch.randn(B, 5, dtype=DT)
    c = node_of(m, x, lambda c: c.node.target is operator.add)
    a, b_ = c.ctx.inputs
    h = c.ctx.output
    R = rel_like(h)
    out = A.AbsAdd(variant)(c.ctx, R)
    G = [torch.diag_embed(2 * v.expand_as(h).clamp(min=0)) for v in (a, b_)]
    if model is Residual and variant == "head":
        # the current code differentiates through the branch b_ = W a + c as well: the shortcut a
        # also gets a_i * sum_j W_ji (1 + sign b_j) S_j (rules/residual.py)
        G[0] = G[0] + a[:, None, :] * m.lin.weight[None] * (1 + torch.sign(b_))[:, :, None]
    check_abs(out, G, h, R, variant, [0, 1])
    if variant == "paper":
        # spec 2.9: the positive share of a is sum_j a_j+ S_j+ / sum_j (a_j+ + b_j+) S_j+
        s = (R / (h.abs() + EPS)).clamp(min=0)
        share = (a.clamp(min=0) * s).sum(-1) / ((a.clamp(min=0) + b_.expand_as(h).clamp(min=0)) * s).sum(-1)
        close(split_parts(out[0])[0].sum(-1), share * R.clamp(min=0).sum(-1), rtol=1e-7)


class Scales(nn.Module):
    def __init__(self, which: str):
        super().__init__()
        self.which = which
        self.c = nn.Parameter(torch.tensor([0.5, -2.0, 1.5, -0.1], dtype=DT))

    def forward(self, x):
        return {"mul": lambda: x * -2.0, "rmul": lambda: 3.0 * x, "div": lambda: x / 4.0,
                "param": lambda: x * self.c, "torch.mul": lambda: torch.mul(x, 0.5)}[self.which]()


SCALE_C = {"mul": -2.0, "rmul": 3.0, "div": 0.25, "torch.mul": 0.5}


@pytest.mark.parametrize("variant", ["head", "paper"])
@pytest.mark.parametrize("which", ["mul", "rmul", "div", "param", "torch.mul"])
def test_abs_scale(which: str, variant: str) -> None:
    m = Scales(which)
    x = torch.randn(B, 4, dtype=DT)
    c = node_of(m, x, not_structural)  # the preset may route constants through a product rule
    cst = m.c.detach() if which == "param" else SCALE_C[which]
    h = x * cst
    close(c.ctx.output, h)
    R = rel_like(h)
    out = A.AbsScale(variant)(c.ctx, R)
    slot = next(i for i, p in enumerate(c.ctx.is_parameter) if not p)
    g = torch.diag_embed(2 * (cst * x).clamp(min=0))  # twin |c||x|: c x + |c x|
    check_abs(out, [g], h, R, variant, [slot])


# --------------------------------------------------------------------------------------------
# classic rules


def stab(z: Tensor, eps: float) -> Tensor:
    """``z + eps * sign(z)`` with sign(0) = +1 (Zennit's stabiliser), written out."""
    return torch.where(z >= 0, z + eps, z - eps)


def classic_ref(zs: Sequence[Tuple[float, Tensor, Tensor]], R: Tensor, eps: float) -> Tensor:
    """``R_i = sum_terms coef * sum_j z_ij R_j / stab(z_j)`` per (k, b).

    ``zs`` holds ``(coef, z (B, out, in), zj (B, out))``: the contributions and the (possibly biased)
    denominators of each term. Explicit loops over k, b, j.
    """
    Rf = R.reshape(R.shape[0], R.shape[1], -1)
    n_in = zs[0][1].shape[2]
    out = torch.zeros(R.shape[0], R.shape[1], n_in, dtype=DT)
    for k in range(Rf.shape[0]):
        for b in range(Rf.shape[1]):
            for coef, z, zj in zs:
                for j in range(z.shape[1]):
                    out[k, b] += coef * z[b, j] * Rf[k, b, j] / stab(zj[b, j], eps)
    return out


CLASSIC_CASES = ["linear", "conv1d", "conv2d", "f.linear", "f.conv2d", "avgpool2d", "adaptive7to3",
                 "mean23", "conv_transpose2d", "conv_transpose2d_output_size", "f.conv_transpose1d"]


def _classic_setup(case: str):
    make, shape = AFFINE_CASES[case]
    m = make()
    x = torch.randn(shape, dtype=DT)
    c = node_of(m, x, not_structural, preset="lrp-epsilon")
    W, bias = dense_op(lambda t: m(t), shape[1:])
    with torch.no_grad():
        h = m(x)
    return m, x, c, W, bias, h


def _z(x: Tensor, W: Tensor) -> Tensor:
    return x.reshape(x.shape[0], 1, -1) * W[None]


@pytest.mark.parametrize("eps", [0.0, 0.25])
@pytest.mark.parametrize("case", CLASSIC_CASES)
def test_epsilon(case: str, eps: float) -> None:
    m, x, c, W, bias, h = _classic_setup(case)
    R = rel_like(h)
    out = C.Epsilon(eps)(c.ctx, R)
    z = _z(x, W)
    ref = classic_ref([(1.0, z, z.sum(-1) + bias)], R, eps or 1e-12)
    close(out[0].reshape(ref.shape), ref)


def test_epsilon_zero_conserves_without_bias() -> None:
    m = nn.Linear(6, 3, bias=False).to(DT)
    x = torch.randn(B, 6, dtype=DT)
    e = lrpgraph.Explainer(m.eval(), rules="lrp-0")(x, target=1, contrastive=False)
    with torch.no_grad():
        logit = m(x)[:, 1]
    close(e.relevance, x * m.weight[1])  # z-rule on one layer: R_i = x_i w_ti
    close(e.relevance.sum(1), logit)


@pytest.mark.parametrize("case", CLASSIC_CASES)
def test_gamma(case: str) -> None:
    m, x, c, W, bias, h = _classic_setup(case)
    R = rel_like(h)
    g = 0.25
    out = C.Gamma(g)(c.ctx, R)
    W2 = W + g * W.clamp(min=0)
    b2 = bias + g * bias.clamp(min=0)
    z = _z(x, W2)
    ref = classic_ref([(1.0, z, z.sum(-1) + b2)], R, 1e-6)  # Gamma's default stabiliser
    close(out[0].reshape(ref.shape), ref)


@pytest.mark.parametrize("ab", [(2.0, 1.0), (1.0, 0.0)], ids=["a2b1", "zplus"])
@pytest.mark.parametrize("case", CLASSIC_CASES)
def test_alpha_beta(case: str, ab) -> None:
    m, x, c, W, bias, h = _classic_setup(case)
    R = rel_like(h)
    a, b_ = ab
    rule = C.AlphaBeta(a, b_) if b_ else C.ZPlus()
    out = rule(c.ctx, R)
    xf = x.reshape(B, -1)
    xp, xn = xf.clamp(min=0), xf.clamp(max=0)
    Wp, Wn = W.clamp(min=0), W.clamp(max=0)
    zp = xp[:, None, :] * Wp[None] + xn[:, None, :] * Wn[None]
    zn = xp[:, None, :] * Wn[None] + xn[:, None, :] * Wp[None]
    terms = [(a, zp, zp.sum(-1) + bias.clamp(min=0))]
    if b_:
        terms.append((-b_, zn, zn.sum(-1) + bias.clamp(max=0)))
    ref = classic_ref(terms, R, 1e-6)
    close(out[0].reshape(ref.shape), ref, rtol=1e-8)


@pytest.mark.parametrize("case", CLASSIC_CASES)
def test_flat(case: str) -> None:
    m, x, c, W, bias, h = _classic_setup(case)
    R = rel_like(h)
    out = C.Flat()(c.ctx, R)
    conn = (W != 0).to(DT).expand(B, -1, -1)  # z_ij = 1 for every connection
    ref = classic_ref([(1.0, conn, conn.sum(-1))], R, 1e-12)
    close(out[0].reshape(ref.shape), ref)


@pytest.mark.parametrize("case", CLASSIC_CASES)
def test_wsquare(case: str) -> None:
    m, x, c, W, bias, h = _classic_setup(case)
    R = rel_like(h)
    out = C.WSquare()(c.ctx, R)
    w2 = (W ** 2).expand(B, -1, -1)
    ref = classic_ref([(1.0, w2, w2.sum(-1))], R, 1e-12)
    close(out[0].reshape(ref.shape), ref)


@pytest.mark.parametrize("bounds", ["scalar", "channel", "sample"])
@pytest.mark.parametrize("case", ["linear", "conv2d", "f.conv2d"])
def test_zbox(case: str, bounds: str) -> None:
    m, x, c, W, bias, h = _classic_setup(case)
    R = rel_like(h)
    nfeat = x.shape[1]
    if bounds == "scalar":
        low, high = -1.5, 2.0
        lo, hi = torch.full_like(x, low), torch.full_like(x, high)
    elif bounds == "channel":
        low = -1 - torch.rand(nfeat, dtype=DT)
        high = 1 + torch.rand(nfeat, dtype=DT)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        lo, hi = low.reshape(shape).expand_as(x), high.reshape(shape).expand_as(x)
    else:
        low = high = None
        lo = x.reshape(B, -1).amin(1).reshape((B,) + (1,) * (x.dim() - 1)).expand_as(x)
        hi = x.reshape(B, -1).amax(1).reshape((B,) + (1,) * (x.dim() - 1)).expand_as(x)
    out = C.ZBox(low, high)(c.ctx, R)
    Wp, Wn = W.clamp(min=0), W.clamp(max=0)
    z = _z(x, W) - _z(lo, Wp) - _z(hi, Wn)
    ref = classic_ref([(1.0, z, z.sum(-1))], R, 1e-6)
    close(out[0].reshape(ref.shape), ref, rtol=1e-8)


def test_zbox_options_override() -> None:
    """Bounds given per node in ``ctx.options`` win over the rule's own."""
    m, x, c, W, bias, h = _classic_setup("linear")
    R = rel_like(h)
    c.ctx.options = {"low": -3.0, "high": 3.0}
    a = C.ZBox(-1.0, 1.0)(c.ctx, R)[0]
    c.ctx.options = {}
    b_ = C.ZBox(-3.0, 3.0)(c.ctx, R)[0]
    close(a, b_)


@pytest.mark.parametrize("eps", [0.0, 0.25])
@pytest.mark.parametrize("model", [Residual, AddParam])
def test_add_epsilon(model, eps: float) -> None:
    m = model()
    x = torch.randn(B, 5, dtype=DT)
    c = node_of(m, x, lambda c: c.node.target is operator.add, preset="lrp-0")
    a, b_ = c.ctx.inputs
    h = c.ctx.output
    R = rel_like(h)
    out = C.AddEpsilon(eps)(c.ctx, R)
    for v, o in zip((a, b_), out):
        ref = torch.empty_like(R)
        for k in range(K):
            for b in range(B):
                for j in range(h.shape[1]):
                    ref[k, b, j] = v.expand_as(h)[b, j] * R[k, b, j] / stab(h[b, j], eps or 1e-12)
        close(o.expand_as(ref), ref)
    close(out[0] + out[1], R * h / stab(h, eps or 1e-12))


# --------------------------------------------------------------------------------------------
# structural rules: routed relevance == VJP of the op


def vjp_reference(c: Captured, R) -> List[Optional[Tensor]]:
    """The vector-Jacobian product of the captured node w.r.t. each tensor slot, per pass k.

    ``R`` is ``(K, *out)`` or, for tuple-valued nodes, a list of such (``None`` = zero cotangent).
    """
    slots = c.ex.plan.slots[c.node]
    leaves: Dict[fx.Node, Tensor] = {}
    for s, v in zip(slots, c.ctx.inputs):
        if isinstance(v, Tensor) and v.is_floating_point() and s not in leaves:
            leaves[s] = v.detach().clone().requires_grad_(True)
    load = lambda a: fx.node.map_arg(a, lambda n: leaves[n] if n in leaves else c.ctx.inputs[slots.index(n)])  # noqa: E731
    args, kwargs = load(c.node.args), load(c.node.kwargs)
    if c.node.op == "call_module":
        y = c.ex.plan.modules[c.node](*args, **kwargs)
    elif c.node.op == "call_function":
        y = c.node.target(*args, **kwargs)
    else:
        y = getattr(args[0], c.node.target)(*args[1:], **kwargs)
    ys = list(y) if isinstance(y, (tuple, list)) else [y]
    Rs = R if isinstance(R, list) else [R]
    nk = next(r for r in Rs if r is not None).shape[0]
    per_leaf = {s: [] for s in leaves}
    for k in range(nk):
        cot = [torch.zeros_like(t) if r is None else r[k] for t, r in zip(ys, Rs + [None] * (len(ys) - len(Rs)))]
        gs = torch.autograd.grad(ys, list(leaves.values()), cot, retain_graph=True, allow_unused=True)
        for s, g in zip(leaves, gs):
            per_leaf[s].append(torch.zeros_like(leaves[s]) if g is None else g)
    # a node used twice as a slot: the walker sums both slots; report the VJP on the first
    out: List[Optional[Tensor]] = []
    seen = set()
    for s in slots:
        if s in leaves and s not in seen:
            out.append(torch.stack(per_leaf[s]))
            seen.add(s)
        else:
            out.append(None)
    return out


def _total(o):
    """A rule's slot output as one tensor (a :class:`Split` is the sum of its streams)."""
    return o.total() if isinstance(o, Split) else o


class IndexBuf(nn.Module):
    """Index with a stored index tensor (with repeats)."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.register_buffer("idx", torch.tensor([2, 0, 2, 1]))
        self.fn = fn

    def forward(self, x):
        return self.fn(x, self.idx)


X4 = (B, 3, 4, 5)
STRUCT_CASES = {
    "contiguous": (lambda: Lambda(lambda x: x.contiguous()), X4, S.PassThrough),
    "clone": (lambda: Lambda(lambda x: x.clone()), X4, S.PassThrough),
    "dropout": (lambda: nn.Dropout(0.5), X4, S.PassThrough),
    "to": (lambda: Lambda(lambda x: x.to(torch.float64)), X4, S.PassThrough),
    "view": (lambda: Lambda(lambda x: x.view(x.shape[0], -1)), X4, S.Reshape),
    "flatten": (lambda: Lambda(lambda x: torch.flatten(x, 2)), X4, S.Reshape),
    "unsqueeze": (lambda: Lambda(lambda x: x.unsqueeze(2)), X4, S.Reshape),
    "squeeze": (lambda: Lambda(lambda x: x[:, :1].squeeze(1)), X4, S.Reshape),
    "permute": (lambda: Lambda(lambda x: x.permute(0, 2, 3, 1)), X4, S.Permute),
    "torch.permute": (lambda: Lambda(lambda x: torch.permute(x, (0, 3, 1, 2))), X4, S.Permute),
    "permute_neg": (lambda: Lambda(lambda x: x.permute(0, -1, 1, 2)), X4, S.Permute),
    "transpose": (lambda: Lambda(lambda x: x.transpose(1, 3)), X4, S.Transpose),
    "torch.transpose": (lambda: Lambda(lambda x: torch.transpose(x, -1, 1)), X4, S.Transpose),
    "swapaxes": (lambda: Lambda(lambda x: x.swapaxes(1, 2)), X4, S.Transpose),
    "t2d": (lambda: Lambda(lambda x: x.t()), (B, 3), S.Transpose),
    "mT": (lambda: Lambda(lambda x: x.mT), X4, S.Attribute),
    "T2d": (lambda: Lambda(lambda x: x.T), (B, 3), S.Attribute),
    "mH": (lambda: Lambda(lambda x: x.mH), X4, S.Attribute),
    "getitem_slices": (lambda: Lambda(lambda x: x[:, 1:3, ::2]), X4, S.GetItem),
    "getitem_int": (lambda: Lambda(lambda x: x[:, 0]), X4, S.GetItem),
    "getitem_none": (lambda: Lambda(lambda x: x[:, None, 1]), X4, S.GetItem),
    "getitem_ellipsis": (lambda: Lambda(lambda x: x[..., 1:4]), X4, S.GetItem),
    "getitem_ellipsis_int": (lambda: Lambda(lambda x: x[..., 2]), X4, S.GetItem),
    "getitem_tensor": (lambda: IndexBuf(lambda x, i: x[:, i]), X4, S.GetItem),
    "getitem_tensor_last": (lambda: IndexBuf(lambda x, i: x[..., i]), X4, S.GetItem),
    "getitem_tensor_mid": (lambda: IndexBuf(lambda x, i: x[:, 1:, i]), X4, S.GetItem),
    "cat": (lambda: Lambda(lambda x: torch.cat([x, x[:, :1] * 2.0, x], dim=1)), X4, S.Cat),
    "cat_neg": (lambda: Lambda(lambda x: torch.cat((x[:, :, :2] * 2.0, x), -2)), X4, S.Cat),
    "stack": (lambda: Lambda(lambda x: torch.stack([x, x * 3.0], dim=2)), X4, S.Stack),
    "stack_neg": (lambda: Lambda(lambda x: torch.stack([x * 3.0, x], -1)), X4, S.Stack),
    "expand": (lambda: Lambda(lambda x: x[:, :, :1].expand(-1, -1, 4, -1)), X4, S.Expand),
    "expand_as": (lambda: Lambda(lambda x: x[:, :1].expand_as(x)), X4, S.Expand),
    "broadcast_to": (lambda: Lambda(lambda x: torch.broadcast_to(x[:, :, :, :1], x.shape)), X4, S.Expand),
}


@pytest.mark.parametrize("case", list(STRUCT_CASES))
def test_structural_is_vjp(case: str) -> None:
    make, shape, kind = STRUCT_CASES[case]
    m = make()
    x = torch.randn(shape, dtype=DT)
    caps = capture(m, x, "lrp-0")  # the exact routing (the absLRP presets wrap it, see test_abslrp_fidelity)
    c = caps[-1]  # the last node is the op under test (inner getitems / scalings come first)
    if kind is not None:
        assert isinstance(c.rule, kind), f"{case}: got rule {c.rule.name}"
    R = torch.randn((K,) + tuple(c.ctx.output.shape), dtype=DT)
    out = c.rule(c.ctx, R)
    ref = vjp_reference(c, R)
    slots = c.ex.plan.slots[c.node]
    assert len(out) == len(slots)
    total = 0
    for i, (o, r) in enumerate(zip(out, ref)):
        if r is None:
            continue
        # the walker sums every slot of the same node; do the same here (None = no relevance)
        o_sum = sum(_total(out[j]) for j, s in enumerate(slots) if s is slots[i] and out[j] is not None)
        if isinstance(o_sum, int):  # no relevance: the op's VJP must vanish (a shape-only operand)
            assert bool((r == 0).all()), f"slot {i} got no relevance"
            continue
        close(o_sum.reshape(r.shape), r, rtol=1e-12, atol=1e-12)
        total = total + o_sum.reshape(K, -1).sum(-1)
    close(total, R.reshape(K, -1).sum(-1), rtol=1e-12, atol=1e-12)  # exact mass
    # end to end: the whole walk routes exactly (no leak at any node); lrp-0 keeps the routing
    # exact (the absLRP presets wrap it: test_abslrp_fidelity.py)
    e = lrpgraph.Explainer(m.eval(), rules="lrp-0")(x, output_relevance=R)
    assert e.conservation().max_rel_error() < 1e-8  # 1e-9 stabilisers of the scalings' sign split


class UnbindModel(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how

    def forward(self, x):
        if self.how == "unbind":
            parts = x.unbind(1)
            return torch.cat([parts[0], parts[2] * 2.0], dim=-1)
        if self.how == "torch.unbind":
            parts = torch.unbind(x, dim=-1)
            return parts[1] + parts[3]
        if self.how == "chunk":
            parts = x.chunk(2, 2)
            return parts[1] * 1.5
        parts = torch.split(x, [1, 3], dim=2)
        return torch.cat([parts[0], parts[1]], dim=-2)


@pytest.mark.parametrize("how", ["unbind", "torch.unbind", "chunk", "split"])
def test_tuple_ops_are_vjp(how: str) -> None:
    m = UnbindModel(how)
    x = torch.randn(X4, dtype=DT)
    caps = capture(m, x, "lrp-0")  # the exact routing (the absLRP presets wrap it, see test_abslrp_fidelity)
    c = next(c for c in caps if isinstance(c.rule, (S.Unbind, S.Split_)))
    n_out = len(c.ctx.output_shape)
    # relevance for a few pieces only (the others None), K passes each
    R = [torch.randn((K,) + tuple(sh), dtype=DT) if i % 2 == 0 else None
         for i, sh in enumerate(c.ctx.output_shape)]
    out = c.rule(c.ctx, R)
    ref = vjp_reference(c, R)
    close(out[0], ref[0], rtol=1e-12, atol=1e-12)
    close(out[0].reshape(K, -1).sum(-1), sum(r.reshape(K, -1).sum(-1) for r in R if r is not None))
    assert n_out >= 2
    # the getitem on the tuple routes a piece into its slot of the list
    gi = next(g for g in caps if isinstance(g.rule, S.GetItem) and g.node.args[0] is c.node)
    r = torch.randn((K,) + tuple(gi.ctx.output.shape), dtype=DT)
    routed = gi.rule(gi.ctx, r)[0]
    assert isinstance(routed, list) and routed[gi.node.args[1]] is r
    e = lrpgraph.Explainer(m.eval(), rules="abslrp")
    ex = e(x, output_relevance=torch.randn((K,) + tuple(caps[-1].ctx.output.shape), dtype=DT))
    assert ex.conservation().max_rel_error() < 1e-9


def test_structural_k_axis_broadcast() -> None:
    """Two different relevance passes through a chain of shape ops equal two single passes."""
    m = Lambda(lambda x: x.permute(0, 2, 1, 3).reshape(x.shape[0], 4, -1)[:, 1:].transpose(1, 2))
    x = torch.randn(X4, dtype=DT)
    ex = lrpgraph.Explainer(m.eval(), rules="abslrp")
    with torch.no_grad():
        y = m(x)
    R = rel_like(y)
    both = ex(x, output_relevance=R).relevance
    for k in range(K):
        one = ex(x, output_relevance=R[k:k + 1]).relevance
        close(both[:, k], one.reshape(both[:, k].shape))


@pytest.mark.parametrize("size", [16, 18])
def test_patch_conv_transpose_matches_conv_backward(size):
    """The matmul path for non-overlapping patch convolutions (ViT patch embedding) equals the
    generic transposed convolution, including inputs the patches do not cover exactly."""
    from lrpgraph.rules.affine import ConvAffine

    torch.manual_seed(0)
    w = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    op = ConvAffine(w, None, (4, 4), (0, 0), (1, 1), 1, (2, 3, size, size))
    assert op._patchify(w)
    s = torch.randn(2, 2, 5, size // 4, size // 4, dtype=torch.float64)
    ref = torch.nn.grad.conv2d_input((4, 3, size, size), w, s.reshape(4, 5, size // 4, size // 4), 4, 0)
    torch.testing.assert_close(op.transpose(s, w), ref.reshape(2, 2, 3, size, size))
