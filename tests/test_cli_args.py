"""Every bad command-line argument: one line on stderr, a non-zero exit, before any work."""
from __future__ import annotations

import subprocess
import sys

import pytest

from lrpgraph import cli

BAD = [
    ["explain", "--n", "0"],
    ["explain", "--n", "-3"],
    ["explain", "--n", "600"],
    ["explain", "--scale", "0"],
    ["explain", "--tol", "-1"],
    ["explain", "--model", "nope"],
    ["explain", "--rules", "nope"],
    ["debug", "--sample", "5"],
    ["debug", "--sample", "-1"],
    ["debug", "--n", "0"],
    ["debug", "--model", "nope"],
    ["debug", "--model", "timm:"],
    ["coverage", "--model", "nope"],
    ["evaluate", "--models", "nope"],
    ["evaluate", "--device", "tpu"],
    ["evaluate", "--device", "banana"],
    ["evaluate", "--abpc-baseline", "grey"],
    ["evaluate", "--gae-steps", "1"],
    ["evaluate", "--n", "0"],
    ["evaluate", "--n", "1000"],
    ["evaluate", "--methods", "nope"],
]


@pytest.mark.parametrize("argv", BAD, ids=lambda a: " ".join(a))
def test_bad_argument_is_one_line_and_nonzero(argv, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        cli.main(argv + ["--out", str(tmp_path / "o")] if argv[0] in ("explain", "evaluate") else argv)
    assert info.value.code not in (0, None)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0], err


@pytest.mark.parametrize("cmd", ["explain", "evaluate"])
def test_unusable_out_is_refused_before_the_work(cmd, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    from lrpgraph import zoo

    monkeypatch.setattr(zoo, "load", lambda *a, **k: pytest.fail("work started before --out was checked"))
    with pytest.raises(SystemExit) as info:
        cli.main([cmd, "--models" if cmd == "evaluate" else "--model", "vgg", "--out", str(blocker / "sub")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0]


def test_evaluate_does_not_write_into_results_by_default():
    from lrpgraph.evaluate.cli import build_parser

    out = build_parser().parse_args([]).out
    assert not out.startswith("results")


@pytest.mark.parametrize("cmd", ["explain", "debug", "coverage", "evaluate"])
def test_every_option_has_help_and_no_markup(cmd):
    import argparse

    if cmd == "evaluate":
        from lrpgraph.evaluate.cli import build_parser
        parser = build_parser()
    else:
        sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[cmd]
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{cmd} {action.option_strings[0]} has no help text"
    text = subprocess.run([sys.executable, "-m", "lrpgraph.cli", cmd, "-h"], capture_output=True, text=True).stdout
    for markup in ("``", ":func:", ":class:", "%%", "\\|"):
        assert markup not in text, f"raw markup {markup!r} in `lrpgraph {cmd} -h`"


def test_heatmap_has_a_colour_bar_and_the_report_names_its_sample(tmp_path):
    pytest.importorskip("PIL")
    from PIL import Image

    assert cli.main(["explain", "--n", "2", "--out", str(tmp_path)]) == 0
    first = (tmp_path / "conservation.txt").read_text().splitlines()[0]
    assert "bundled test image 0" in first and "values of that sample" in first
    im = Image.open(tmp_path / "heatmap.png").convert("RGB")
    w, h = im.size
    bar = next(y for y in range(h - 1, 0, -1) if im.getpixel((4, y)) == (0, 0, 255))  # the ramp's blue end
    assert im.getpixel((w - 5, bar)) == (255, 0, 0)  # ... and its red end, on the same row
