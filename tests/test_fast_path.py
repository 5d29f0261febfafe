"""The absLRP fast path (``report=False``): its numerics, the scratch buffers and the relevance
hand-over, which must never change a result, and the opt-in allocator setting."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrpgraph
from lrpgraph.rule import EPS, NodeContext, Scratch, conserve_diagonal, sample_dot, temp
from lrpgraph.rules import abslrp as A

DT = torch.float64


def ctx_with(scratch=None, owns=False) -> NodeContext:
    return NodeContext(name="n", op="call_function", target=None, module=None, args=(), kwargs={},
                       inputs=[], input_shapes=[], output=None, output_shape=None, batch_size=1,
                       owns_relevance=owns, scratch=scratch)


# --------------------------------------------------------------------------------------------
# numerics


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("features", [(5, 7), (3, 4096)])  # below and above the BLAS-dot size
@pytest.mark.parametrize("broadcast", [False, True])
def test_sample_dot_is_the_per_sample_sum_of_products(k, features, broadcast):
    t = torch.randn(k, 4, *features, dtype=DT)
    c = torch.randn(1 if broadcast else 4, *features, dtype=DT)
    want = (t * c).sum(dim=tuple(range(2, t.dim())))
    got = sample_dot(t, c)
    assert got.shape == (k, 4)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def literal_diagonal(relevance, gains):
    """conserve_signs' definition for gains >= 0: scale each sign stream to its own mass."""
    prods = [g * relevance for g in gains]
    pos = relevance.clamp(min=0).sum(dim=(2, 3))
    neg = relevance.clamp(max=0).sum(dim=(2, 3))
    tp = sum(p.clamp(min=0).sum(dim=(2, 3)) for p in prods)
    tn = sum(p.clamp(max=0).sum(dim=(2, 3)) for p in prods)
    a, b = (pos / tp)[..., None, None], (neg / tn)[..., None, None]
    return [p.clamp(min=0) * a + p.clamp(max=0) * b for p in prods]


@pytest.mark.parametrize("owns", [False, True])
@pytest.mark.parametrize("slots", [1, 2])
def test_conserve_diagonal_matches_the_literal_rescale_in_place_or_not(owns, slots):
    relevance = torch.randn(2, 3, 4, 5, dtype=DT)
    gains = [torch.rand(3, 4, 5, dtype=DT) for _ in range(slots)]
    want = literal_diagonal(relevance, gains)
    given = relevance.clone()
    with torch.no_grad():
        got = conserve_diagonal(given, gains, ctx_with(Scratch(), owns))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)
    # the handed-over buffer becomes the last slot's relevance; otherwise the input is untouched
    assert (got[-1].data_ptr() == given.data_ptr()) == owns
    if not owns:
        assert torch.equal(given, relevance)


def test_gelu_paper_gain_equals_the_literal_formula_at_extreme_inputs():
    x = torch.tensor([-40.0, -10.0, -2.0, -1e-30, 0.0, 1e-30, 1e-3, 0.5, 3.0, 10.0, 40.0], dtype=DT)
    y = F.gelu(x)
    d = A.d_gelu_erf(x)
    want = (x * d * (1 + torch.sign(y))).clamp(min=0) / (y.abs() + EPS)
    # the fast gain carries the constant factor sqrt(2 pi) / 2, which the conservation cancels
    got = A._gelu_paper_gain(x, y) / (math.sqrt(2 * math.pi) / 2)
    # at x = -10, gelu(x) rounds to -0.0, so the literal (1 + sign y) / (|y| + 1e-9) gives 7.7e-12;
    # the gain is 0 for every x <= 0, as the exact formula says
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-11)
    assert bool((got[x <= 0] == 0).all())
    assert math.isclose(float(got[-1]), 2.0, rel_tol=1e-9)  # large x: y = x, gain 2x / (x + eps)


# --------------------------------------------------------------------------------------------
# scratch buffers


def test_scratch_reuses_by_name_and_shape_and_drops_stale_buffers():
    s = Scratch(window=32)
    like = torch.empty(3, 4)
    a = s.get("den", like.shape, like.dtype, like.device)
    assert s.get("den", (3, 4), like.dtype, like.device) is a
    assert s.get("s", (3, 4), like.dtype, like.device) is not a  # another name: another buffer
    assert s.get("den", (4, 3), like.dtype, like.device) is not a
    assert s.nbytes == 3 * 12 * 4
    for _ in range(64):  # nobody asks for them: dropped
        s.step()
    assert s.nbytes == 0


def test_temp_gives_no_buffer_outside_a_walk_or_under_autograd():
    like = torch.empty(2, 2)
    assert temp(None, "k", like) is None
    assert temp(ctx_with(None), "k", like) is None
    ctx = ctx_with(Scratch())
    with torch.enable_grad():
        assert temp(ctx, "k", like) is None
    with torch.no_grad():
        buf = temp(ctx, "k", like, shape=(5,))
        assert buf.shape == (5,) and buf.dtype == like.dtype


# --------------------------------------------------------------------------------------------
# end to end: buffers reused across calls and nodes, relevance handed over between nodes


class GatedMLP(nn.Module):
    """A product of two activations (one relevance tensor reaches both operands), GELU, LayerNorm,
    a residual and a softmax: every rule that writes into scratch or handed-over buffers."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(6, 16)
        self.norm = nn.LayerNorm(16)
        self.att = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = F.relu(self.a(x)) * F.gelu(self.b(x))
        h = h + self.norm(h)
        h = h * torch.softmax(self.att(h), dim=-1)
        return self.head(F.gelu(h))


@pytest.mark.parametrize("preset", ["abslrp", "abslrp-renorm"])
def test_fast_path_equals_the_report_path_and_repeats_exactly(preset):
    torch.manual_seed(0)
    m = GatedMLP().eval().to(DT)
    ex = lrpgraph.Explainer(m, rules=preset)
    x = torch.randn(3, 6, dtype=DT)
    slow = ex(x, [0, 1, 2]).relevance  # the report path hands nothing over and uses no scratch
    fast = ex(x, [0, 1, 2], report=False).relevance
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-13)
    ex(torch.randn(5, 6, dtype=DT), report=False)  # other shapes in between
    assert torch.equal(ex(x, [0, 1, 2], report=False).relevance, fast)


def test_kept_relevance_is_not_overwritten_by_later_nodes():
    """A node in ``keep`` does not hand its relevance over, so what is returned is what arrived."""
    torch.manual_seed(1)
    m = GatedMLP().eval().to(DT)
    ex = lrpgraph.Explainer(m)
    names = [n.name for n in ex.graph_module.graph.nodes if n.op in ("call_module", "call_function")]
    x = torch.randn(2, 6, dtype=DT)
    slow = ex(x, keep=names).latent
    fast = ex(x, keep=names, report=False).latent
    assert slow.keys() == fast.keys() and len(fast) >= 8
    for k in slow:
        torch.testing.assert_close(fast[k], slow[k], rtol=1e-9, atol=1e-13, msg=k)


# --------------------------------------------------------------------------------------------
# the allocator setting (process-wide: checked in a child process)


def test_retain_freed_memory_rejects_values_mallopt_cannot_take():
    for bad in (-1, 2 ** 31, 1.5):
        with pytest.raises(ValueError, match="limit_bytes"):
            lrpgraph.memory.retain_freed_memory(bad)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_retain_freed_memory_takes_effect_in_a_glibc_process():
    code = ("import platform, lrpgraph; ok = lrpgraph.memory.retain_freed_memory(); "
            "print(ok, platform.libc_ver()[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == ("True" if out[1:] == ["glibc"] else "False")


class QKVAttention(nn.Module):
    """timm's attention layout: a fused q/k/v projection split by reshape, permute and unbind, k
    through a pass-through (Identity) and a transpose: the paper preset's routing rule weighs k at
    the transpose, so the fast path skips k's piece at the unbind (the rule is idempotent there)."""

    def __init__(self, dim: int = 8, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv, self.k_norm, self.proj = nn.Linear(dim, 3 * dim), nn.Identity(), nn.Linear(dim, 3)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        att = torch.softmax(q @ self.k_norm(k).transpose(-2, -1), dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, n, c)).mean(1)


@pytest.mark.parametrize("preset", ["abslrp", "abslrp-renorm"])
def test_routing_skips_on_the_fast_path_equal_the_report_path(preset):
    torch.manual_seed(1)
    m = QKVAttention().eval().to(DT)
    ex = lrpgraph.Explainer(m, rules=preset)
    x = torch.randn(3, 5, 8, dtype=DT)
    slow = ex(x, [0, 1, 2]).relevance
    fast = ex(x, [0, 1, 2], report=False).relevance
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-15)


def test_routing_gain_is_two_on_positive_entries_only():
    from lrpgraph.rules.abslrp_routing import _gain
    x = torch.tensor([-1e300, -5e-324, -0.0, 0.0, 5e-324, 1e-300, 3.0, float("inf"), float("-inf")], dtype=DT)
    want = torch.tensor([0, 0, 0, 0, 2, 2, 2, 2, 0], dtype=DT)
    assert torch.equal(_gain(x), want) and torch.equal(_gain(x, torch.empty_like(x)), want)
