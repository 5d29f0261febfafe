"""lrpgraph.evaluate: GAE, MoRF/LeRF/ABPC, the attribution methods and the CLI, on tiny models
whose answers are known (3x16x16 images, CPU, fast)."""
from __future__ import annotations

import csv
import sys
import types

import pytest
import torch
from torch import nn

import lrpgraph
from lrpgraph.evaluate import (ABPC, GAE, METHODS, EvaluationError, LeRF, MoRF, get_method, make_mosaic,
                               method_names, score_map)
from lrpgraph.evaluate.gae import dice

H = W = 16


# ------------------------------------------------------------------------------------------------
# tiny models with known behaviour


class RegionModel(nn.Module):
    """Two classes: logit0 = a*sum(x in region A) + b*sum(x in region B), logit1 = -logit0."""

    def __init__(self, a: float = 1.0, b: float = 0.0):
        super().__init__()
        m = torch.zeros(1, 3, H, W)
        self.register_buffer("wa", m.clone().index_fill_(2, torch.arange(0, 4), 1.0).index_fill_(3, torch.arange(4, W), 0.0))
        wb = m.clone()
        wb[:, :, H // 2:, :] = 1.0
        self.register_buffer("wb", wb)
        self.a, self.b = a, b

    def forward(self, x):
        s = self.a * (x * self.wa).flatten(1).sum(1) + self.b * (x * self.wb).flatten(1).sum(1)
        return torch.stack([s, -s], 1)


def region_a() -> torch.Tensor:
    m = torch.zeros(3, H, W)
    m[:, :4, :4] = 1
    return m


def region_b() -> torch.Tensor:
    m = torch.zeros(3, H, W)
    m[:, H // 2:, :] = 1
    return m


COLOURS = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]])


class ColourModel(nn.Module):
    """Four classes by the image's mean colour (nearest centroid, confident)."""

    def __init__(self, scale: float = 20.0):
        super().__init__()
        self.register_buffer("c", COLOURS.clone())
        self.scale = scale

    def forward(self, x):
        m = x.mean((2, 3))
        return self.scale * (m @ self.c.T - 0.5 * (self.c ** 2).sum(1))


def colour_images(labels, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.as_tensor(labels)
    x = COLOURS[y].view(-1, 3, 1, 1).expand(-1, 3, H, W) + noise * torch.randn(len(y), 3, H, W, generator=g)
    return x.contiguous(), y


def colour_oracle(model, x, target):
    """Marks the pixels whose colour is the target's colour (right on mosaics too)."""
    c = COLOURS.to(x.device)[target].view(-1, 3, 1, 1)
    d = ((x - c) ** 2).sum(1, keepdim=True)
    return (d < 0.2).to(x.dtype).expand_as(x).clone()


def const_map(m):
    return lambda model, x, t: m.to(x).expand_as(x).clone()


def tiny_cnn(classes=5, act=nn.ReLU):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), act(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1),
                         act(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes)).eval()


# ------------------------------------------------------------------------------------------------
# GAE


def test_mosaic_is_four_consecutive_images_at_batch_8():
    x = torch.arange(8.).view(8, 1, 1, 1).expand(8, 3, H, W).contiguous()
    mos = make_mosaic(x)
    assert mos.shape == (2, 3, H, W)
    for m in range(2):
        q = [mos[m, :, :H // 2, :W // 2], mos[m, :, :H // 2, W // 2:], mos[m, :, H // 2:, :W // 2], mos[m, :, H // 2:, W // 2:]]
        assert [float(t.unique()) for t in q] == [4 * m + i for i in range(4)]


def test_mosaic_downscales_by_nearest():
    x = torch.randn(4, 3, H, W)
    assert torch.equal(make_mosaic(x)[0, :, :H // 2, W // 2:], x[1, :, ::2, ::2])


def test_gae_at_batch_8_positives_and_contrastiveness_match_their_mosaics():
    # each mosaic has four different colours; the oracle marks the positive image's colour, which
    # lies in the positive quadrant of *that* mosaic only if mosaics are consecutive images
    x, y = colour_images([0, 1, 2, 3, 3, 2, 1, 0])
    res = GAE(num_masking_steps=4, progress=False, batch_size=8)(ColourModel(), x, y, explain=colour_oracle)
    assert all(4 * m <= int(p) < 4 * m + 4 for m, p in enumerate(res.positive))
    assert torch.equal(res.target, y[res.positive])
    assert (res.contrastiveness > 0.95).all(), res.contrastiveness


def test_score_map_quadrants_and_full_centre_cross():
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.125]])
    labels = torch.tensor([[0, 1, 2, 3]])
    m = score_map(probs, labels, torch.tensor([0]), H, W)[0, 0]
    c0, c1 = H // 2 - 1, H // 2 + 1
    assert (m[c0:c1, :] == 1).all() and (m[:, c0:c1] == 1).all()          # full 2-pixel cross lines
    assert m[0, 0] == 1 and m[0, W - 1] == 0.0 and m[H - 1, 0] == -0.5 and m[H - 1, W - 1] == -0.5
    # outside the cross exactly the quadrant values
    inside = torch.ones(H, W, dtype=torch.bool)
    inside[c0:c1, :] = False
    inside[:, c0:c1] = False
    assert set(m[inside].unique().tolist()) == {1.0, 0.0, -0.5}
    assert int((m == 1).sum()) == (H // 2 - 1) ** 2 + 2 * H + 2 * W - 4


def test_random_map_contrastiveness_near_zero_oracle_near_one():
    model = ColourModel()
    rand, orac = [], []
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        x, y = colour_images(torch.stack([torch.randperm(4, generator=g) for _ in range(4)]).flatten(), seed=seed)
        gae = GAE(num_masking_steps=3, seed=seed, progress=False)
        rand.append(gae(model, x, y, explain=get_method("random", seed=seed)).contrastiveness)
        orac.append(gae(model, x, y, explain=colour_oracle).contrastiveness)
    assert float(torch.cat(rand).mean()) < 0.05
    assert float(torch.cat(orac).mean()) > 0.95


def test_faithfulness_prefers_the_region_the_model_relies_on():
    # the model relies mostly on A; once A is gone (MoRF) B becomes salient: CIM is +1 on A, -1 on B
    model = RegionModel(a=1.0, b=0.05)
    g = torch.Generator().manual_seed(0)
    x = 0.5 + torch.rand(8, 3, H, W, generator=g)
    y = torch.zeros(8, dtype=torch.long)
    gae = GAE(progress=False)
    plan = gae.prepare(model, x, y)
    A, B = region_a(), region_b()
    res = gae.evaluate(model, x, y, {"A": lambda m, x, t: x * A, "B": lambda m, x, t: x * B,
                                     "constA": const_map(A), "random": get_method("random")}, plan=plan)
    assert (res["A"].faithfulness > 0.99).all(), res["A"].faithfulness
    assert (res["B"].faithfulness < -0.5).all(), res["B"].faithfulness
    assert (res["A"].robustness > 0.8).all()
    assert (res["A"].gae > 0.9).all() and (res["B"].gae == 0).all() and (res["random"].gae == 0).all()
    # a map that ignores the input does not change along the trajectories: robustness exactly -1
    assert torch.allclose(res["constA"].robustness, torch.tensor(-1.0))
    assert torch.allclose(res["constA"].faithfulness, res["A"].faithfulness)


def test_trajectory_masked_fractions_follow_select_from_current_map():
    model = tiny_cnn(act=nn.Tanh)           # tanh: no dead units, every entry has a gradient
    g = torch.Generator().manual_seed(1)
    x = 0.5 + torch.rand(4, 3, H, W, generator=g)
    plan = GAE(progress=False).prepare(model, x, torch.zeros(4, dtype=torch.long))
    lerf = (plan.lerf_inputs[0] == 0).flatten(1).float().mean(1)
    morf = (plan.morf_inputs[0] == 0).flatten(1).float().mean(1)
    D = 3 * H * W
    assert torch.allclose(lerf, torch.tensor([(t * D // 10) / D for t in range(10)]))
    assert torch.allclose(morf[:4], torch.tensor([0, 76, 76 + 153, 76 + 153 + 230]) / D, atol=1e-6)
    assert (morf[4:] > 0.99).all()
    assert torch.allclose(plan.morf_logits[:, 0], plan.lerf_logits[:, 0])
    assert set(plan.cim.unique().tolist()) <= {-1.0, 0.0, 1.0}


def test_gae_is_deterministic_and_seed_changes_positives():
    model = tiny_cnn()
    x, y = torch.randn(16, 3, H, W), torch.randint(0, 5, (16,))
    r1 = GAE(progress=False)(model, x, y, explain=get_method("gradient-x-input"))
    r2 = GAE(progress=False, batch_size=8)(model, x, y, explain=get_method("gradient-x-input"))
    assert torch.equal(r1.positive, r2.positive)
    assert torch.allclose(r1.gae, r2.gae, atol=1e-5) and torch.allclose(r1.robustness, r2.robustness, atol=1e-5)
    others = [GAE(seed=s, progress=False).prepare(model, x, y).positive for s in range(1, 6)]
    assert any(not torch.equal(o, r1.positive) for o in others)


def test_gae_result_ranges_and_aggregate():
    model = tiny_cnn()
    x, y = torch.randn(8, 3, H, W), torch.randint(0, 5, (8,))
    r = GAE(num_masking_steps=5, progress=False)(model, x, y, explain=get_method("abslrp"))
    agg = r.aggregate()
    assert set(agg) == {"local_consistency", "faithfulness", "robustness", "contrastiveness", "gae"}
    assert r.gae.shape == (2,) and r.morf_logits.shape == (2, 5)
    assert ((r.local_consistency >= 0) & (r.local_consistency <= 1)).all()
    assert ((r.faithfulness >= -1) & (r.faithfulness <= 1)).all()
    assert ((r.robustness >= -1 - 1e-6) & (r.robustness <= 1 + 1e-6)).all()
    assert torch.allclose(r.gae, r.local_consistency * r.contrastiveness)
    assert torch.allclose(r.local_consistency, torch.relu(r.faithfulness + r.robustness) / 2)


def test_gae_attributions_replace_the_positive_explanation():
    model = tiny_cnn()
    x, y = torch.randn(8, 3, H, W), torch.randint(0, 5, (8,))
    fn = get_method("gradient-x-input")
    a = fn(model, x, model(x).argmax(1))
    r1 = GAE(progress=False)(model, x, y, explain=fn)
    r2 = GAE(progress=False)(model, x, y, attributions=a, explain=fn)
    assert torch.allclose(r1.gae, r2.gae, atol=1e-5)


def test_dice_distance():
    u = torch.tensor([[1.0, 0, 0]])
    assert float(dice(u, u)) == 0
    assert abs(float(dice(u, torch.tensor([[0, 1.0, 0]]))) - 1) < 1e-6


# ------------------------------------------------------------------------------------------------
# MoRF / LeRF / ABPC


class SumModel(nn.Module):
    def forward(self, x):
        s = x.flatten(1).sum(1)
        return torch.stack([s, -s], 1)


def test_morf_lerf_exact_curves_and_auc():
    x = torch.tensor([1.0, 2, 3, 4]).view(1, 1, 2, 2)
    y = torch.zeros(1, dtype=torch.long)
    kw = dict(unit="element", steps=4, progress=False)
    m = MoRF(**kw)(SumModel(), x, y, attributions=x)
    l_ = LeRF(**kw)(SumModel(), x, y, attributions=x)
    assert m.curve.tolist() == [[10, 6, 3, 1, 0]] and l_.curve.tolist() == [[10, 9, 7, 4, 0]]
    assert torch.allclose(m.steps, torch.tensor([0, .25, .5, .75, 1], dtype=torch.float64))
    assert abs(float(m.auc) - 3.75) < 1e-9 and abs(float(l_.auc) - 6.25) < 1e-9
    assert abs(float(ABPC(**kw)(SumModel(), x, y, attributions=x).abpc) - 2.5) < 1e-9


def test_ties_are_ordered_stably_by_index():
    x = torch.tensor([1.0, 2, 3, 4]).view(1, 1, 2, 2)
    y = torch.zeros(1, dtype=torch.long)
    r = ABPC(unit="element", steps=4, progress=False)(SumModel(), x, y, attributions=torch.zeros_like(x))
    assert r.morf.curve.tolist() == [[10, 9, 7, 4, 0]] == r.lerf.curve.tolist()
    assert float(r.abpc) == 0


def test_pixel_and_patch_units_and_baselines():
    x = torch.arange(2 * 4 * 4.).view(1, 2, 4, 4)
    y = torch.zeros(1, dtype=torch.long)
    a = torch.zeros_like(x)
    a[0, 0, 0, 0] = 5                            # pixel (0, 0) first, both channels together
    r = MoRF(unit="pixel", steps=16, progress=False)(SumModel(), x, y, attributions=a)
    assert float(r.curve[0, 0] - r.curve[0, 1]) == float(x[0, :, 0, 0].sum())
    r = MoRF(unit="patch", patch_size=2, steps=4, progress=False)(SumModel(), x, y, attributions=a)
    assert float(r.curve[0, 0] - r.curve[0, 1]) == float(x[0, :, :2, :2].sum())
    r = MoRF(unit="patch", patch_size=3, steps=4, progress=False)(SumModel(), x, y, attributions=a)  # 2x2 patches, ragged
    assert r.curve.shape == (1, 5) and float(r.curve[0, -1]) == 0
    r = MoRF(unit="pixel", steps=2, baseline="mean", progress=False)(SumModel(), x, y, attributions=a)
    assert float(r.curve[0, -1]) == float(r.curve[0, 0]) == float(x.sum())   # all at the mean: same sum
    r = MoRF(unit="pixel", steps=1, baseline=lambda t: torch.full_like(t, 1.0), progress=False)(SumModel(), x, y, attributions=a)
    assert float(r.curve[0, -1]) == 32.0
    r = MoRF(unit="pixel", features_per_step=0.25, progress=False)(SumModel(), x, y, attributions=a)
    assert r.steps.tolist() == [0, .25, .5, .75, 1]
    r = MoRF(unit="pixel", features_per_step=5, include_zero=False, progress=False)(SumModel(), x, y, attributions=a)
    assert r.steps.tolist() == [5 / 16, 10 / 16, 15 / 16, 1]
    r = MoRF(unit="pixel", steps=4, score="probability", progress=False)(SumModel(), x, y, attributions=a)
    assert ((r.curve >= 0) & (r.curve <= 1)).all()


def test_region_map_beats_other_map_and_morf_falls_faster():
    model = RegionModel(a=1.0, b=0.0)                  # depends on region A only
    g = torch.Generator().manual_seed(0)
    x = 0.5 + torch.rand(4, 3, H, W, generator=g)
    y = torch.zeros(4, dtype=torch.long)
    abpc = ABPC(unit="pixel", steps=16, progress=False)
    good = abpc(model, x, y, explain=const_map(region_a()))
    bad = abpc(model, x, y, explain=const_map(region_b()))
    assert (good.abpc > bad.abpc).all()
    assert (good.morf.auc < good.lerf.auc).all()
    assert (good.morf.curve[:, 1] < 1e-4).all()        # region A (16 of 256 pixels) gone after one step
    assert good.aggregate()["abpc"] > 0.8 * float(model(x)[:, 0].mean())


def test_perturbation_batching_does_not_change_results():
    model = tiny_cnn()
    x = torch.randn(10, 3, H, W)
    y = model(x).argmax(1)
    a = torch.randn_like(x)
    r1 = ABPC(unit="patch", steps=8, batch_size=3, progress=False)(model, x, y, attributions=a)
    r2 = ABPC(unit="patch", steps=8, batch_size=64, progress=False)(model, x, y, attributions=a)
    assert torch.allclose(r1.abpc, r2.abpc, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# errors


def test_error_batch_not_multiple_of_4():
    model = tiny_cnn()
    with pytest.raises(EvaluationError, match="multiple of 4"):
        GAE(progress=False)(model, torch.randn(6, 3, H, W), torch.zeros(6, dtype=torch.long), explain=get_method("random"))
    with pytest.raises(ValueError, match="multiple of 4"):
        GAE(batch_size=6)


def test_error_wrong_map_shape():
    model = tiny_cnn()
    x, y = torch.randn(4, 3, H, W), torch.zeros(4, dtype=torch.long)
    bad = lambda m, x, t: x.sum(1)                      # noqa: E731 - channel-summed map
    with pytest.raises(EvaluationError, match="shaped like the input"):
        GAE(progress=False)(model, x, y, explain=bad)
    with pytest.raises(EvaluationError, match="shaped like the input"):
        ABPC(progress=False)(model, x, y, attributions=x[:, 0])


def test_error_nan_map():
    model = tiny_cnn()
    x, y = torch.randn(4, 3, H, W), torch.zeros(4, dtype=torch.long)
    a = torch.randn_like(x)
    a[1, 0, 0, 0] = float("nan")
    with pytest.raises(EvaluationError, match="NaN or inf.*1 of 4"):
        MoRF(progress=False)(model, x, y, attributions=a)
    with pytest.raises(EvaluationError, match="NaN"):
        GAE(progress=False)(model, x, y, explain=lambda m, x, t: torch.full_like(x, float("inf")))


def test_error_targets_and_missing_explain():
    model = tiny_cnn(classes=5)
    x = torch.randn(4, 3, H, W)
    with pytest.raises(EvaluationError, match=r"out of range.*\[0, 4\]"):
        ABPC(progress=False)(model, x, torch.tensor([0, 1, 7, 2]), attributions=x)
    with pytest.raises(EvaluationError, match="out of range"):
        GAE(progress=False)(model, x, torch.tensor([0, 1, -1, 2]), explain=get_method("random"))
    with pytest.raises(EvaluationError, match="explain="):
        GAE(progress=False)(model, x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(EvaluationError, match="attributions= .* or explain="):
        ABPC(progress=False)(model, x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(EvaluationError, match="one integer class per sample"):
        ABPC(progress=False)(model, x, torch.zeros(4), attributions=x)


# ------------------------------------------------------------------------------------------------
# methods


def test_every_method_returns_a_finite_map_like_x():
    model = tiny_cnn()
    x = torch.randn(2, 3, H, W)
    t = torch.tensor([1, 3])
    assert set(lrpgraph.composite_names()) <= set(method_names())
    for name in method_names():
        a = METHODS[name](model, x, t)
        assert a.shape == x.shape and torch.isfinite(a).all(), name
        assert not any(p.grad is not None for p in model.parameters()), name


def test_lrp_method_matches_explain_and_caches_the_trace():
    model = tiny_cnn()
    x, t = torch.randn(2, 3, H, W), torch.tensor([0, 2])
    m = get_method("abslrp")
    assert torch.allclose(m(model, x, t), lrpgraph.explain(model, x, t, rules="abslrp"))
    assert m.explainer(model) is m.explainer(model)


def test_gradient_methods_on_a_linear_model():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * H * W, 4, bias=False)).eval()
    x, t = torch.randn(2, 3, H, W), torch.tensor([1, 2])
    w = lin[1].weight[t].view(2, 3, H, W)
    assert torch.allclose(get_method("gradient")(lin, x, t), w)
    assert torch.allclose(get_method("gradient-x-input")(lin, x, t), w * x)
    assert torch.allclose(get_method("ig", steps=4)(lin, x, t), w * x, atol=1e-6)
    assert torch.allclose(get_method("smoothgrad", n=3)(lin, x, t), w, atol=1e-6)


def test_integrated_gradients_completeness_and_seeded_noise():
    model = tiny_cnn(act=nn.Tanh)
    x, t = torch.randn(2, 3, H, W), torch.tensor([0, 4])
    ig = get_method("integrated-gradients", steps=64, batch_size=16)(model, x, t)
    out = model(x).gather(1, t.view(-1, 1))[:, 0] - model(torch.zeros_like(x)).gather(1, t.view(-1, 1))[:, 0]
    assert torch.allclose(ig.flatten(1).sum(1), out, rtol=1e-2, atol=1e-3)
    assert torch.equal(get_method("smoothgrad")(model, x, t), get_method("smoothgrad")(model, x, t))
    assert torch.equal(get_method("random")(model, x, t), get_method("random")(model, x, t))
    assert not torch.equal(get_method("random", seed=1)(model, x, t), get_method("random")(model, x, t))
    with pytest.raises(KeyError, match="unknown attribution method"):
        get_method("no-such-method")


# ------------------------------------------------------------------------------------------------
# CLI


def test_cli_writes_table_csv_and_plot(tmp_path, monkeypatch):
    fake = types.ModuleType("lrpgraph.zoo")
    fake.load = lambda name: tiny_cnn(classes=4)
    fake.load_samples = lambda n: colour_images([i % 4 for i in range(n)])
    monkeypatch.setitem(sys.modules, "lrpgraph.zoo", fake)
    monkeypatch.setattr(lrpgraph, "zoo", fake, raising=False)
    from lrpgraph.evaluate.cli import main
    rc = main(["evaluate", "--models", "tiny", "--methods", "gradient", "random", "lrp-epsilon",
               "--metrics", "gae", "abpc", "--n", "9", "--gae-steps", "3", "--abpc-steps", "4",
               "--out", str(tmp_path), "--quiet"])
    assert rc == 0
    md = (tmp_path / "evaluation.md").read_text()
    assert "| gradient |" in md and "| random |" in md and "GAE" in md and "ABPC" in md
    rows = list(csv.DictReader(open(tmp_path / "evaluation.csv")))
    assert [r["method"] for r in rows] == ["gradient", "random", "lrp-epsilon"]
    assert all(r["gae"] and r["gae_median"] and r["abpc"] and r["n"] == "9" for r in rows)
    samples = torch.load(tmp_path / "evaluation_samples.pt")
    assert samples["tiny"]["random"]["gae"].shape == (2,) and samples["tiny"]["random"]["abpc"].shape == (9,)
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "evaluation.png").stat().st_size > 1000
    except ImportError:
        pass
    assert main(["--models", "tiny", "--batch-size", "6", "--out", str(tmp_path)]) == 2
