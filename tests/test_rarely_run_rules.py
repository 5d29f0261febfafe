"""Rule code that no model of the suite reaches, against slow literal references in float64:
AbsAdd.contributions, AbsMul.contributions (product and division branches), ClassicMul,
MaskedMeanEpsilon and the einsum and element-wise branches of ProductEpsilon."""
from __future__ import annotations

import operator

import pytest
import torch

from lrpgraph.rules import abslrp as A
from lrpgraph.rules import transformer as T
from lrpgraph.text import masked_mean
from test_transformer_rules import ctx_for  # noqa: E402  (tests/ is on sys.path, see conftest)

D = torch.float64
EPS = 1e-6


def test_absadd_contributions_are_twice_the_positive_part():
    a, b = torch.randn(3, 5, dtype=D), torch.randn(3, 5, dtype=D)
    s = torch.randn(2, 3, 5, dtype=D)
    got = A.AbsAdd("paper").contributions(ctx_for(operator.add, (a, b)), s)
    for v, g in zip((a, b), got):
        ref = torch.zeros_like(s)
        for k in range(2):
            for i in range(3):
                for j in range(5):
                    ref[k, i, j] = 2 * max(float(v[i, j]), 0.0) * s[k, i, j]
        torch.testing.assert_close(g, ref)


def test_absmul_contributions_of_two_activations_and_division():
    a, b = torch.randn(3, 4, dtype=D), torch.randn(3, 4, dtype=D)
    s = torch.randn(1, 3, 4, dtype=D)
    rule = T.AbsMul("paper")
    got = rule.contributions(ctx_for(operator.mul, (a, b)), s)
    want = T.AbsProduct("paper").contributions(ctx_for(operator.mul, (a, b)), s)
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    with pytest.raises(NotImplementedError, match="divides two activations"):
        rule.contributions(ctx_for(operator.truediv, (a, b.abs() + 1)), s)


def test_product_epsilon_einsum_matches_literal():
    a, b = torch.randn(2, 3, 4, dtype=D), torch.randn(2, 4, 5, dtype=D)
    R = torch.randn(1, 2, 3, 5, dtype=D)
    ctx = ctx_for(torch.einsum, ("bij,bjk->bik", a, b))
    ra, rb = [o for o in T.ProductEpsilon(EPS)(ctx, R) if o is not None]
    out = torch.einsum("bij,bjk->bik", a, b)
    s = R / (out + EPS * torch.where(out >= 0, 1.0, -1.0).to(D)) * 0.5
    ref_a, ref_b = torch.zeros_like(ra), torch.zeros_like(rb)
    for n in range(2):
        for i in range(3):
            for j in range(4):
                for k in range(5):
                    t = a[n, i, j] * b[n, j, k] * s[0, n, i, k]
                    ref_a[0, n, i, j] += t
                    ref_b[0, n, j, k] += t
    torch.testing.assert_close(ra, ref_a)
    torch.testing.assert_close(rb, ref_b)
    torch.testing.assert_close(ra.sum() + rb.sum(), (R * out / (out + EPS * torch.sign(out))).sum())


def test_product_epsilon_elementwise_matches_literal():
    a, b = torch.randn(3, 4, dtype=D), torch.randn(3, 4, dtype=D)
    R = torch.randn(2, 3, 4, dtype=D)
    ra, rb = T.ProductEpsilon(EPS)(ctx_for(operator.mul, (a, b)), R)
    z = a * b
    ref = R * z / (z + EPS * torch.where(z >= 0, 1.0, -1.0).to(D)) * 0.5
    torch.testing.assert_close(ra, ref)
    torch.testing.assert_close(rb, ref)


def test_classic_mul_constant_factor_and_two_activations():
    a, b = torch.randn(3, 4, dtype=D), torch.randn(3, 4, dtype=D)
    R = torch.randn(1, 3, 4, dtype=D)
    out = T.ClassicMul(EPS)(ctx_for(operator.mul, (a, b), const=(1,)), R)  # b a constant
    torch.testing.assert_close(out[0], R)
    assert out[1] is None
    two = T.ClassicMul(EPS)(ctx_for(operator.mul, (a, b)), R)
    ref = T.ProductEpsilon(EPS)(ctx_for(operator.mul, (a, b)), R)
    for g, w in zip(two, ref):
        torch.testing.assert_close(g, w)


def test_masked_mean_epsilon_matches_literal():
    x = torch.randn(2, 5, 3, dtype=D)
    m = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    R = torch.randn(1, 2, 3, dtype=D)
    ctx = ctx_for(masked_mean, (x, m), const=(1,))
    rx, rm = T.MaskedMeanEpsilon(EPS)(ctx, R)
    assert rm is None
    out = masked_mean(x, m)
    ref = torch.zeros_like(rx)
    for n in range(2):
        w = m[n].to(D) / m[n].sum()
        for t in range(5):
            for d in range(3):
                z = x[n, t, d] * w[t]
                ref[0, n, t, d] = z * R[0, n, d] / (out[n, d] + EPS * (1 if out[n, d] >= 0 else -1))
    torch.testing.assert_close(rx, ref)
    assert float(rx[0, 0, 3:].abs().max()) == 0.0  # masked tokens get nothing
