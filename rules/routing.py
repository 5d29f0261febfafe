"""Routing ops that only move (or copy) values: padding, rolling, flipping, unfolding, repeating,
pixel shuffles. Relevance follows the values back exactly.

One rule serves them all. The op is run once more on an *index map* of its input (entry ``i`` holds
``i + 1``; 0 marks "no source", which zero padding produces), so the output says, entry by entry,
which input entry it was copied from; the relevance is then summed back into those entries with
``scatter_add``. Entries copied several times (reflect padding, overlapping windows, repeats) add
their relevance up like a fan-out, so the two sign streams are returned separately (a
:class:`~lrpgraph.rule.Split`) for the report to measure before they cancel. Padded entries of a
constant pad have no source. With zero padding their relevance is 0 by construction (the rule of
the op that consumed them gives them none in absLRP, since they are 0); a pad with a non-zero
value adds constant entries, whose relevance belongs to that constant as a parameter's share does
to the parameter (``x + b``): it is absorbed, and the report shows it in a by-design row
``<node>.constant`` (see :class:`~lrpgraph.rule.Absorbed`). The rules subclass
:class:`~lrpgraph.rules.structural.Structural`, so a preset that applies another rule to every
shape op applies it to these as well.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrpgraph.presets import extend_preset
from lrpgraph.rule import Absorbed, NodeContext, Split

from .structural import Structural

PAD_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
               nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
               nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d)


def _run_on(ctx: NodeContext, idx: Tensor) -> Tensor:
    """The node's op applied to ``idx`` in place of its tensor input (constant pads pad with 0)."""
    m = ctx.module
    rest, kw = list(ctx.args[1:]), dict(ctx.kwargs)
    if isinstance(m, (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)):
        return F.pad(idx, m.padding, "constant", 0.0)
    if m is not None:
        return m(idx)
    if ctx.target is F.pad:
        mode = kw.pop("mode", rest[1] if len(rest) > 1 else "constant")
        pad = kw.pop("pad", rest[0] if rest else None)
        return F.pad(idx, pad, mode, 0.0) if mode == "constant" else F.pad(idx, pad, mode)
    if any(isinstance(v, Tensor) or v is None for v in rest) or any(isinstance(v, Tensor) for v in kw.values()):
        raise NotImplementedError(f"{ctx.describe()}: a routing op with a tensor argument (computed "
                                  "repeats or shifts) has no rule; pass plain numbers")
    if ctx.op == "call_method":
        return getattr(idx, ctx.target)(*rest, **kw)
    return ctx.target(idx, *rest, **kw)


def pad_value(ctx: NodeContext) -> float:
    """The fill value of a constant pad; 0 for the other routing ops."""
    m = ctx.module
    if isinstance(m, (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)):
        return float(m.value)
    if ctx.target is F.pad:
        a, kw = list(ctx.args) + [None] * 3, ctx.kwargs
        mode, value = kw.get("mode", a[2] or "constant"), kw.get("value", a[3])
        return float(value or 0.0) if mode == "constant" else 0.0
    return 0.0


def _sources(ctx: NodeContext, device) -> Tensor:
    """Per output entry, 1 + the flat index of the input entry it copies (0: none)."""
    shape = tuple(ctx.input_shapes[0])
    n = 1
    for s in shape:
        n *= s
    # float64 holds every index exactly up to 2**53; reflect/replicate pads want floats
    return _run_on(ctx, torch.arange(1, n + 1, dtype=torch.float64, device=device).reshape(shape))


class IndexRoute(Structural):
    """Exact routing for any op that copies input entries to output entries (see the module doc)."""

    @property
    def name(self) -> str:
        return "route"

    def __call__(self, ctx, relevance):
        out = super().__call__(ctx, relevance)
        value = pad_value(ctx)
        if value == 0.0 or not isinstance(relevance, Tensor):
            return out
        constant = (_sources(ctx, relevance.device) == 0).to(relevance.dtype)
        return list(out) + [Absorbed(relevance * constant, f"the pad value {value:g}")]

    def route(self, ctx, r):
        shape = tuple(ctx.input_shapes[0])
        n = 1
        for s in shape:
            n *= s
        src = _sources(ctx, r.device)
        if tuple(src.shape) != tuple(r.shape[1:]):
            raise NotImplementedError(f"{ctx.describe()}: could not map its output back to its input "
                                      f"(index map {tuple(src.shape)}, relevance {tuple(r.shape[1:])})")
        k = r.shape[0]
        where = src.round().long().reshape(1, -1).expand(k, -1)

        def back(t: Tensor) -> Tensor:
            full = torch.zeros((k, n + 1), dtype=t.dtype, device=t.device)
            full.scatter_add_(1, where, t.reshape(k, -1))
            return full[:, 1:].reshape((k,) + shape)
        return Split(back(r.clamp(min=0)), back(r.clamp(max=0)))


def routing_table() -> dict:
    """``{key: rule}`` for the routing ops (shared by every preset)."""
    route = IndexRoute()
    keys = (F.pad, torch.roll, "roll", torch.flip, "flip", torch.fliplr, torch.flipud, torch.rot90, "rot90",
            "unfold", F.unfold, nn.Unfold, torch.repeat_interleave, "repeat_interleave", "repeat",
            torch.tile, "tile", F.pixel_shuffle, F.pixel_unshuffle, nn.PixelShuffle, nn.PixelUnshuffle,
            F.channel_shuffle, nn.ChannelShuffle, torch.narrow, "narrow", torch.diagonal) + PAD_MODULES
    return {k: route for k in keys}


extend_preset("*", routing_table)
