"""The interactive HTML page: its structure (always), and the page in a real headless Chromium
(skipped, with the reason, only where no Chromium binary is installed)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import torch

import lrpgraph
from lrpgraph import zoo
from lrpgraph.html import write_html

CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    e = lrpgraph.Explainer(zoo.load("vit"), rules="lrp-epsilon")(zoo.load_samples(2)[0])
    path = tmp_path_factory.mktemp("html") / "vit.html"
    write_html(e, str(path), title="SmallViT <test>")
    return e, path


def _data(text: str) -> dict:
    m = re.search(r"const DATA = (.*?);\nconst T0", text, re.S)
    assert m, "the page holds its data inline"
    return json.loads(m.group(1))


def test_page_structure(page):
    e, path = page
    text = path.read_text()
    # self-contained: no external script, style, image or font
    assert not re.search(r"<(script|link|img|iframe)[^>]*\s(src|href)=\"?(https?:)?//", text)
    assert "url(http" not in text and "@import" not in text
    assert "SmallViT &lt;test&gt;" in text
    data = _data(text)
    g = e.graph()
    assert {n["id"] for n in data["nodes"]} == set(g.nodes)
    assert len(data["edges"]) == g.number_of_edges()
    assert set(data["blocks"]) == {"blocks.0", "blocks.1", "blocks.2", "blocks.3"}
    layer = {n["id"]: n["layer"] for n in data["nodes"]}
    for ed in data["edges"]:  # top to bottom: every node sits below its inputs
        assert layer[ed["s"]] > layer[ed["t"]], ed
    row = e.conservation()["add_3"]
    n = next(n for n in data["nodes"] if n["id"] == "add_3")
    assert n["figs"]["in_sum"][0][1] == pytest.approx(float(row.in_sum[0, 1]), rel=1e-5)
    assert data["heatmap"].startswith("data:image/png;base64,")


def _chromium(url: str, tmp_path, *extra: str) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
           *extra, url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return re.sub(r"<script>.*?</script>", "", out.stdout, flags=re.S)  # the DOM, not the page's code


needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary (apt-get install chromium) "
                                    "to run the page in a real browser; test_page_structure still runs")


@needs_chromium
def test_page_in_chromium(page, tmp_path):
    e, path = page
    dom = _chromium(path.as_uri(), tmp_path, "--dump-dom")
    assert 'data-ready="1"' in dom, "the page's script ran to the end"
    assert "<th style=\"text-align:left\">sink: token</th>" in dom  # the books, before any click
    shown = set(re.findall(r'data-block="([^"]+)"', dom))
    assert shown == {"blocks.0", "blocks.1", "blocks.2", "blocks.3"}  # every block, collapsed
    # a click on a node (inside a collapsed block: the block is clicked open first) shows its row
    dom = _chromium(path.as_uri() + "#click=add_3", tmp_path, "--dump-dom")
    assert 'data-selected="add_3"' in dom
    row = e.conservation()["add_3"]
    cells = re.findall(r'<td data-col="in_sum">([^<]+)</td>', dom)
    assert [float(c) for c in cells] == pytest.approx([float(v) for v in row.in_sum[0]], rel=1e-5)
    assert "blocks_1_norm1" in dom  # the block opened
    # the leak filter: only leaking nodes (and the input) remain
    dom = _chromium(path.as_uri() + "#expand=all&leaks=1", tmp_path, "--dump-dom")
    leaks = {r.name for r in e.conservation().leaks(1e-5)}
    ids = set(re.findall(r'data-id="([^"]+)"', dom)) - {""}
    assert ids == leaks | {"x"}
    # search highlights
    dom = _chromium(path.as_uri() + "#expand=all&search=qkv", tmp_path, "--dump-dom")
    assert len(re.findall(r'class="node hit"', dom)) == 4


@needs_chromium
def test_page_screenshot(page, tmp_path):
    from PIL import Image

    _e, path = page
    png = tmp_path / "shot.png"
    _chromium(path.as_uri() + "#click=add_3", tmp_path, f"--screenshot={png}", "--window-size=1200,900")
    img = Image.open(png).convert("RGB")
    assert img.size == (1200, 900)
    colours = img.getcolors(1 << 20)
    greens = sum(c for c, rgb in colours if rgb == (0xa1, 0xd9, 0x9b))
    assert len(colours) > 50 and greens > 1000  # nodes were drawn


@needs_chromium
def test_vit_b16_page_in_chromium(timm, tmp_path):
    """ViT-B/16's page (random weights; 32x32 input: the same graph as at 224, 5 tokens) shows
    its 12 blocks, and a click in an opened block shows that node's row."""
    m = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32).eval()
    e = lrpgraph.Explainer(m, rules="abslrp")(torch.randn(1, 3, 32, 32))
    path = tmp_path / "vitb.html"
    write_html(e, str(path), title="ViT-B/16")
    dom = _chromium(path.as_uri(), tmp_path, "--dump-dom")
    assert set(re.findall(r'data-block="([^"]+)"', dom)) == {f"blocks.{i}" for i in range(12)}
    dom = _chromium(path.as_uri() + "#click=blocks_5_attn_qkv", tmp_path, "--dump-dom")
    assert 'data-selected="blocks_5_attn_qkv"' in dom
    cells = re.findall(r'<td data-col="out_sum">([^<]+)</td>', dom)
    assert [float(c) for c in cells] == pytest.approx([float(e.conservation()["blocks_5_attn_qkv"].out_sum[0, 0])],
                                                      rel=1e-5, abs=1e-12)
