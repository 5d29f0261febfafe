"""Affine ops described for relevance rules: a forward with chosen weights and its transpose.

Every rule for a weighted layer needs two things: the layer's forward evaluated with modified
weights (``z = f(x; W', b')``), and the transposed product ``W'^T s`` that routes a per-output
quantity ``s`` back to the inputs. An :class:`Affine` gives both, written explicitly (matmul,
``torch.nn.grad.conv*_input`` which is the transposed convolution, a pooling matrix), so that
every rule family (absLRP, epsilon, gamma, alpha-beta, flat, w-square, z-box) is one formula over
an :class:`Affine`, shared by Linear, Conv1d/2d/3d, BatchNorm, average pooling and means.

``s`` and the returned products carry the leading relevance axis K: ``(K, B, ...)``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrpgraph.rule import NodeContext, flat_k, unflat_k


class Affine:
    """``z = fwd(x, W, b)`` and its transpose ``T(s, W)``.

    Attributes:
        weight: the op's weight tensor (a fixed kernel for pools), or ``None`` for ops without.
        bias: the bias (``None`` if absent).
        slot: index of the activation input among the node's slots.
        n_slots: number of slots of the node (weights passed functionally are slots too).
    """

    weight: Optional[Tensor] = None
    bias: Optional[Tensor] = None
    slot: int = 0
    n_slots: int = 1
    #: a weight-free op (``weight`` is ``None``) whose implicit weight has negative entries
    #: (bicubic resampling); ``False``: its implicit weight is non-negative (pooling)
    signed: bool = False
    #: whether a rule should scan the weight for ``W >= 0`` (a faster form for pooling kernels).
    #: ``False`` for learned weights: they are signed in practice, the scan costs a pass over the
    #: weight per call, and the general form gives the same numbers where ``W >= 0`` anyway
    scan_weight_sign: bool = True

    def forward(self, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
        raise NotImplementedError

    def transpose(self, s: Tensor, weight: Optional[Tensor]) -> Tensor:
        """``W^T s`` for ``s`` shaped ``(K, B, *out)``; returns ``(K, B, *in)``."""
        raise NotImplementedError

    def place(self, r: Tensor) -> list:
        """Put the relevance of the activation into the node's slot list."""
        out: list = [None] * self.n_slots
        out[self.slot] = r
        return out


class LinearAffine(Affine):
    scan_weight_sign = False

    def __init__(self, weight: Tensor, bias: Optional[Tensor], n_slots: int = 1):
        self.weight, self.bias, self.n_slots = weight, bias, n_slots

    def forward(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def transpose(self, s, weight):
        return s @ weight


_CONV_INPUT = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input,
               3: torch.nn.grad.conv3d_input}
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class ConvAffine(Affine):
    scan_weight_sign = False

    def __init__(self, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups,
                 in_shape: Sequence[int], n_slots: int = 1, where: str = ""):
        self.weight, self.bias, self.n_slots = weight, bias, n_slots
        self.nd = weight.dim() - 2
        if isinstance(padding, str):
            padding = _str_padding(padding, weight.shape[2:], dilation, where)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.in_shape = tuple(in_shape)

    def forward(self, x, weight, bias):
        k = x.shape[0] if x.dim() == len(self.in_shape) + 1 else None
        xx = flat_k(x) if k is not None else x
        z = _CONV[self.nd](xx, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return unflat_k(z, k) if k is not None else z

    def _patchify(self, weight: Tensor) -> bool:
        """Non-overlapping 2-D patches (stride = kernel, no padding or dilation, one group): the
        transposed convolution is then one matmul per patch, much faster than the generic
        backward-data kernel on CPU (a ViT patch embedding)."""
        ker = tuple(weight.shape[2:])
        return (self.nd == 2 and self.groups == 1 and _tuple(self.stride, 2) == ker
                and _tuple(self.padding, 2) == (0, 0) and _tuple(self.dilation, 2) == (1, 1))

    def transpose(self, s, weight):
        k = s.shape[0]
        flat = flat_k(s)
        if self._patchify(weight):
            n, co, o1, o2 = flat.shape
            ci, k1, k2 = weight.shape[1:]
            cols = flat.reshape(n, co, o1 * o2).transpose(1, 2) @ weight.reshape(co, ci * k1 * k2)
            r = cols.reshape(n, o1, o2, ci, k1, k2).permute(0, 3, 1, 4, 2, 5).reshape(n, ci, o1 * k1, o2 * k2)
            h, w = self.in_shape[2:]
            if (h, w) != (o1 * k1, o2 * k2):  # rows/cols the patches did not cover get nothing
                r = F.pad(r, (0, w - o2 * k2, 0, h - o1 * k1))
            return unflat_k(r, k)
        size = (flat.shape[0],) + self.in_shape[1:]
        r = _CONV_INPUT[self.nd](size, weight, flat, self.stride, self.padding, self.dilation, self.groups)
        return unflat_k(r, k)


_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class ConvTransposeAffine(Affine):
    """Transposed convolution (``ConvTranspose1d/2d/3d``, ``F.conv_transpose*d``): its forward is the
    op itself, its transpose ``W^T s`` is the ordinary convolution with the same weight (the
    adjoint of a transposed convolution), which gives back the input's size exactly because
    ``output_padding`` is smaller than the stride. The output padding is read off the recorded
    output shape, so a module called with ``output_size=`` is described as it ran."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor], stride, padding, groups, dilation,
                 in_shape: Sequence[int], out_shape: Sequence[int], n_slots: int = 1):
        self.weight, self.bias, self.n_slots = weight, bias, n_slots
        self.nd = nd = weight.dim() - 2
        self.stride, self.padding = _tuple(stride, nd), _tuple(padding, nd)
        self.groups, self.dilation, self.in_shape = groups, _tuple(dilation, nd), tuple(in_shape)
        # the output padding as recorded (a module called with output_size= chooses it per call)
        self.output_padding = tuple(
            o - ((i - 1) * st - 2 * p + d * (k - 1) + 1) for o, i, st, p, d, k in
            zip(tuple(out_shape)[2:], self.in_shape[2:], self.stride, self.padding, self.dilation, weight.shape[2:]))

    def forward(self, x, weight, bias):
        k = x.shape[0] if x.dim() == len(self.in_shape) + 1 else None
        z = _CONV_T[self.nd](flat_k(x) if k is not None else x, weight, bias, self.stride, self.padding,
                             self.output_padding, self.groups, self.dilation)
        return unflat_k(z, k) if k is not None else z

    def transpose(self, s, weight):
        r = _CONV[self.nd](flat_k(s), weight, None, self.stride, self.padding, self.dilation, self.groups)
        return unflat_k(r, s.shape[0])


class ScaleAffine(Affine):
    """Per-channel affine ``z = x * w + b`` (BatchNorm in eval mode), channel dim 1 of x."""

    def __init__(self, weight: Tensor, bias: Tensor, x_dim: int, n_slots: int = 1):
        shape = (1, -1) + (1,) * (x_dim - 2)
        self.weight, self.bias, self.n_slots = weight.reshape(shape), bias.reshape(shape), n_slots

    def forward(self, x, weight, bias):
        return x * weight + (0 if bias is None else bias)

    def transpose(self, s, weight):
        return s * weight


class PoolAffine(Affine):
    """Average pooling as a depthwise convolution with a constant kernel ``1/(kh*kw)``."""

    def __init__(self, channels: int, kernel, stride, padding, in_shape, dtype, device, n_slots=1):
        nd = len(in_shape) - 2
        kernel = _tuple(kernel, nd)
        w = torch.full((channels, 1) + kernel, 1.0 / float(torch.tensor(kernel).prod()),
                       dtype=dtype, device=device)
        self.conv = ConvAffine(w, None, _tuple(stride, nd), _tuple(padding, nd), 1, channels, in_shape)
        self.weight, self.bias, self.n_slots = w, None, n_slots

    def forward(self, x, weight, bias):
        return self.conv.forward(x, weight, bias)

    def transpose(self, s, weight):
        return self.conv.transpose(s, weight)


class MatrixPoolAffine(Affine):
    """Adaptive average pooling, means, sums, resampling: ``z = x contracted with per-axis matrices``.

    ``mats[d]`` is ``(out_d, in_d)`` for each trailing axis it acts on; the op's weight is their
    Kronecker product, never built (``weight`` is ``None``: rules pass ``None`` for the matrices).
    Pooling matrices are non-negative, so the classic sign-split rules reduce to the z-rule here.
    Bicubic resampling's are ``signed`` (negative lobes): ``|A (x) B| = |A| (x) |B|`` is separable
    again (:meth:`absolute`), but ``(A (x) B)+`` is not, so rules that need ``W+`` refuse them.
    """

    def __init__(self, mats: Sequence[Tensor], axes: Sequence[int], in_shape, out_shape, n_slots=1,
                 signed: bool = False):
        self.mats, self.axes = list(mats), list(axes)
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.weight, self.bias, self.n_slots = None, None, n_slots
        self.signed = signed

    def absolute(self) -> "MatrixPoolAffine":
        """The same op with ``|mats|``: its weight is the absolute value of this op's weight."""
        return MatrixPoolAffine([m.abs() for m in self.mats], self.axes, self.in_shape, self.out_shape, self.n_slots)

    def forward(self, x, weight, bias):
        k = x.dim() - len(self.in_shape)  # 1 if x has a leading K axis
        z = x
        for m, ax in zip(self.mats, self.axes):
            z = torch.movedim(torch.movedim(z, ax + k, -1) @ m.T, -1, ax + k)
        return z.reshape(x.shape[:k] + self.out_shape)

    def transpose(self, s, weight):
        k = s.shape[0]
        pooled = list(self.in_shape)
        for m, ax in zip(self.mats, self.axes):
            pooled[ax] = m.shape[0]
        r = s.reshape((k,) + tuple(pooled))
        for m, ax in zip(self.mats, self.axes):
            r = torch.movedim(torch.movedim(r, ax + 1, -1) @ m, -1, ax + 1)
        return r


def _str_padding(padding: str, kernel, dilation, where: str):
    """``'valid'`` is 0; ``'same'`` (stride 1) pads ``dilation * (k - 1) / 2`` on each side, which
    is symmetric for odd kernels (even kernels pad one more on the right: refused)."""
    if padding == "valid":
        return 0
    total = [d * (k - 1) for d, k in zip(_tuple(dilation, len(kernel)), kernel)]
    if padding == "same" and all(t % 2 == 0 for t in total):
        return tuple(t // 2 for t in total)
    raise NotImplementedError(f"padding={padding!r} at {where}: only numeric, 'valid' and 'same' with "
                              "odd kernels are supported; give the conv explicit integer padding")


def _tuple(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def adaptive_matrix(n_in: int, n_out: int, dtype, device) -> Tensor:
    """The ``(n_out, n_in)`` matrix of adaptive average pooling along one axis (PyTorch's windows:
    start = floor(i*n_in/n_out), end = ceil((i+1)*n_in/n_out))."""
    m = torch.zeros(n_out, n_in, dtype=dtype, device=device)
    for i in range(n_out):
        a = (i * n_in) // n_out
        b = -((-(i + 1) * n_in) // n_out)
        m[i, a:b] = 1.0 / (b - a)
    return m


#: further affine ops described by the op-family modules (pooling, normalization): key -> describer
_DESCRIBERS: dict = {}


def register_affine(keys, describe) -> None:
    """Let :func:`affine_of` describe the ops ``keys`` (module types, functions, method names) with
    ``describe(ctx) -> Affine``, so that every affine rule family serves them."""
    for k in keys:
        _DESCRIBERS[k] = describe


def affine_of(ctx: NodeContext) -> Affine:
    """Describe the affine op of a node (module or functional form) for the rules.

    Raises ``NotImplementedError`` naming the node for configurations the rules do not cover.
    """
    m = ctx.module
    key = type(m) if m is not None else ctx.target
    if _DESCRIBERS and key in _DESCRIBERS:
        return _DESCRIBERS[key](ctx)
    n = len(ctx.inputs)
    x_shape = ctx.input_shapes[0]
    where = ctx.describe()
    if m is not None:
        from lrpgraph.canonize import ConvBN, LinearBN
        if isinstance(m, LinearBN):
            return LinearAffine(m.weight, m.bias)
        if isinstance(m, ConvBN):
            return ConvAffine(m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups, x_shape, where=where)
        if isinstance(m, nn.Linear):
            return LinearAffine(m.weight, m.bias)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if m.padding_mode != "zeros":
                raise NotImplementedError(f"padding_mode={m.padding_mode!r} at {where}: only zero "
                                          "padding is supported by the weighted-layer rules")
            return ConvAffine(m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups, x_shape, where=where)
        if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            if m.padding_mode != "zeros":
                raise NotImplementedError(f"padding_mode={m.padding_mode!r} at {where}: only zero "
                                          "padding is supported by the weighted-layer rules")
            return ConvTransposeAffine(m.weight, m.bias, m.stride, m.padding, m.groups, m.dilation, x_shape,
                                       ctx.output_shape)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return _bn_affine(m, len(x_shape), where)
        if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
            return _avgpool_affine(ctx, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                   m.count_include_pad, getattr(m, "divisor_override", None))
        if isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
            return _adaptive_affine(ctx, m.output_size)
        raise NotImplementedError(f"no affine description for {where}")
    t = ctx.target
    a = list(ctx.args) + [None] * 8
    kw = ctx.kwargs
    if t is F.linear:
        return LinearAffine(_arg(a, kw, 1, "weight"), _arg(a, kw, 2, "bias"), n_slots=n)
    if t in (F.conv1d, F.conv2d, F.conv3d):
        return ConvAffine(_arg(a, kw, 1, "weight"), _arg(a, kw, 2, "bias"),
                          _arg(a, kw, 3, "stride", 1), _arg(a, kw, 4, "padding", 0),
                          _arg(a, kw, 5, "dilation", 1), _arg(a, kw, 6, "groups", 1), x_shape,
                          n_slots=n, where=where)
    if t in _CONV_T.values():
        return ConvTransposeAffine(_arg(a, kw, 1, "weight"), _arg(a, kw, 2, "bias"), _arg(a, kw, 3, "stride", 1),
                                   _arg(a, kw, 4, "padding", 0), _arg(a, kw, 6, "groups", 1),
                                   _arg(a, kw, 7, "dilation", 1), x_shape, ctx.output_shape, n_slots=n)
    if t in (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d):
        ks = _arg(a, kw, 1, "kernel_size")
        return _avgpool_affine(ctx, ks, _arg(a, kw, 2, "stride", None) or ks, _arg(a, kw, 3, "padding", 0),
                               _arg(a, kw, 4, "ceil_mode", False), _arg(a, kw, 5, "count_include_pad", True),
                               _arg(a, kw, 6, "divisor_override", None))
    if t in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d):
        return _adaptive_affine(ctx, _arg(a, kw, 1, "output_size"))
    if t in (torch.mean, "mean"):
        return _mean_affine(ctx, _arg(a, kw, 1, "dim", None), _arg(a, kw, 2, "keepdim", False))
    raise NotImplementedError(f"no affine description for {where}")


def _arg(a, kw, i, name, default=None):
    if name in kw:
        return kw[name]
    v = a[i] if i < len(a) else None
    return default if v is None else v


def _bn_affine(m, x_dim: int, where: str) -> ScaleAffine:
    if m.training:
        raise RuntimeError(f"{where} is in training mode; call model.eval() before explaining")
    if m.running_mean is None or m.running_var is None:
        raise NotImplementedError(f"{where} has track_running_stats=False, so it normalises with "
                                  "batch statistics that mix the samples; LRP needs per-sample "
                                  "maths: use running statistics")
    sigma = torch.sqrt(m.running_var + m.eps)
    gamma = m.weight if m.weight is not None else torch.ones_like(sigma)
    beta = m.bias if m.bias is not None else torch.zeros_like(sigma)
    w = gamma / sigma
    return ScaleAffine(w, beta - w * m.running_mean, x_dim)


def _avgpool_affine(ctx, kernel, stride, padding, ceil_mode, count_include_pad, divisor):
    if ceil_mode or (not count_include_pad and padding not in (0, (0, 0), (0,), (0, 0, 0))) or divisor:
        from .pooling import general_avgpool  # windows with their own divisors: see there
        return general_avgpool(ctx, kernel, stride, padding, ceil_mode, count_include_pad, divisor)
    x_shape = ctx.input_shapes[0]
    ref = ctx.output if isinstance(ctx.output, Tensor) else ctx.inputs[0]
    return PoolAffine(x_shape[1], kernel, stride if stride else kernel, padding, x_shape,
                      ref.dtype, ref.device, n_slots=len(ctx.inputs))


def _adaptive_affine(ctx, output_size):
    x_shape = tuple(ctx.input_shapes[0])
    nd = 1 if isinstance(ctx.module, nn.AdaptiveAvgPool1d) or ctx.target is F.adaptive_avg_pool1d else (
        3 if isinstance(ctx.module, nn.AdaptiveAvgPool3d) or ctx.target is F.adaptive_avg_pool3d else 2)
    out = _tuple(output_size, nd)
    ins = x_shape[-nd:]
    out = tuple(i if o is None else o for o, i in zip(out, ins))
    ref = ctx.output if isinstance(ctx.output, Tensor) else ctx.inputs[0]
    axes = list(range(len(x_shape) - nd, len(x_shape)))
    mats = [adaptive_matrix(i, o, ref.dtype, ref.device) for i, o in zip(ins, out)]
    return MatrixPoolAffine(mats, axes, x_shape, x_shape[:-nd] + out, n_slots=len(ctx.inputs))


def _mean_affine(ctx, dim, keepdim):
    x_shape = tuple(ctx.input_shapes[0])
    nd = len(x_shape)
    if dim is None:
        raise NotImplementedError(f"{ctx.describe()}: a mean over all dims (batch included) mixes "
                                  "samples; take the mean over the feature dims only")
    dims = sorted(d % nd for d in ((dim,) if isinstance(dim, int) else dim))
    if 0 in dims:
        axis = ctx.input_axes[0] if ctx.input_axes else None
        if isinstance(axis, int) and axis > 0:  # a sequence-first layout: dim 0 is not the batch
            raise NotImplementedError(f"{ctx.describe()}: a mean over dim 0 of a value whose batch is on "
                                      f"axis {axis} (a sequence-first layout); the rules take the batch to be "
                                      "the first axis: put the batch first in the model (batch_first=True)")
        raise NotImplementedError(f"{ctx.describe()}: a mean over the batch dim mixes samples")
    ref = ctx.output if isinstance(ctx.output, Tensor) else ctx.inputs[0]
    mats = [torch.full((1, x_shape[d]), 1.0 / x_shape[d], dtype=ref.dtype, device=ref.device) for d in dims]
    out = tuple(1 if d in dims else s for d, s in enumerate(x_shape)) if keepdim else \
        tuple(s for d, s in enumerate(x_shape) if d not in dims)
    return MatrixPoolAffine(mats, dims, x_shape, out, n_slots=len(ctx.inputs))
