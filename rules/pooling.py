"""Pooling, reductions and resampling: average pools with their own divisors, sums, max reductions,
L2 norms, ``Upsample`` / ``F.interpolate``.

The linear ones are affine ops with non-negative weights, described for :func:`affine_of` (so
every affine rule family serves them, absLRP's closed form ``(x + |x|) * (W^T S)`` included):

* average pooling with ``ceil_mode``, ``count_include_pad=False`` or ``divisor_override``: the
  window sums of the zero-padded input (padded on the right as far as ``ceil_mode``'s last windows
  reach) divided by each window's own divisor, which PyTorch's pool itself gives us;
* ``torch.sum`` / ``Tensor.sum`` over feature dims: a pooling matrix of ones per axis;
* ``F.fold`` / ``nn.Fold``: the sum of overlapping patches (weights 1), transposed by ``F.unfold``;
* ``Upsample`` / ``F.interpolate`` in ``nearest``, ``nearest-exact``, ``linear``, ``bilinear``,
  ``trilinear`` or ``bicubic`` mode: separable, one interpolation matrix per axis, read off by
  interpolating the identity. Bicubic matrices have negative lobes: absLRP and epsilon take them
  as the signed weights they are (``|A (x) B| = |A| (x) |B|``); the classic rules that split the
  weight by sign refuse them (see :class:`~.affine.MatrixPoolAffine`). Antialiasing is a
  different filter per output, not read off this way: refused.

Max reductions (``amax``, ``max`` over a dim) route to the winner of each group, like max pooling:
absLRP ``paper`` ``r = x (1 + sign h) S`` at the winner, ``head`` adds the winner of ``|x|``;
the classic presets pass each group's relevance to its winner.

The L2 norm over feature dims is ``h = sum_i x_i (x_i / h)``, non-negative contributions
``z_i = x_i^2 / h``: absLRP (twin ``||x|| = h``) gives ``r_i = 2 z_i S``, the classic presets the
epsilon z-rule over the ``z_i``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrpgraph.presets import extend_preset
from lrpgraph.rule import NodeContext, Rule

from .abslrp import AbsAffine, AbsLRP
from .affine import Affine, MatrixPoolAffine, _arg, _tuple, register_affine
from .classic import Epsilon, EpsilonRule

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_INPUT = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input, 3: torch.nn.grad.conv3d_input}
_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


class WindowPoolAffine(Affine):
    """Average pooling as ``A(x) / d``: ``A`` sums each window of the zero-padded input, ``d`` is the
    window's divisor (``(1, 1, *out)``). Weights are non-negative; ``weight`` is ``None``."""

    def __init__(self, in_shape, out_shape, kernel, stride, padding, divisor: Tensor, n_slots: int = 1):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.nd = len(self.in_shape) - 2
        self.kernel, self.stride, self.padding = kernel, stride, padding
        self.divisor, self.weight, self.bias, self.n_slots = divisor, None, None, n_slots
        # right padding so that floor-mode windows cover ceil_mode's last windows
        self.extra = [max(0, (o - 1) * s + k - (i + 2 * p))
                      for i, o, k, s, p in zip(self.in_shape[2:], self.out_shape[2:], kernel, stride, padding)]
        self.ones = torch.ones((1, 1) + tuple(kernel), dtype=divisor.dtype, device=divisor.device)

    def _pads(self) -> list:
        pads: list = []
        for p, e in zip(reversed(self.padding), reversed(self.extra)):
            pads += [p, p + e]
        return pads

    def window_sums(self, x: Tensor) -> Tensor:
        lead = x.shape[:-self.nd]
        flat = x.reshape((-1, 1) + tuple(x.shape[-self.nd:]))
        z = _CONV[self.nd](F.pad(flat, self._pads()), self.ones, stride=self.stride)
        z = z[(Ellipsis,) + tuple(slice(0, o) for o in self.out_shape[2:])]
        return z.reshape(tuple(lead) + tuple(z.shape[2:]))

    def forward(self, x, weight, bias):
        return self.window_sums(x) / self.divisor

    def transpose(self, s, weight):
        t = s / self.divisor
        lead = t.shape[:-self.nd]
        flat = t.reshape((-1, 1) + tuple(t.shape[-self.nd:]))
        padded = [i + 2 * p + e for i, p, e in zip(self.in_shape[2:], self.padding, self.extra)]
        # conv_input wants the grad of the full conv output: outputs cut off above get zero
        full = [(n - k) // st + 1 for n, k, st in zip(padded, self.kernel, self.stride)]
        if list(flat.shape[2:]) != full:
            flat = F.pad(flat, [q for o, f in zip(reversed(flat.shape[2:]), reversed(full)) for q in (0, f - o)])
        r = _CONV_INPUT[self.nd]((flat.shape[0], 1) + tuple(padded), self.ones, flat, stride=self.stride)
        r = r[(Ellipsis,) + tuple(slice(p, p + i) for p, i in zip(self.padding, self.in_shape[2:]))]
        return r.reshape(tuple(lead) + tuple(self.in_shape[2:]))


def general_avgpool(ctx: NodeContext, kernel, stride, padding, ceil_mode, count_include_pad, divisor):
    """:class:`WindowPoolAffine` for an average-pool node with any of PyTorch's options."""
    x_shape = tuple(ctx.input_shapes[0])
    out_shape = tuple(ctx.output_shape)
    nd = len(x_shape) - 2
    k = _tuple(kernel, nd)
    st = _tuple(stride if stride else kernel, nd)
    pad = _tuple(padding, nd)
    ref = ctx.output if isinstance(ctx.output, Tensor) else ctx.inputs[0]
    dt, dev = ref.dtype, ref.device
    if divisor:
        d = torch.full((1, 1) + out_shape[2:], float(divisor), dtype=dt, device=dev)
    else:
        op = WindowPoolAffine(x_shape, out_shape, k, st, pad, torch.ones((), dtype=dt, device=dev))
        ones = torch.ones((1, 1) + x_shape[2:], dtype=dt, device=dev)
        # PyTorch's own averages of ones give each window's count / divisor
        avg = _AVG[nd](ones, k, st, pad, ceil_mode, count_include_pad)
        d = op.window_sums(ones) / avg
    return WindowPoolAffine(x_shape, out_shape, k, st, pad, d, n_slots=len(ctx.inputs))


# --------------------------------------------------------------------------------------------
# sums


def _reduced_dims(ctx: NodeContext, dim) -> List[int]:
    nd = len(ctx.input_shapes[0])
    if dim is None:
        raise NotImplementedError(f"{ctx.describe()}: a reduction over all dims (batch included) mixes "
                                  "samples; reduce over the feature dims only")
    dims = sorted(d % nd for d in ((dim,) if isinstance(dim, int) else dim))
    if 0 in dims:  # (a sum over stacked heads' logits too: the per-sample sign split needs dim 0)
        raise NotImplementedError(f"{ctx.describe()}: a reduction over dim 0 (the batch dim) mixes "
                                  "samples; reduce over the feature dims only")
    return dims


def sum_affine(ctx: NodeContext) -> MatrixPoolAffine:
    """``torch.sum(x, dim, keepdim)``: a matrix of ones per summed axis."""
    a, kw = list(ctx.args) + [None] * 3, ctx.kwargs
    dims = _reduced_dims(ctx, _arg(a, kw, 1, "dim", None))
    keepdim = bool(_arg(a, kw, 2, "keepdim", False))
    x_shape = tuple(ctx.input_shapes[0])
    ref = ctx.output if isinstance(ctx.output, Tensor) else ctx.inputs[0]
    mats = [torch.ones((1, x_shape[d]), dtype=ref.dtype, device=ref.device) for d in dims]
    out = tuple(1 if d in dims else s for d, s in enumerate(x_shape)) if keepdim else \
        tuple(s for d, s in enumerate(x_shape) if d not in dims)
    return MatrixPoolAffine(mats, dims, x_shape, out, n_slots=len(ctx.inputs))


# --------------------------------------------------------------------------------------------
# fold: the sum of overlapping patches


class FoldAffine(Affine):
    """``F.fold`` / ``nn.Fold``: every column entry is added into its place in the output, so
    overlapping patches sum (a sum pooling with weights 1, ``weight`` is ``None``). The transpose
    ``W^T s`` gathers each column entry's output value back: ``F.unfold`` with the same
    arguments (fold's adjoint)."""

    def __init__(self, in_shape, out_shape, params: dict, n_slots: int = 1):
        self.in_shape, self.out_shape, self.params = tuple(in_shape), tuple(out_shape), params
        self.weight, self.bias, self.n_slots = None, None, n_slots

    def forward(self, x, weight, bias):
        lead = x.shape[:-2]
        z = F.fold(x.reshape((-1,) + tuple(x.shape[-2:])), **self.params)
        return z.reshape(tuple(lead) + tuple(z.shape[-3:]))

    def transpose(self, s, weight):
        k = s.shape[0]
        p = {n: v for n, v in self.params.items() if n != "output_size"}
        r = F.unfold(s.reshape((-1,) + tuple(self.out_shape[-3:])), **p)
        return r.reshape((k,) + self.in_shape)


def fold_affine(ctx: NodeContext) -> FoldAffine:
    """:class:`FoldAffine` of a ``F.fold`` call or an ``nn.Fold`` module."""
    m = ctx.module
    names = ("output_size", "kernel_size", "dilation", "padding", "stride")
    if m is not None:
        params = {n: getattr(m, n) for n in names}
    else:
        a, kw = list(ctx.args) + [None] * 6, ctx.kwargs
        params = {n: _arg(a, kw, i + 1, n, 0 if n == "padding" else 1) for i, n in enumerate(names)}
    return FoldAffine(ctx.input_shapes[0], ctx.output_shape, params, n_slots=len(ctx.inputs))


# --------------------------------------------------------------------------------------------
# resampling

_LINEAR = {"linear": "linear", "bilinear": "linear", "trilinear": "linear",
           "nearest": "nearest", "nearest-exact": "nearest-exact"}


def interpolate_affine(ctx: NodeContext) -> MatrixPoolAffine:
    """``Upsample`` / ``F.interpolate``: one interpolation matrix per spatial axis."""
    m = ctx.module
    if m is not None:
        size, sf, mode, ac = m.size, m.scale_factor, m.mode, m.align_corners
        recompute, antialias = m.recompute_scale_factor, False
    else:
        a, kw = list(ctx.args) + [None] * 7, ctx.kwargs
        size, sf = _arg(a, kw, 1, "size"), _arg(a, kw, 2, "scale_factor")
        mode, ac = _arg(a, kw, 3, "mode", "nearest"), _arg(a, kw, 4, "align_corners")
        recompute, antialias = _arg(a, kw, 5, "recompute_scale_factor"), _arg(a, kw, 6, "antialias", False)
    if (mode not in _LINEAR and mode != "bicubic") or antialias:
        raise NotImplementedError(f"{ctx.describe()}: interpolation mode {mode!r}"
                                  f"{' with antialias' if antialias else ''} is not supported (its weights "
                                  "are not a separable matrix per axis); use nearest, (bi/tri)linear or "
                                  "bicubic without antialias")
    x_shape, out_shape = tuple(ctx.input_shapes[0]), tuple(ctx.output_shape)
    nd = len(x_shape) - 2
    ref = ctx.output if isinstance(ctx.output, Tensor) else ctx.inputs[0]
    sfs = _tuple(sf, nd) if sf is not None and not recompute else (None,) * nd
    mats = []
    for n_in, n_out, f in zip(x_shape[2:], out_shape[2:], sfs):
        eye = torch.eye(n_in, dtype=ref.dtype, device=ref.device).unsqueeze(0)
        kw1 = dict(scale_factor=f) if f is not None else dict(size=n_out)
        if mode == "bicubic":  # 2-D only: the other axis 1 -> 1, where bicubic is the identity
            kw1 = dict(scale_factor=(f, 1.0)) if f is not None else dict(size=(n_out, 1))
            out = F.interpolate(eye.unsqueeze(-1), mode=mode, align_corners=ac, **kw1)[..., 0]
        else:
            if _LINEAR[mode] == "linear":
                kw1["align_corners"] = ac
            out = F.interpolate(eye, mode=_LINEAR[mode], **kw1)
        mats.append(out[0].T.contiguous())
    signed = mode == "bicubic" and any(bool((m < 0).any()) for m in mats)  # not at an identity size
    return MatrixPoolAffine(mats, list(range(2, len(x_shape))), x_shape, out_shape, n_slots=len(ctx.inputs),
                            signed=signed)


# --------------------------------------------------------------------------------------------
# max reductions


def _max_args(ctx: NodeContext):
    """(dims, keepdim) of an ``amax`` / ``max(dim)`` node."""
    a, kw = list(ctx.args) + [None] * 3, ctx.kwargs
    if len(ctx.input_shapes) > 1 or isinstance(a[1], Tensor) or "other" in kw:
        raise NotImplementedError(f"{ctx.describe()}: an element-wise maximum of two tensors has no rule; "
                                  "register one, or write it as a max over a stacked dim")
    return _reduced_dims(ctx, _arg(a, kw, 1, "dim", None)), bool(_arg(a, kw, 2, "keepdim", False))


def winner_mask(x: Tensor, dims: Sequence[int]) -> Tensor:
    """One-hot over each reduced group of ``x``: 1 at the first maximum of the group."""
    rest = [d for d in range(x.dim()) if d not in dims]
    moved = x.permute(rest + list(dims))
    flat = moved.reshape(tuple(moved.shape[:len(rest)]) + (-1,))
    mask = torch.zeros_like(flat).scatter_(-1, flat.argmax(-1, keepdim=True), 1.0)
    inv = [0] * x.dim()
    for i, d in enumerate(rest + list(dims)):
        inv[d] = i
    return mask.reshape(moved.shape).permute(inv)


def _spread(r: Tensor, x_shape, dims, keepdim) -> Tensor:
    """A reduced ``(K, *out)`` relevance broadcast back over the reduced dims."""
    if not keepdim:
        for d in dims:
            r = r.unsqueeze(d + 1)
    return r


def _values(r):
    """``max(dim)`` returns (values, indices): relevance arrives for the values only."""
    return r[0] if isinstance(r, (list, tuple)) else r


class AbsMaxReduce(AbsLRP):
    """absLRP for ``amax`` / ``max`` over feature dims (see the module doc)."""

    kind = "abslrp.max-reduce"
    saves = frozenset({"inputs", "output"})

    def denominator(self, ctx):
        return _values(ctx.output).abs() + 1e-9

    def __call__(self, ctx, relevance):
        return super().__call__(ctx, _values(relevance))

    def contributions(self, ctx, s):
        x = ctx.inputs[0]
        dims, keep = _max_args(ctx)
        h = _spread(_values(ctx.output).unsqueeze(0), x.shape, dims, keep)[0]
        s = _spread(s, x.shape, dims, keep)
        if self.variant == "paper":
            r = x * winner_mask(x, dims) * (1 + torch.sign(h)) * s
        else:
            r = (x * winner_mask(x, dims) + x.abs() * winner_mask(x.abs(), dims)) * s
        out: List[Optional[Tensor]] = [None] * len(ctx.inputs)
        out[0] = r
        return out


class MaxReduceWinner(Rule):
    """Classic presets: each group's relevance goes to its maximum."""

    saves = frozenset({"inputs"})

    @property
    def name(self) -> str:
        return "winner-takes-all"

    def __call__(self, ctx, relevance):
        x = ctx.inputs[0]
        dims, keep = _max_args(ctx)
        out: List[Optional[Tensor]] = [None] * len(ctx.inputs)
        out[0] = winner_mask(x, dims) * _spread(_values(relevance), x.shape, dims, keep)
        return out


# --------------------------------------------------------------------------------------------
# L2 norms


def _norm_args(ctx: NodeContext):
    """(dims, keepdim) of ``x.norm(p=2, dim)`` / ``torch.norm``; other orders are refused."""
    a, kw = list(ctx.args) + [None] * 4, ctx.kwargs
    p = kw.get("ord", _arg(a, kw, 1, "p", "fro"))  # linalg.vector_norm names it ord
    if p not in (2, 2.0, "fro"):
        raise NotImplementedError(f"{ctx.describe()}: only the L2 norm has a rule (p={p!r})")
    return _reduced_dims(ctx, _arg(a, kw, 2, "dim", None)), bool(_arg(a, kw, 3, "keepdim", False))


def norm_shares(ctx: NodeContext) -> Tensor:
    """``x_i^2 / h``: the L2 norm ``h = sum_i x_i (x_i / h)`` written as a sum of non-negative
    contributions (the z-rule's ``z_i``), shaped like ``x``."""
    x = ctx.inputs[0]
    dims, keep = _norm_args(ctx)
    h = _spread(ctx.output.unsqueeze(0), x.shape, dims, keep)[0]
    return x * x / torch.where(h > 0, h, torch.ones_like(h))


class AbsNorm(AbsLRP):
    """absLRP for the L2 norm over feature dims: the twin ``||x||`` equals ``h``, so
    ``r_i = 2 x_i^2 / h * S`` (non-negative weights, both variants)."""

    kind = "abslrp.norm"

    def contributions(self, ctx, s):
        x = ctx.inputs[0]
        dims, keep = _norm_args(ctx)
        out: List[Optional[Tensor]] = [None] * len(ctx.inputs)
        out[0] = 2 * norm_shares(ctx) * _spread(s, x.shape, dims, keep)
        return out


class NormEpsilon(EpsilonRule):
    """Classic presets: the epsilon z-rule with ``z_i = x_i^2 / h``."""

    op_name = "norm-epsilon"

    def __call__(self, ctx, relevance):
        x = ctx.inputs[0]
        dims, keep = _norm_args(ctx)
        h = ctx.output
        s = relevance / (h + self.epsilon)  # h >= 0
        out: List[Optional[Tensor]] = [None] * len(ctx.inputs)
        out[0] = norm_shares(ctx) * _spread(s, x.shape, dims, keep)
        return out


# --------------------------------------------------------------------------------------------
# tables

SUMS = (torch.sum, "sum")
RESAMPLES = (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, F.interpolate, F.upsample)
MAX_REDUCTIONS = (torch.amax, "amax", torch.max, "max")
NORMS = (torch.norm, "norm", torch.linalg.vector_norm)

FOLDS = (F.fold, nn.Fold)

register_affine(SUMS, sum_affine)
register_affine(FOLDS, fold_affine)
register_affine(RESAMPLES, interpolate_affine)


def _abs_table(variant: str):
    def table() -> dict:
        affine, mx, norm = AbsAffine(variant), AbsMaxReduce(variant), AbsNorm(variant)
        return {**{k: affine for k in SUMS + RESAMPLES + FOLDS}, **{k: mx for k in MAX_REDUCTIONS},
                **{k: norm for k in NORMS}}
    return table


def _classic_table() -> dict:
    eps, wta, norm = Epsilon(1e-6), MaxReduceWinner(), NormEpsilon(1e-6)
    return {**{k: eps for k in SUMS + RESAMPLES + FOLDS}, **{k: wta for k in MAX_REDUCTIONS}, **{k: norm for k in NORMS}}


extend_preset("*", _classic_table)
extend_preset("abslrp", _abs_table("paper"))
extend_preset("abslrp-renorm", _abs_table("head"))
