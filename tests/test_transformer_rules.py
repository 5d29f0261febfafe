"""Each transformer rule against a slow, literal float64 reference (spec 2.4, 2.6-2.8).

The references materialise every contribution ``z`` (e.g. ``z[i, k, j] = a[i, k] * b[k, j]`` for a
matmul) and apply the formulas of the spec entry by entry; the rules use transposed products.
"""
from __future__ import annotations

import math
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrpgraph  # noqa: F401  (registers the transformer rules)
from lrpgraph.attention import attention_mask, scale_query
from lrpgraph.rule import EPS, NodeContext, Split
from lrpgraph.rules import transformer as T
from lrpgraph.rules.abslrp import ELEMENTWISE, AbsElementwise
from lrpgraph.text import masked_mean

D = torch.float64


def ctx_for(target, args, kwargs=None, out=None, module=None, const=()):
    """A NodeContext for calling ``target(*args)``; tensors in args are the slots."""
    kwargs = kwargs or {}
    slots = [a for a in args if isinstance(a, torch.Tensor)]
    for v in kwargs.values():
        if isinstance(v, torch.Tensor):
            slots.append(v)
    if out is None:
        out = module(*args) if module is not None else target(*args, **kwargs)
    return NodeContext(name="n", op="call_module" if module is not None else "call_function",
                       target=target, module=module, args=tuple(args), kwargs=kwargs, inputs=slots,
                       input_shapes=[s.shape for s in slots], output=out, output_shape=out.shape,
                       batch_size=slots[0].shape[0], is_parameter=[i in const for i in range(len(slots))])


def total(r):
    return r.total() if isinstance(r, Split) else r


def paper_reference(R, raws):
    """Spec 1.3 written out: r+ and r- per slot from the raw contributions, each sign's mass
    conserved jointly over the slots. ``raws(S)`` -> list of raw per-slot contributions."""
    K = R.shape[0]
    out = [torch.zeros_like(r) for r in raws(torch.zeros_like(R))]
    for k in range(K):
        for b in range(R.shape[1]):
            Rk = R[k:k + 1, b:b + 1]
            P, N = Rk.clamp(min=0).sum(), Rk.clamp(max=0).sum()
            for part, mass in ((Rk.clamp(min=0), P), (Rk.clamp(max=0), N.abs())):
                full = torch.zeros_like(R)
                full[k:k + 1, b:b + 1] = part
                rs = raws(full)
                tot = sum(float(r[k, b].abs().sum()) for r in rs)
                for i, r in enumerate(rs):
                    out[i][k, b] += mass * r[k, b] / (tot + EPS)
    return out


# ------------------------------------------------------------------------------------------
# products


def literal_matmul_raw(a, b, S):
    """z[b, i, k, j] = a[b, i, k] * b[b, k, j]; r_a = sum_j (z + |z|) S[., b, i, j], r_b = sum_i."""
    z = a.unsqueeze(-1) * b.unsqueeze(-3)                  # (B, n, m, p)
    zz = (z + z.abs()).unsqueeze(0)                        # (1, B, n, m, p)
    Sx = S.unsqueeze(-2)                                    # (K, B, n, 1, p)
    return [(zz * Sx).sum(-1), (zz * Sx).sum(-3)]


@pytest.mark.parametrize("signs", ["mixed", "a>=0", "b>=0"])
@pytest.mark.parametrize("variant", ["paper", "head"])
def test_matmul_matches_literal(variant, signs):
    a, b = torch.randn(2, 4, 5, dtype=D), torch.randn(2, 5, 3, dtype=D)
    if signs == "a>=0":
        a = a.abs()
    if signs == "b>=0":
        b = b.abs()
    R = torch.randn(3, 2, 4, 3, dtype=D)
    ctx = ctx_for(torch.matmul, (a, b))
    got = T.AbsProduct(variant)(ctx, R)
    den = ctx.output.abs() + EPS
    if variant == "head":
        want = literal_matmul_raw(a, b, R / den)
    else:
        want = paper_reference(R, lambda r: literal_matmul_raw(a, b, r / den))
    for g, w in zip(got, want):
        torch.testing.assert_close(total(g), w, rtol=1e-8, atol=1e-10)


def test_matmul_paper_splits_bilinear_mass_evenly():
    """Spec 2.8: for a bilinear product both operands' raw totals are equal: an exact 50/50 split."""
    a, b = torch.randn(1, 6, 4, dtype=D), torch.randn(1, 4, 6, dtype=D)
    R = torch.rand(1, 1, 6, 6, dtype=D)
    ra, rb = T.AbsProduct("paper")(ctx_for(torch.matmul, (a, b)), R)
    ma, mb = float(total(ra).abs().sum()), float(total(rb).abs().sum())
    assert ma == pytest.approx(mb, rel=1e-12)
    assert ma + mb == pytest.approx(float(R.sum()), rel=1e-12)


def test_matmul_with_constant_operand_is_affine():
    """A weight operand takes no relevance; the activation gets the absLRP affine rule."""
    x, w = torch.randn(2, 3, 4, dtype=D), torch.randn(4, 5, dtype=D)
    R = torch.randn(1, 2, 3, 5, dtype=D)
    ctx = ctx_for(torch.matmul, (x, w), const=(1,))
    rx, rw = T.AbsProduct("head")(ctx, R)
    assert rw is None
    want = literal_matmul_raw(x, w.expand(2, 4, 5), R / (ctx.output.abs() + EPS))[0]
    torch.testing.assert_close(rx, want)


@pytest.mark.parametrize("variant", ["paper", "head"])
def test_einsum_matches_literal(variant):
    a, b = torch.randn(2, 3, 4, dtype=D), torch.randn(2, 5, 4, dtype=D)  # "bid,bjd->bij" (q k^T)
    R = torch.randn(2, 2, 3, 5, dtype=D)
    ctx = ctx_for(torch.einsum, ("bid,bjd->bij", a, b))
    got = T.AbsProduct(variant)(ctx, R)
    den = ctx.output.abs() + EPS
    raw = lambda r: literal_matmul_raw(a, b.transpose(1, 2), r / den)  # noqa: E731
    want = raw(R) if variant == "head" else paper_reference(R, raw)
    torch.testing.assert_close(total(got[0]), want[0])
    torch.testing.assert_close(total(got[1]), want[1].transpose(-1, -2))


def test_einsum_ellipsis_and_implicit_output():
    a, b = torch.randn(2, 3, 4, dtype=D), torch.randn(2, 4, dtype=D)
    for eq in ("...ij,...j->...i", "bij,bj"):
        ctx = ctx_for(torch.einsum, (eq, a, b))
        R = torch.randn(1, *ctx.output.shape, dtype=D)
        ra, rb = T.AbsProduct("head")(ctx, R)
        want = literal_matmul_raw(a, b.unsqueeze(-1), (R / (ctx.output.abs() + EPS)).unsqueeze(-1))
        torch.testing.assert_close(ra, want[0])
        torch.testing.assert_close(rb, want[1].squeeze(-1))


@pytest.mark.parametrize("variant", ["paper", "head"])
def test_mul_of_two_activations_matches_literal(variant):
    a, b = torch.randn(2, 7, dtype=D), torch.randn(2, 7, dtype=D)
    R = torch.randn(2, 2, 7, dtype=D)
    ctx = ctx_for(operator.mul, (a, b))
    got = T.AbsMul(variant)(ctx, R)
    raw = lambda r: [(a * b + (a * b).abs()) * r / (ctx.output.abs() + EPS)] * 2  # noqa: E731
    want = raw(R) if variant == "head" else paper_reference(R, raw)
    for g, w in zip(got, want):
        torch.testing.assert_close(total(g), w)


def test_mul_by_constant_still_scales():
    x = torch.randn(2, 5, dtype=D)
    R = torch.randn(1, 2, 5, dtype=D)
    got = T.AbsMul("head")(ctx_for(operator.mul, (x, 0.5)), R)[0]
    torch.testing.assert_close(got, 2 * (0.5 * x).clamp(min=0) * R / ((0.5 * x).abs() + EPS))


def test_classic_product_is_halved_z_rule():
    a, b = torch.randn(1, 3, 4, dtype=D), torch.randn(1, 4, 2, dtype=D)
    R = torch.randn(1, 1, 3, 2, dtype=D)
    ctx = ctx_for(torch.matmul, (a, b))
    ra, rb = T.ProductEpsilon(0.0)(ctx, R)
    z = a.unsqueeze(-1) * b.unsqueeze(-3)
    share = z / (a @ b).unsqueeze(-2) * R.unsqueeze(-2) / 2
    torch.testing.assert_close(ra, share.sum(-1))
    torch.testing.assert_close(rb, share.sum(-3))
    assert float(ra.sum() + rb.sum()) == pytest.approx(float(R.sum()), rel=1e-9)


# ------------------------------------------------------------------------------------------
# softmax


def literal_softmax(x, R, variant, signs="keep"):
    """Spec 2.7 entry by entry over the last dim; h_abs = softmax(|x|) over the unmasked entries."""
    h = torch.softmax(x, -1)
    out = torch.zeros_like(R)
    for k in range(R.shape[0]):
        for idx in torch.cartesian_prod(*[torch.arange(n) for n in x.shape[:-1]]).reshape(-1, x.dim() - 1):
            idx = tuple(int(i) for i in idx)
            row, hr = x[idx], h[idx]
            live = hr > 0
            ex = torch.exp(row[live].abs() - row[live].abs().max())
            ha = torch.zeros_like(row)
            ha[live] = ex / ex.sum()
            for j in range(row.shape[0]):
                if not live[j]:
                    continue
                S = R[(k,) + idx + (j,)] / (hr[j] + EPS)
                if variant == "head":
                    c = row[j] * hr[j] + abs(row[j]) * ha[j]
                else:
                    c = 2 * (abs(row[j]) if signs == "keep" else row[j]) * hr[j]
                out[(k,) + idx + (j,)] = c * S
    return out


@pytest.mark.parametrize("report", [True, False], ids=["report", "fast"])  # fast: what explain() runs
@pytest.mark.parametrize("masked", [False, True])  # unmasked: the branch every ViT uses
@pytest.mark.parametrize("variant,signs", [("paper", "keep"), ("paper", "flip"), ("head", "keep")])
def test_softmax_matches_literal(variant, signs, masked, report):
    x = torch.randn(2, 3, 5, dtype=D) * 2
    if masked:
        x[0, 1, 3] = float("-inf")  # a masked entry
    R = torch.randn(2, 2, 3, 5, dtype=D)
    ctx = ctx_for(torch.softmax, (x,), {"dim": -1})
    ctx.report = report
    got = total(T.AbsSoftmax(variant, signs=signs)(ctx, R)[0])
    ref = literal_softmax(x, R, variant, signs)
    if variant == "paper":
        ref = paper_reference(R, lambda r: [literal_softmax(x, r, variant, signs)])[0]
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref)
    if masked:
        assert float(got[:, 0, 1, 3].abs().max()) == 0.0


def test_softmax_paper_keep_conserves_signed_masses():
    x = torch.randn(3, 6, dtype=D)
    R = torch.randn(1, 3, 6, dtype=D)
    s = T.AbsSoftmax("paper", signs="keep")(ctx_for(torch.softmax, (x,), {"dim": -1}), R)[0]
    assert bool((s.pos >= 0).all()) and bool((s.neg <= 0).all())
    torch.testing.assert_close(s.pos.sum(-1), R.clamp(min=0).sum(-1))
    torch.testing.assert_close(s.neg.sum(-1), R.clamp(max=0).sum(-1))


@pytest.mark.parametrize("report", [True, False])
def test_softmax_paper_flip_conserves_stream_masses(report):
    """The default paper-era softmax keeps the sign of 2 x h: where a score is negative, part of
    a stream flips sign; each stream keeps its mass as an L1 norm, and the one-pass form (no
    report) gives the two-stream result."""
    x = torch.randn(3, 6, dtype=D)
    R = torch.randn(1, 3, 6, dtype=D)
    ctx = ctx_for(torch.softmax, (x,), {"dim": -1})
    ctx.report = True
    s = T.AbsSoftmax("paper")(ctx, R)[0]
    assert bool((s.pos < 0).any())  # some positive relevance did flip (x has negative scores)
    torch.testing.assert_close(s.pos.abs().sum(-1), R.clamp(min=0).sum(-1))
    torch.testing.assert_close(s.neg.abs().sum(-1), R.clamp(max=0).abs().sum(-1))
    if not report:
        ctx2 = ctx_for(torch.softmax, (x,), {"dim": -1})
        ctx2.report = False
        torch.testing.assert_close(T.AbsSoftmax("paper")(ctx2, R)[0], s.total())


# ------------------------------------------------------------------------------------------
# LayerNorm


def literal_layernorm(x, g, b, eps, R, variant, signs="keep"):
    out = torch.zeros_like(R)
    h = F.layer_norm(x, (x.shape[-1],), g, b, eps)
    for k in range(R.shape[0]):
        for i in range(x.shape[0]):
            for t in range(x.shape[1]):
                row = x[i, t]
                mu = row.mean()
                sd = math.sqrt(float(((row - mu) ** 2).mean()) + eps)
                ra = row.abs()
                sda = math.sqrt(float(((ra - ra.mean()) ** 2).mean()) + eps)
                for d in range(row.shape[0]):
                    S = R[k, i, t, d] / (abs(h[i, t, d]) + EPS)
                    if variant == "head":
                        c = row[d] * g[d] / sd + abs(row[d]) * abs(g[d]) / sda
                    else:
                        c = row[d] * (g[d] + abs(g[d]) * torch.sign(row[d] - mu)) / sd
                        c = abs(c) if signs == "keep" else c
                    out[k, i, t, d] = c * S
    return out


@pytest.mark.parametrize("report", [True, False], ids=["report", "fast"])
@pytest.mark.parametrize("variant,signs", [("paper", "keep"), ("paper", "flip"), ("head", "keep")])
@pytest.mark.parametrize("form", ["module", "function"])
def test_layernorm_matches_literal(variant, signs, form, report):
    x = torch.randn(2, 3, 6, dtype=D) + 0.3
    ln = nn.LayerNorm(6, eps=1e-6).double().requires_grad_(False)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(6, dtype=D))
        ln.bias.copy_(torch.randn(6, dtype=D))
    R = torch.randn(2, 2, 3, 6, dtype=D)
    if form == "module":
        ctx = ctx_for(nn.LayerNorm, (x,), module=ln)
    else:
        ctx = ctx_for(F.layer_norm, (x, (6,), ln.weight, ln.bias, 1e-6), const=(1, 2))
    ctx.report = report
    got = T.AbsLayerNorm(variant, signs=signs)(ctx, R)
    assert all(g is None for g in got[1:])
    raw = lambda r: [literal_layernorm(x, ln.weight, ln.bias, 1e-6, r, variant, signs)]  # noqa: E731
    want = raw(R)[0] if variant == "head" else paper_reference(R, raw)[0]
    torch.testing.assert_close(total(got[0]), want)


def test_layernorm_head_contributions_are_nonnegative():
    """Spec 2.6: x g/s(x) + |x||g|/s(|x|) >= 0 since s(|x|) <= s(x)."""
    x = torch.randn(4, 5, 8, dtype=D)
    R = torch.rand(1, 4, 5, 8, dtype=D)
    ctx = ctx_for(F.layer_norm, (x, (8,), torch.randn(8, dtype=D), None, 1e-6), const=(1,))
    assert bool((T.AbsLayerNorm("head")(ctx, R)[0] >= 0).all())


# ------------------------------------------------------------------------------------------
# GELU (existing rule; the paper variant must match spec 2.4)


def test_gelu_paper_matches_spec():
    x = torch.linspace(-4, 4, 41, dtype=D).reshape(1, 41)
    R = torch.randn(1, 1, 41, dtype=D)
    f, df = ELEMENTWISE["gelu"]
    got = total(AbsElementwise(f, df, "paper", label="gelu")(ctx_for(F.gelu, (x,)), R)[0])

    def raw(r):
        out = torch.zeros_like(r)
        for j in range(41):
            xj = float(x[0, j])
            fx = 0.5 * xj * (1 + math.erf(xj / math.sqrt(2)))
            dfx = 0.5 * (1 + math.erf(xj / math.sqrt(2))) + xj * math.exp(-xj * xj / 2) / math.sqrt(2 * math.pi)
            if fx > 0:
                out[0, 0, j] = 2 * xj * dfx / (fx + EPS) * r[0, 0, j]
        return [out]

    torch.testing.assert_close(got, paper_reference(R, raw)[0])


# ------------------------------------------------------------------------------------------
# scalings, masks, embeddings, pooling


def test_query_scale_passes_relevance_through():
    q = torch.randn(2, 3, 4, 16, dtype=D)
    R = torch.randn(1, 2, 3, 4, 16, dtype=D)
    for scale in (None, 0.3):
        ctx = ctx_for(scale_query, (q, scale))
        torch.testing.assert_close(ctx.output, q * (0.25 if scale is None else 0.3))
        assert T.shared_table()[scale_query](ctx, R)[0] is R


def test_normalize_and_masked_mean():
    x = torch.randn(2, 5, 3, dtype=D)
    m = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    R = torch.randn(1, 2, 3, dtype=D)
    ctx = ctx_for(masked_mean, (x, m))
    rx, rm = T.AbsMaskedMean("head")(ctx, R)
    assert rm is None
    y = ctx.output
    for i in range(2):
        n = int(m[i].sum())
        for t in range(5):
            want = 2 * x[i, t].clamp(min=0) * (m[i, t] / n) * R[0, i] / (y[i].abs() + EPS)
            torch.testing.assert_close(rx[0, i, t], want)
    e = torch.randn(2, 4, dtype=D)
    R2 = torch.randn(1, 2, 4, dtype=D)
    ctx = ctx_for(F.normalize, (e,), {"dim": -1})
    got = T.AbsNormalize("head")(ctx, R2)[0]
    n = e.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(got, 2 * e.clamp(min=0) / n * R2 / ((e / n).abs() + EPS))


def test_mask_routes_everything_to_the_scores():
    s = torch.randn(1, 2, 3, 3, dtype=D)
    mask = torch.zeros(3, 3, dtype=D)
    R = torch.randn(2, 1, 2, 3, 3, dtype=D)
    out = T.ToFirst("mask")(ctx_for(attention_mask, (s, mask, False)), R)
    assert out[0] is R and out[1] is None


def test_embedding_sums_over_the_embedding_dim():
    emb = nn.Embedding(10, 4).double()
    ids = torch.tensor([[1, 2, 3], [4, 4, 0]])
    R = torch.randn(2, 2, 3, 4, dtype=D)
    out = T.EmbeddingSum()(ctx_for(nn.Embedding, (ids,), module=emb), R)[0]
    assert out.pos.shape == (2, 2, 3)
    torch.testing.assert_close(out.total(), R.sum(-1))
    torch.testing.assert_close(out.pos, R.clamp(min=0).sum(-1))
