"""Per-sample accounting of the conservation report where the batch is merged with windows, and
operands broadcast over windows (issue 9: the sam2/mvitv2 "0.5 leaks" and the Swin bias leak were
report errors; each test here failed before its fix)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lrpgraph
from lrpgraph.walk import RuleError

DT = torch.float64


class Windows(nn.Module):
    """(B, C, 4, 4) -> 2x2 windows merged with the batch, batch-major: (B * 4, 2, 2, C) -> Linear ->
    back. At batch 2 a window's side has the batch's size, which the report took for the batch."""

    def __init__(self, c: int = 5, classes: int = 3):
        super().__init__()
        self.inp, self.mix, self.head = nn.Conv2d(3, c, 1), nn.Linear(c, c), nn.Linear(c, classes)

    def forward(self, x):
        b = x.shape[0]
        h = self.inp(x).permute(0, 2, 3, 1)                                    # (B, 4, 4, C)
        w = h.reshape(b, 2, 2, 2, 2, -1).permute(0, 1, 3, 2, 4, 5).reshape(-1, 2, 2, h.shape[-1])
        w = self.mix(w)                                                        # (B * 4, 2, 2, C)
        h = w.view(b, 2, 2, 2, 2, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, 4, 4, -1)
        return self.head(h.mean((1, 2)))


class WindowBias(nn.Module):
    """Swin-style attention in windows: scores (B * nW, H, N, N) plus a relative-position bias
    parameter (1, H, N, N) broadcast over batch and windows, plus a constant mask (nW, 1, N, N)."""

    def __init__(self, c: int = 4, heads: int = 2, classes: int = 3):
        super().__init__()
        self.heads = heads
        self.inp, self.qkv, self.head = nn.Conv2d(3, c, 1), nn.Linear(c, 3 * c), nn.Linear(c, classes)
        self.bias = nn.Parameter(torch.randn(1, heads, 4, 4))
        self.register_buffer("mask", torch.tensor([0.0, -3.0]).repeat(2)[:, None, None, None]
                             * torch.ones(4, 1, 4, 4))

    def forward(self, x):
        b = x.shape[0]
        h = self.inp(x).permute(0, 2, 3, 1)                                    # (B, 4, 4, C)
        w = h.reshape(b, 2, 2, 2, 2, -1).permute(0, 1, 3, 2, 4, 5).reshape(b * 4, 4, -1)  # (B*nW, N, C)
        q, k, v = self.qkv(w).reshape(b * 4, 4, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        a = q @ k.transpose(-2, -1) + self.bias                               # (B*nW, H, N, N)
        a = (a.view(b, 4, self.heads, 4, 4) + self.mask.view(1, 4, 1, 4, 4)).view(b * 4, self.heads, 4, 4)
        o = (a.softmax(-1) @ v).transpose(1, 2).reshape(b, -1, h.shape[-1])
        return self.head(o.mean(1))


class StackSelect(nn.Module):
    """ConViT-style q/k: one projection reshaped to a ``(2, B, heads, N, d)`` stack and indexed
    (``qk[0]``, ``qk[1]``), so the value the selects read has its batch on axis 1."""

    def __init__(self, c: int = 4, heads: int = 2, classes: int = 3):
        super().__init__()
        self.heads = heads
        self.inp, self.qk, self.head = nn.Conv2d(3, c, 1), nn.Linear(c, 2 * c), nn.Linear(c, classes)

    def forward(self, x):
        b = x.shape[0]
        h = self.inp(x).flatten(2).transpose(1, 2)                             # (B, N, C)
        qk = self.qk(h).reshape(b, h.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k = qk[0], qk[1]                                                    # (B, H, N, d)
        o = ((q @ k.transpose(-2, -1)).softmax(-1) @ k).transpose(1, 2).reshape(b, -1, h.shape[-1])
        return self.head(o.mean(1))


def _rows(model, x, target):
    e = lrpgraph.Explainer(model, rules="abslrp")(x, target=target)
    return e, e.conservation()


def _check(model, batch: int = 2):
    torch.manual_seed(0)
    model = model.eval().to(DT)
    x = torch.randn(batch, 3, 4, 4, dtype=DT)
    target = torch.arange(batch) % 3
    e, rep = _rows(model, x, target)
    assert rep.max_rel_error() < 1e-10, rep.table()
    # every row of sample b at batch 2 is the row of that sample explained alone
    for b in range(batch):
        e1, rep1 = _rows(model, x[b:b + 1], target[b:b + 1])
        assert torch.allclose(e1.relevance[0], e.relevance[b], rtol=1e-9, atol=1e-14)
        for r, r1 in zip(rep, rep1):
            assert r.name == r1.name
            for f in ("in_sum", "in_pos", "in_neg", "out_sum", "out_pos", "out_neg"):
                assert torch.allclose(getattr(r, f)[:, b], getattr(r1, f)[:, 0], rtol=1e-9, atol=1e-15), (r.name, f)


def test_a_stack_with_the_batch_on_axis_1_is_weighed_per_sample():
    """Before: the paper routing rule at ``qk[0]`` conserved per entry of the stack's first axis
    (q or k) instead of per sample, so a sample's map changed with the rest of its batch (1e-4 on
    timm's ConViT, a leak of 7e-2 in the report)."""
    _check(StackSelect(), batch=3)
    torch.manual_seed(0)
    model = StackSelect().eval().to(DT)
    x = torch.randn(3, 3, 4, 4, dtype=DT)
    ex = lrpgraph.Explainer(model, rules="abslrp")
    fast = ex(x, target=0, report=False).relevance
    for b in range(3):
        alone = ex(x[b:b + 1], target=0, report=False).relevance
        assert torch.allclose(fast[b], alone[0], rtol=1e-9, atol=1e-14)


def test_windows_merged_with_the_batch_are_counted_per_sample():
    _check(Windows())


def test_a_bias_broadcast_over_windows_is_measured_before_its_copies_are_summed():
    _check(WindowBias())


class ZeroHead(nn.Module):
    """A classifier head with all-zero weights and bias (timm initialises gMLP's, Hiera's and
    Sequencer's so): the logits are 0 for every input and no relevance has a carrier."""

    def __init__(self, zero: bool = True):
        super().__init__()
        self.body, self.head = nn.Linear(6, 5), nn.Linear(5, 3)
        if zero:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def test_relevance_on_an_all_zero_head_is_a_named_loss_not_a_leak():
    torch.manual_seed(0)
    x = torch.randn(2, 6, dtype=DT)
    e = lrpgraph.Explainer(ZeroHead().eval().to(DT), rules="abslrp")(x)
    rep = e.conservation()
    assert float(e.relevance.abs().sum()) == 0.0
    assert rep.leaks() == [] and [r.name for r in rep.losses()] == ["head"]
    assert rep["head"].lost_share() == 1.0 and "LOSS" in rep.table()
    # a rule that drops everything on non-zero values still leaks
    from lrpgraph.report import balance
    r_in = torch.tensor([[[1.0, -1.0]]], dtype=DT)
    row = balance("n", "op", "rule", r_in, [torch.zeros(1, 1, 2, dtype=DT)], 1, value=torch.ones(1, 2, dtype=DT))
    assert row.worst(True) == 0.5 and row.lost_share() == 0.0
    row = balance("n", "op", "rule", r_in, [torch.zeros(1, 1, 2, dtype=DT)], 1, value=torch.zeros(1, 2, dtype=DT))
    assert row.worst(True) == 0.0 and row.lost_share() == 1.0


class Tokens(nn.Module):
    """Tokens ``(B, N, C)``; with ``merge`` the element-wise ops and a Linear run on ``(B * N, C)``
    rows (as timm's TNT and MobileViT do), which computes the same function."""

    def __init__(self, merge: bool):
        super().__init__()
        self.merge = merge
        self.a, self.b, self.head = nn.Linear(3, 2), nn.Linear(2, 4), nn.Linear(4, 3)

    def forward(self, x):
        b, n, _ = x.shape
        h = self.a(x)
        if self.merge:
            h = h.reshape(b * n, -1)
        h = self.b(torch.nn.functional.silu(h))
        if self.merge:
            h = h.reshape(b, n, -1)
        return self.head(h.mean(1))


def test_rules_conserve_per_sample_where_the_batch_is_merged_with_tokens():
    """Before: each (sample, token) row conserved its own sign streams, so a row with no carrier
    lost its stream (a leak of 8e-2 at the SiLU) and the map changed with the layout (by 1.5x)."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 3, dtype=DT)
    maps = []
    for merge in (False, True):
        torch.manual_seed(0)
        ex = lrpgraph.Explainer(Tokens(merge).eval().to(DT), rules="abslrp")
        e = ex(x)
        assert e.conservation().leaks() == [], e.conservation().table()
        assert torch.allclose(ex(x, report=False).relevance, e.relevance, rtol=1e-10, atol=1e-15)
        maps.append(e.relevance)
    assert torch.allclose(maps[0], maps[1], rtol=1e-10, atol=1e-15)
    # abslrp-renorm: unit mass per sample, not per row, so the layout does not change its map either
    renorm = [lrpgraph.Explainer(Tokens(merge).eval().to(DT), rules="abslrp-renorm")(x).relevance
              for merge in (False, True) if torch.manual_seed(0) is not None]
    assert torch.allclose(renorm[0], renorm[1], rtol=1e-9, atol=1e-15)


class SeqFirst(nn.Module):
    """A sequence-first block: tokens as ``(N, B, C)`` between the embedding and the head."""

    def __init__(self, c: int = 4, classes: int = 3):
        super().__init__()
        self.inp, self.mix, self.head = nn.Conv2d(3, c, 1), nn.Linear(c, c), nn.Linear(c, classes)

    def forward(self, x):
        h = self.inp(x).flatten(2).permute(2, 0, 1)                            # (N, B, C)
        h = h + torch.nn.functional.gelu(self.mix(h))
        return self.head(h.transpose(0, 1).mean(1))


def test_a_sequence_first_layout_is_refused_by_abslrp_and_per_sample_under_renorm():
    """Before: abslrp conserved per token position over a (N, B, C) layout, so a sample's map
    changed with its batch by 30 % without a sign (a 0.46 leak in the report only)."""
    torch.manual_seed(0)
    model = SeqFirst().eval().to(DT)
    x = torch.randn(3, 3, 4, 4, dtype=DT)
    with pytest.raises(RuleError, match=r"node `add` \(operator.add\): its output \(16, 3, 4\) has the batch on axis 1.*batch_first=True"):
        lrpgraph.Explainer(model, rules="abslrp")(x, target=0, report=False)
    for preset in ("abslrp-renorm", "lrp-epsilon"):  # per-sample unit mass; no per-sample sums
        ex = lrpgraph.Explainer(model, rules=preset)
        both = ex(x, target=0, report=False).relevance
        for b in range(3):
            alone = ex(x[b:b + 1], target=0, report=False).relevance
            assert torch.allclose(both[b], alone[0], rtol=1e-9, atol=1e-14), preset
