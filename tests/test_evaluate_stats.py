"""Confidence intervals and seed averaging (lrpgraph.evaluate.stats) on cases with known answers."""
import math

import pytest
import torch

from lrpgraph.evaluate import GAEResult, Interval, bootstrap_ci, mean_over_seeds, summarize


def test_constant_and_single_values_give_a_point_interval():
    assert bootstrap_ci([2.5] * 10) == (2.5, 2.5)
    assert bootstrap_ci([7.0]) == (7.0, 7.0)


def test_two_point_sample_exact_quantiles():
    # the mean of two draws from {0, 1} is 0 (p = 1/4), 1/2 (p = 1/2) or 1 (p = 1/4): the 95 %
    # interval is [0, 1], the 40 % interval (30 % and 70 % quantiles) is [1/2, 1/2]
    assert bootstrap_ci([0.0, 1.0], level=0.95, n_boot=4000) == (0.0, 1.0)
    assert bootstrap_ci([0.0, 1.0], level=0.4, n_boot=4000) == (0.5, 0.5)


def test_normal_sample_matches_the_textbook_interval():
    g = torch.Generator().manual_seed(0)
    v = 3.0 + 2.0 * torch.randn(400, generator=g, dtype=torch.float64)
    lo, hi = bootstrap_ci(v, n_boot=4000)
    m, half = float(v.mean()), 1.96 * float(v.std()) / math.sqrt(400)
    assert lo < m < hi
    assert abs((hi - lo) / 2 - half) < 0.1 * half                 # within 10 % of 1.96 s / sqrt(n)
    assert abs((hi + lo) / 2 - m) < 0.1 * half                    # centred on the mean
    lo90, hi90 = bootstrap_ci(v, level=0.90, n_boot=4000)
    assert lo < lo90 < hi90 < hi                                  # a lower level gives a narrower interval


def test_seeded_and_input_checked():
    v = torch.rand(50, generator=torch.Generator().manual_seed(1))
    assert bootstrap_ci(v, seed=3) == bootstrap_ci(v, seed=3)
    assert bootstrap_ci(v, seed=3) != bootstrap_ci(v, seed=4)
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(v, level=1.0)
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_ci([])


def _gae(vals):
    t = torch.tensor(vals)
    z = torch.zeros(len(vals), dtype=torch.long)
    return GAEResult(local_consistency=t, faithfulness=t, robustness=t, contrastiveness=t, gae=t, positive=z,
                     target=z, morf_logits=torch.zeros(len(vals), 3), lerf_logits=torch.zeros(len(vals), 3))


def test_mean_over_seeds_and_summary():
    a, b = _gae([0.0, 1.0, 2.0]), _gae([2.0, 1.0, 0.0])
    m = mean_over_seeds([a, b])
    assert set(m) == {"local_consistency", "faithfulness", "robustness", "contrastiveness", "gae"}
    assert m["gae"].tolist() == [1.0, 1.0, 1.0]
    s = summarize(m)
    assert s["gae"] == Interval(1.0, 1.0, 1.0) and str(s["gae"]) == "1.000 [1.000, 1.000]"
    r = a.summary()["gae"]
    assert r.mean == 1.0 and 0.0 <= r.low <= 1.0 <= r.high <= 2.0
    with pytest.raises(ValueError, match="differ"):
        mean_over_seeds([a, _gae([1.0, 2.0])])


def test_cli_reports_srg_intervals_and_seed_means(tmp_path, monkeypatch):
    import csv
    import sys
    import types

    import lrpgraph
    from torch import nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 4)).eval()
    fake = types.ModuleType("lrpgraph.zoo")
    fake.load = lambda name: model
    fake.load_samples = lambda n: (torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(0)),
                                   torch.arange(n) % 4)
    monkeypatch.setitem(sys.modules, "lrpgraph.zoo", fake)
    monkeypatch.setattr(lrpgraph, "zoo", fake, raising=False)
    from lrpgraph.evaluate.cli import main
    assert main(["--models", "tiny", "--methods", "gradient", "--metrics", "gae", "srg", "--n", "16",
                 "--seeds", "0", "1", "--gae-steps", "3", "--srg-patch", "2", "--n-boot", "200",
                 "--out", str(tmp_path), "--quiet", "--no-plot"]) == 0
    row = next(csv.DictReader(open(tmp_path / "evaluation.csv")))
    per_seed = [float(v) for v in row["gae_seeds"].split(" / ")]
    assert len(per_seed) == 2 and abs(float(row["gae"]) - sum(per_seed) / 2) < 2e-3   # mean of the seeds
    for c in ("gae", "srg", "faithfulness"):
        assert float(row[f"{c}_lo"]) <= float(row[c]) <= float(row[f"{c}_hi"])
    md = (tmp_path / "evaluation.md").read_text()
    assert f"{float(row['srg']):.3f} [{float(row['srg_lo']):.3f}, {float(row['srg_hi']):.3f}]" in md
    assert "GAE per seed" in md and "95 % percentile bootstrap" in md
    s = torch.load(tmp_path / "evaluation_samples.pt")["tiny"]["gradient"]
    assert s["gae_per_seed"].shape == (2, 4) and s["srg"].shape == (16,)


@pytest.mark.parametrize("arg", [["--ci-level", "1.5"], ["--n-boot", "0"], ["--srg-patch", "0"], ["--srg-steps", "0"]])
def test_cli_rejects_bad_interval_and_srg_arguments(arg, capsys):
    from lrpgraph.evaluate.cli import main
    assert main(["--models", "vgg"] + arg) == 2
    assert arg[0] in capsys.readouterr().err
