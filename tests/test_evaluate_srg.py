"""SRG (Symmetric Relevance Gain) on models whose answers are known, and the per-channel baselines
it uses."""
import pytest
import torch
from torch import nn

from lrpgraph.evaluate import SRG, EvaluationError, MoRF, get_method

H = W = 16


class SumModel(nn.Module):
    def forward(self, x):
        s = x.flatten(1).sum(1)
        return torch.stack([s, -s], 1)


class CornerModel(nn.Module):
    """logit0 = sum of x over the top-left 4x4 patch (the only informative region), logit1 = -logit0."""

    def forward(self, x):
        s = x[:, :, :4, :4].flatten(1).sum(1)
        return torch.stack([s, -s], 1)


def images(seed: int) -> torch.Tensor:
    """8 dim noisy images with a bright top-left patch (so removing it lowers logit0)."""
    x = 0.2 * torch.rand(8, 3, H, W, generator=torch.Generator().manual_seed(seed))
    x[:, :, :4, :4] += 1
    return x


def corner_map(x):
    m = torch.zeros_like(x)
    m[:, :, :4, :4] = 1
    return m


def test_srg_exact_value_on_a_sum_model():
    # 4 patches of 2x2 with sums 10, 18, 42, 50; fill 0. MoRF: 120, 70, 28, 10, 0 -> AUC 42;
    # LeRF: 120, 110, 92, 50, 0 -> AUC 78; SRG = 36.
    x = torch.arange(16.).view(1, 1, 4, 4)
    r = SRG(patch_size=2, steps=4, baseline=0.0, progress=False)(SumModel(), x, torch.zeros(1, dtype=torch.long),
                                                                 attributions=x)
    assert r.morf.curve.tolist() == [[120, 70, 28, 10, 0]] and r.lerf.curve.tolist() == [[120, 110, 92, 50, 0]]
    assert abs(float(r.srg) - 36.0) < 1e-9
    assert set(r.aggregate()) == {"srg", "srg_morf_auc", "srg_lerf_auc"}


def test_srg_defaults_follow_the_paper_setting():
    s = SRG()
    assert (s.unit, s.patch_size, s.baseline, s.steps, s.score) == ("patch", (16, 16), "dataset-mean", 100, "logit")


def test_map_of_the_only_informative_region_beats_another_map():
    x, y = images(0), torch.zeros(8, dtype=torch.long)
    srg = SRG(patch_size=4, progress=False)                     # 16 patches, 16 points + 0 %
    good = srg(CornerModel(), x, y, attributions=corner_map(x))
    other = corner_map(x).flip(2, 3)                            # marks the bottom-right patch instead
    bad = srg(CornerModel(), x, y, attributions=other)
    assert (good.srg > bad.srg).all()
    # the corner patch goes first in MoRF and last in LeRF: SRG = (1 - 1/16) of the logit's drop
    fill = x.mean((0, 2, 3)).view(1, 3, 1, 1)
    drop = (x[:, :, :4, :4] - fill).flatten(1).sum(1).double()
    torch.testing.assert_close(good.srg, drop * 15 / 16)


def test_random_map_scores_about_zero():
    """Random maps put the informative patch at a uniformly random place in both orders, so
    E[SRG] = 0. Over 50 seeds x 8 images the mean must lie within 4 standard errors of 0 (the
    draws are seeded, so the test is deterministic; 4 sigma would be exceeded by chance with
    probability 6e-5), and that band must be below 15 % of the oracle's SRG so the test has the
    power to see a bias (measured: mean -0.26, standard error 1.28, oracle 42.1)."""
    x, y = images(1), torch.zeros(8, dtype=torch.long)
    srg = SRG(patch_size=4, progress=False)
    vals = torch.cat([srg(CornerModel(), x, y, explain=get_method("random", seed=s)).srg for s in range(50)])
    se = float(vals.std() / vals.numel() ** 0.5)
    oracle = float(srg(CornerModel(), x, y, attributions=corner_map(x)).srg.mean())
    assert abs(float(vals.mean())) < 4 * se
    assert 4 * se < 0.15 * oracle


def test_per_channel_and_dataset_mean_baselines():
    x = torch.stack([torch.full((2, 4, 4), 1.0), torch.full((2, 4, 4), 3.0)])   # 2 images, 2 channels
    x[:, 1] *= 10
    y = torch.zeros(2, dtype=torch.long)
    a = torch.rand_like(x)
    kw = dict(unit="pixel", steps=1, progress=False)
    end = MoRF(baseline=[1.0, 2.0], **kw)(SumModel(), x, y, attributions=a).curve[:, -1]
    assert end.tolist() == [48.0, 48.0]                          # 16 * 1 + 16 * 2
    end = MoRF(baseline="dataset-mean", **kw)(SumModel(), x, y, attributions=a).curve[:, -1]
    assert end.tolist() == [16 * 2.0 + 16 * 20.0] * 2            # channel means over both images
    with pytest.raises(EvaluationError, match="per-channel values"):
        MoRF(baseline=[0.0, 0.0, 0.0], **kw)(SumModel(), x, y, attributions=a)
