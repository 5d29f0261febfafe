"""The debugger's figures in docs/: the HTML page of timm ViT-B/16 (random weights, one 224x224
image) with its size, its load time in headless Chromium and a screenshot, and the residual plots
(A and C per block) of ViT-B/16 and ResNet50 (random weights).

    OMP_NUM_THREADS=2 python benchmarks/debugger_figures.py --out docs/img

Random weights: the figures show what the tool draws, not what a trained model does.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tv_compat import import_timm  # noqa: E402

import lrpgraph  # noqa: E402
from lrpgraph.html import write_html  # noqa: E402
from lrpgraph.residuals import plot_residuals  # noqa: E402


EXE = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def chromium(url: str, *extra: str) -> str:
    exe = EXE
    with tempfile.TemporaryDirectory() as prof:
        out = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={prof}",
                              *extra, url], capture_output=True, text=True, timeout=300)
    return out.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/img")
    p.add_argument("--size", type=int, default=224, help="ViT input size (224 for ViT-B/16)")
    p.add_argument("--loads", type=int, default=5, help="page loads to time")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    timm = import_timm()
    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=a.size).eval()
    x = torch.randn(1, 3, a.size, a.size)
    e = lrpgraph.Explainer(vit, rules="abslrp")(x)
    page = Path(tempfile.mkdtemp()) / "vit_b16.html"
    write_html(e, str(page), title="timm vit_base_patch16_224 (random weights), preset abslrp")
    g = e.graph()
    print(f"ViT-B/16 page: {page.stat().st_size / 1024:.0f} KiB, {g.number_of_nodes()} nodes, "
          f"{g.number_of_edges()} edges")
    load, script, wall = [], [], []
    for _ in range(a.loads if EXE else 0):
        t = time.perf_counter()
        dom = chromium(page.as_uri(), "--dump-dom")
        wall.append(time.perf_counter() - t)
        load.append(float(re.search(r'data-load-ms="([\d.]+)"', dom).group(1)))
        script.append(float(re.search(r'data-script-ms="([\d.]+)"', dom).group(1)))
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    if not EXE:
        print("no Chromium binary (apt-get install chromium): load time and screenshot skipped")
    elif load:
        print(f"load (navigation start to drawn, median of {a.loads}): {med(load):.0f} ms; the page's script "
              f"{med(script):.0f} ms; chromium start to exit {med(wall):.2f} s")
    shot = out / "debugger_vitb16.png"
    if EXE:
        chromium(page.as_uri() + "#block=blocks.5&click=blocks_5_attn_qkv", f"--screenshot={shot.resolve()}",
                 "--window-size=1400,1000")
        print(f"screenshot: {shot}")
    res = {"abslrp": e.residuals(), "lrp-epsilon": lrpgraph.Explainer(vit, rules="lrp-epsilon")(x).residuals()}
    print(f"residual plot: {plot_residuals(res, str(out / 'residuals_vitb16.png'), title='ViT-B/16 (random weights): A and C per residual addition')}")
    torch.manual_seed(0)
    rn = timm.create_model("resnet50", pretrained=False).eval()
    with torch.no_grad():  # timm zero-initialises each block's last BatchNorm scale: the branch would be 0
        for m in rn.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    x = torch.randn(1, 3, 64, 64)
    res = {p: lrpgraph.Explainer(rn, rules=p)(x).residuals() for p in ("abslrp", "lrp-epsilon")}
    print(f"residual plot: {plot_residuals(res, str(out / 'residuals_resnet50.png'), title='ResNet50 (random weights, 64x64): A and C per residual addition')}")

if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
