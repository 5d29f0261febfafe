"""The command line: the main job writes a heatmap PNG and the conservation report; debug marks
leaks; coverage lists rules."""
from __future__ import annotations

import pytest
import torch

from lrpgraph import cli, image


def test_explain_writes_heatmap_and_report(tmp_path, capsys):
    pytest.importorskip("PIL")
    from lrpgraph import zoo

    if not zoo.weights_path("vgg").is_file():
        pytest.skip("bundled weights not present")
    assert cli.main(["explain", "--model", "vgg", "--n", "3", "--out", str(tmp_path)]) == 0
    png = tmp_path / "heatmap.png"
    from PIL import Image

    im = Image.open(png)
    assert im.size[0] > 2 * 32 * 4 and im.size[1] >= 3 * 32 * 4  # input and heatmap side by side, 3 rows
    table = (tmp_path / "conservation.txt").read_text()
    assert "0 node(s) leak beyond 1e-05" in table and "abslrp.affine[paper]" in table
    csv = (tmp_path / "conservation.csv").read_text().splitlines()
    assert csv[0].startswith("node,op,rule,pass,sample,in_sum")
    assert len(csv) > 10
    out = capsys.readouterr().out
    assert "heatmap:" in out and "worst relative error" in out


def test_debug_marks_leaks_and_strict_exit(timm, capsys):
    # lrp-epsilon absorbs relevance in the biases: leaks are marked, --strict fails
    rc = cli.main(["debug", "--model", "timm:resnet18", "--size", "32", "--rules", "lrp-epsilon", "--strict"])
    out = capsys.readouterr().out
    assert rc == 1 and "LEAK" in out and "leaking nodes:" in out
    rc = cli.main(["debug", "--model", "timm:resnet18", "--size", "32", "--double", "--strict"])
    out = capsys.readouterr().out
    assert rc == 0 and "0 node(s) leak" in out and "operator.add" in out


def test_coverage_and_presets(timm, capsys):
    assert cli.main(["coverage", "--model", "timm:resnet18"]) == 0
    out = capsys.readouterr().out
    assert "0 without a rule" in out and "layer1_0_conv1" in out
    assert cli.main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("abslrp", "abslrp-renorm", "lrp-0", "epsilon-plus-flat"):
        assert name in out


def test_heatmap_colours():
    r = torch.zeros(1, 3, 2, 2)
    r[0, :, 0, 0] = 1.0   # strongest positive: red
    r[0, :, 0, 1] = -0.5  # negative: light blue
    rgb = image.heatmap(r)[0]
    assert rgb[0, 0].tolist() == [255, 0, 0]
    assert rgb[1, 1].tolist() == [255, 255, 255]
    assert rgb[0, 1, 2] == 255 and rgb[0, 1, 0] < 255
