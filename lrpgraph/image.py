"""Heatmaps: relevance to colours (torch only), and PNG grids (Pillow, the ``image`` extra).

Relevance maps are signed: positive evidence for the class is red, negative evidence blue, zero
white (a "seismic" palette), each map scaled by its own largest absolute value.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import Tensor


def to_2d(relevance: Tensor) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, H, W)`` by summing channels (``(B, H, W)`` passes through)."""
    if relevance.dim() == 4:
        return relevance.sum(1)
    if relevance.dim() == 3:
        return relevance
    raise ValueError(f"expected relevance shaped (B, C, H, W) or (B, H, W), got {tuple(relevance.shape)}")


def max_normalise(relevance: Tensor) -> Tensor:
    """Scale each sample to ``[-1, 1]`` by its largest absolute value (zeros stay zeros)."""
    flat = relevance.reshape(relevance.shape[0], -1)
    m = flat.abs().amax(1).clamp(min=1e-30)
    return relevance / m.reshape((-1,) + (1,) * (relevance.dim() - 1))


def seismic(values: Tensor) -> Tensor:
    """Map ``[-1, 1]`` to RGB uint8 ``(..., 3)``: -1 blue, 0 white, +1 red."""
    v = values.clamp(-1, 1).float()
    pos, neg = v.clamp(min=0), (-v).clamp(min=0)
    r = 1 - neg
    g = 1 - pos - neg
    b = 1 - pos
    rgb = torch.stack([r, g, b], dim=-1)
    return (rgb * 255).round().to(torch.uint8)


def heatmap(relevance: Tensor) -> Tensor:
    """Signed relevance -> uint8 RGB ``(B, H, W, 3)``, channel-summed and max-normalised per sample."""
    return seismic(max_normalise(to_2d(relevance.detach().cpu())))


def _pil():
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("writing PNG files needs Pillow: pip install 'lrpgraph[image]'") from exc
    return Image


def _to_pil(Image, rgb: Tensor):
    """uint8 ``(H, W, 3)`` tensor to a PIL image without NumPy (the ``image`` extra needs none)."""
    h, w, _ = rgb.shape
    return Image.frombytes("RGB", (w, h), bytes(rgb.contiguous().reshape(-1).tolist()))


LEGEND = ("red: evidence for the explained class, blue: against it, white: none; "
          "each map is scaled to its own largest |relevance|")


def save_grid(path: Union[str, Path], images: Optional[Tensor], relevance: Tensor,
              titles: Optional[Sequence[str]] = None, scale: int = 4, title: Optional[str] = None,
              legend: bool = True) -> Path:
    """Write a PNG: one row per sample with the input (if given) beside its heatmap, under a
    ``title`` and over a colour bar (``legend``) that says what red and blue mean and that every
    map is scaled to its own maximum, so the figure reads on its own.

    Args:
        images: display images ``(B, 3, H, W)`` or ``(B, 1, H, W)`` in ``[0, 1]``, or ``None``.
        relevance: ``(B, C, H, W)`` or ``(B, H, W)`` relevance.
        titles: optional caption per row (drawn above the row in Pillow's default font).
        scale: integer upscaling (nearest) so that small images stay readable.
        title: a line drawn above the grid (e.g. the model and the preset).
        legend: draw the colour bar and its explanation below the grid.
    """
    Image = _pil()
    from PIL import ImageDraw

    heat = heatmap(relevance)  # (B, H, W, 3)
    B, H, W, _ = heat.shape
    cols = [heat]
    if images is not None:
        img = images.detach().cpu().float().clamp(0, 1)
        if img.shape[1] == 1:
            img = img.expand(-1, 3, -1, -1)
        cols.insert(0, (img.permute(0, 2, 3, 1) * 255).round().to(torch.uint8))
    cap = 12 if titles else 0
    pad = 4
    cell_w, cell_h = W * scale, H * scale
    top = 16 if title else 0
    words = LEGEND.replace(";", ";\n").split("\n") if legend else []
    bottom = (14 + 12 * (len(words) + 1)) if legend else 0
    width = max(len(cols) * (cell_w + pad) + pad, 330 if legend else 0)
    canvas = Image.new("RGB", (width, top + B * (cell_h + cap + pad) + pad + bottom), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, pad), title, fill=(0, 0, 0))
    if legend:
        y0 = top + B * (cell_h + cap + pad) + pad
        bar_w = width - 2 * pad
        ramp = seismic(torch.linspace(-1, 1, bar_w)).unsqueeze(0).expand(10, -1, -1)
        canvas.paste(_to_pil(Image, ramp), (pad, y0))
        draw.text((pad, y0 + 11), "-max", fill=(0, 0, 160))
        draw.text((pad + bar_w // 2 - 3, y0 + 11), "0", fill=(0, 0, 0))
        draw.text((pad + bar_w - 28, y0 + 11), "+max", fill=(160, 0, 0))
        for k, line in enumerate(words):
            draw.text((pad, y0 + 23 + 12 * k), line.strip(), fill=(0, 0, 0))
    for i in range(B):
        y = top + pad + i * (cell_h + cap + pad)
        if titles:
            draw.text((pad, y), str(titles[i]), fill=(0, 0, 0))
        for j, col in enumerate(cols):
            tile = _to_pil(Image, col[i]).resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(tile, (pad + j * (cell_w + pad), y + cap))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
