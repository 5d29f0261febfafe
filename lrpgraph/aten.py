"""ATen ops of a ``torch.export`` graph lifted to the torch-level calls that the rule tables key on.

``torch.export`` records a model as ATen operator overloads (``aten.linear.default``,
``aten.view.default``, ``aten.slice.Tensor``, ...). The rules of every preset are keyed on the
torch-level forms that ``torch.fx`` records (``F.linear``, ``Tensor.view``, ``operator.getitem``),
so each ATen op family gets one *argument adapter* here that rewrites the node into its torch-level
twin with the same arguments in that function's order: ``aten.embedding(weight, ids)`` becomes
``F.embedding(ids, weight)``, ``aten.select(x, 1, 0)`` becomes ``x[:, 0]``, ``aten.batch_norm``
becomes ``F.batch_norm``. The lifted node computes exactly what the ATen op computed, and every
rule, graph pass (explicit attention, additions) and user rule of the ``fx`` path then serves the
export path too, so an op has one rule whichever tracer found it.

An op without an adapter keeps its ATen target; a rule may be registered for it by overload
(``torch.ops.aten.roll.default``) or by packet (``torch.ops.aten.roll``).
"""
from __future__ import annotations

import operator
import sys
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx

aten = torch.ops.aten

#: (op, target, args, kwargs) of the lifted node; op is ``call_function`` or ``call_method``
Lifted = Tuple[str, Any, tuple, dict]
Adapter = Callable[[tuple, dict, Callable[[int], int]], Lifted]

#: ops whose ATen form returns a tuple of which the graph uses element 0 only (the others are
#: saved statistics or indices); the lifted node returns that element itself
FIRST_OF_TUPLE = set()


def _get(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[i] if i < len(args) else default


def _fn(target: Callable, names: Tuple[str, ...] = (), keep_kwargs: Tuple[str, ...] = ()) -> Adapter:
    """Same positional arguments (the first ``len(names)``, or all), selected kwargs kept."""
    def adapt(args, kwargs, rank):
        a = tuple(_get(args, kwargs, i, n) for i, n in enumerate(names)) if names else tuple(args)
        while names and a and a[-1] is None:  # trailing defaults
            a = a[:-1]
        return "call_function", target, a, {k: v for k, v in kwargs.items() if k in keep_kwargs}
    return adapt


def _method(name: str, n_args: int = 99) -> Adapter:
    def adapt(args, kwargs, rank):
        return "call_method", name, tuple(args[:n_args]), {}
    return adapt


def _index_key(dim: int, entry: Any, rank: int) -> tuple:
    """The ``x[key]`` key that applies ``entry`` along ``dim`` of a rank-``rank`` tensor."""
    dim = dim % rank if rank else dim
    return (slice(None),) * dim + (entry,)


def _select(args, kwargs, rank):
    x, dim, idx = args[0], _get(args, kwargs, 1, "dim"), _get(args, kwargs, 2, "index")
    return "call_function", operator.getitem, (x, _index_key(dim, idx, rank(0))), {}


def _slice(args, kwargs, rank):
    x = args[0]
    dim = _get(args, kwargs, 1, "dim", 0)
    start = _get(args, kwargs, 2, "start")
    end = _get(args, kwargs, 3, "end")
    step = _get(args, kwargs, 4, "step", 1)
    if isinstance(end, int) and end >= sys.maxsize:
        end = None
    if start == 0:
        start = None
    if start is None and end is None and step == 1:  # keeps every entry: moves no data (as fx's x[:, 0])
        return "call_method", "contiguous", (x,), {}
    sl = slice(start, end, None if step == 1 else step)
    return "call_function", operator.getitem, (x, _index_key(dim, sl, rank(0))), {}


def _index(args, kwargs, rank):
    x, idx = args[0], _get(args, kwargs, 1, "indices")
    key = tuple(slice(None) if i is None else i for i in idx)
    return "call_function", operator.getitem, (x, key), {}


def _add(target_sym):
    def adapt(args, kwargs, rank):
        alpha = _get(args, kwargs, 2, "alpha", 1)
        if alpha != 1:
            return "call_function", (torch.add if target_sym is operator.add else torch.sub), \
                tuple(args[:2]), {"alpha": alpha}
        return "call_function", target_sym, tuple(args[:2]), {}
    return adapt


def _rsub(args, kwargs, rank):
    alpha = _get(args, kwargs, 2, "alpha", 1)
    if alpha != 1:
        return "call_function", torch.sub, (args[1], args[0]), {"alpha": alpha}
    return "call_function", operator.sub, (args[1], args[0]), {}


def _div(args, kwargs, rank):
    mode = kwargs.get("rounding_mode")
    if mode is not None:
        return "call_function", torch.div, tuple(args[:2]), {"rounding_mode": mode}
    return "call_function", operator.truediv, tuple(args[:2]), {}


def _gelu(args, kwargs, rank):
    approx = _get(args, kwargs, 1, "approximate", "none")
    return "call_function", F.gelu, (args[0],), ({} if approx == "none" else {"approximate": approx})


def _convolution(args, kwargs, rank):
    x, w, b, stride, pad, dil, transposed, out_pad, groups = args[:9]
    if transposed:
        fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[len(stride)]
        return "call_function", fn, (x, w, b, stride, pad, out_pad, groups, dil), {}
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(stride)]
    return "call_function", fn, (x, w, b, stride, pad, dil, groups), {}


def _batch_norm(args, kwargs, rank):  # aten.batch_norm(x, w, b, mean, var, training, momentum, eps, cudnn)
    x, w, b, mean, var, training, momentum, eps = args[:8]
    return "call_function", F.batch_norm, (x, mean, var, w, b, training, momentum, eps), {}


def _bn_no_training(args, kwargs, rank):  # (x, w, b, mean, var, momentum, eps) -> (out, _, _)
    x, w, b, mean, var, momentum, eps = args[:7]
    return "call_function", F.batch_norm, (x, mean, var, w, b, False, momentum, eps), {}


def _layer_norm(args, kwargs, rank):
    x, shape = args[0], args[1]
    w, b = _get(args, kwargs, 2, "weight"), _get(args, kwargs, 3, "bias")
    eps = _get(args, kwargs, 4, "eps", 1e-5)
    return "call_function", F.layer_norm, (x, shape, w, b, eps), {}


def _rms_norm(args, kwargs, rank):  # aten.rms_norm(x, normalized_shape, weight=None, eps=None)
    w, eps = _get(args, kwargs, 2, "weight"), _get(args, kwargs, 3, "eps")
    return "call_function", F.rms_norm, (args[0], args[1], w, eps), {}


def _embedding(args, kwargs, rank):  # aten.embedding(weight, ids, padding_idx=-1, ...)
    w, ids = args[0], args[1]
    pad = _get(args, kwargs, 2, "padding_idx", -1)
    return "call_function", F.embedding, (ids, w), ({} if pad == -1 else {"padding_idx": pad})


def _sdpa(args, kwargs, rank):
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    a = [_get(args, kwargs, i, n) for i, n in enumerate(names)]
    kw = {k: kwargs[k] for k in ("scale", "enable_gqa") if k in kwargs}
    a[4] = a[4] or 0.0
    a[5] = bool(a[5])
    return "call_function", F.scaled_dot_product_attention, tuple(a), kw


def _softmax(args, kwargs, rank):
    return "call_function", torch.softmax, (args[0], _get(args, kwargs, 1, "dim")), {}


def _pool(fn, n_fixed: int):
    """avg/max pool: aten's empty ``stride`` list means "the kernel size" (``None`` in F)."""
    def adapt(args, kwargs, rank):
        a = list(args)
        if len(a) > 2 and not a[2]:
            a[2] = None
        return "call_function", fn, tuple(a[:n_fixed]), {}
    return adapt


def _einsum(args, kwargs, rank):
    return "call_function", torch.einsum, (args[0], *args[1]), {}


def _to(args, kwargs, rank):
    # the dtype wherever the overload puts it: to.dtype (x, dtype), to.device (x, device, dtype),
    # to.other (x, other tensor), _to_copy / to.dtype_layout (dtype=...)
    dtype = kwargs.get("dtype")
    for a in args[1:]:
        if dtype is None and isinstance(a, torch.dtype):
            dtype = a
        elif dtype is None and isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor):
            dtype = a.meta["val"].dtype
    return "call_method", "to", (args[0],) + ((dtype,) if dtype is not None else ()), {}


def _interpolate(mode: str, has_align: bool):
    def adapt(args, kwargs, rank):  # upsample_*.vec(x, output_size, [align_corners,] scale_factors)
        x, size = args[0], _get(args, kwargs, 1, "output_size")
        align = _get(args, kwargs, 2, "align_corners") if has_align else None
        scales = _get(args, kwargs, 3 if has_align else 2, "scale_factors")
        kw: Dict[str, Any] = {"mode": mode}
        if has_align:
            kw["align_corners"] = align
        kw["size" if size is not None else "scale_factor"] = size if size is not None else scales
        return "call_function", F.interpolate, (x,), kw
    return adapt


def _pad(args, kwargs, rank):
    mode = _get(args, kwargs, 2, "mode", "constant")
    value = _get(args, kwargs, 3, "value")
    return "call_function", F.pad, (args[0], args[1], mode, value), {}


def _constant_pad(args, kwargs, rank):
    return "call_function", F.pad, (args[0], args[1], "constant", _get(args, kwargs, 2, "value", 0)), {}


def _bool_mask(fn):
    return lambda args, kwargs, rank: ("call_function", fn, tuple(args), {})


def _table() -> Dict[Any, Adapter]:
    t: Dict[Any, Adapter] = {
        aten.linear: _fn(F.linear), aten.conv1d: _fn(F.conv1d), aten.conv2d: _fn(F.conv2d),
        aten.conv3d: _fn(F.conv3d), aten.convolution: _convolution,
        aten.batch_norm: _batch_norm, aten._native_batch_norm_legit_no_training: _bn_no_training,
        aten.layer_norm: _layer_norm, aten.rms_norm: _rms_norm, aten.embedding: _embedding,
        aten.group_norm: _fn(F.group_norm, ("input", "num_groups", "weight", "bias", "eps")),
        aten.scaled_dot_product_attention: _sdpa,
        aten.matmul: _fn(torch.matmul), aten.mm: _fn(torch.matmul), aten.bmm: _fn(torch.bmm),
        aten.einsum: _einsum,
        aten.softmax: _softmax, aten._softmax: _softmax,
        aten.add: _add(operator.add), aten.add_: _add(operator.add),
        aten.sub: _add(operator.sub), aten.sub_: _add(operator.sub), aten.rsub: _rsub,
        aten.mul: _fn(operator.mul), aten.mul_: _fn(operator.mul),
        aten.div: _div, aten.div_: _div, aten.neg: _fn(operator.neg),
        aten.gelu: _gelu, aten.gelu_: _gelu,
        aten.leaky_relu: _fn(F.leaky_relu), aten.leaky_relu_: _fn(F.leaky_relu),
        aten.hardtanh: _fn(F.hardtanh), aten.hardtanh_: _fn(F.hardtanh),
        aten.clamp: _fn(torch.clamp, (), ("min", "max")), aten.clamp_min: _fn(torch.clamp_min),
        aten.clamp_max: _fn(torch.clamp_max),
        # view as reshape: the strides may differ once attention is made explicit
        aten.view: _method("reshape"), aten._unsafe_view: _method("reshape"), aten.reshape: _method("reshape"),
        aten.permute: _method("permute"), aten.transpose: _method("transpose", 3), aten.t: _fn(torch.t),
        aten.expand: _method("expand", 2), aten.contiguous: _method("contiguous", 1),
        aten.clone: _method("clone", 1), aten.alias: _method("clone", 1), aten.detach: _method("clone", 1),
        aten.unsqueeze: _fn(torch.unsqueeze), aten.squeeze: _fn(torch.squeeze),
        aten.flatten: _fn(torch.flatten), aten.unflatten: _fn(torch.unflatten),
        aten.select: _select, aten.slice: _slice, aten.index: _index,
        aten.unbind: _fn(torch.unbind), aten.split: _fn(torch.split), aten.split_with_sizes: _fn(torch.split),
        aten.chunk: _fn(torch.chunk), aten.cat: _fn(torch.cat), aten.stack: _fn(torch.stack),
        aten.mean: _fn(torch.mean), aten.sum: _fn(torch.sum, (), ("dtype",)), aten.amax: _fn(torch.amax),
        aten.adaptive_avg_pool1d: _fn(F.adaptive_avg_pool1d), aten.adaptive_avg_pool2d: _fn(F.adaptive_avg_pool2d),
        aten._adaptive_avg_pool2d: _fn(F.adaptive_avg_pool2d), aten.adaptive_avg_pool3d: _fn(F.adaptive_avg_pool3d),
        aten.avg_pool1d: _pool(F.avg_pool1d, 6), aten.avg_pool2d: _pool(F.avg_pool2d, 7),
        aten.avg_pool3d: _pool(F.avg_pool3d, 7),
        aten.max_pool1d: _pool(F.max_pool1d, 6), aten.max_pool2d: _pool(F.max_pool2d, 6),
        aten.max_pool3d: _pool(F.max_pool3d, 6), aten.max_pool2d_with_indices: _pool(F.max_pool2d, 6),
        aten.max_pool3d_with_indices: _pool(F.max_pool3d, 6),
        aten.masked_fill: _bool_mask(torch.masked_fill), aten.masked_fill_: _bool_mask(torch.masked_fill),
        aten.sym_size: _method("size", 2),
        aten.dropout: _fn(F.dropout), aten.pad: _pad, aten.constant_pad_nd: _constant_pad,
        aten.roll: _fn(torch.roll), aten.type_as: _method("type_as", 2),
        aten._to_copy: _to, aten.to: _to,
        aten.upsample_nearest2d: _interpolate("nearest", False),
        aten.upsample_bilinear2d: _interpolate("bilinear", True),
        aten.conv_transpose1d: _fn(F.conv_transpose1d), aten.conv_transpose2d: _fn(F.conv_transpose2d),
        aten.conv_transpose3d: _fn(F.conv_transpose3d),
        aten.col2im: _fn(F.fold), aten.im2col: _fn(F.unfold),  # same argument order as F.fold / F.unfold
        aten.pow: _fn(operator.pow), aten.rsqrt: _fn(torch.rsqrt), aten.sqrt: _fn(torch.sqrt),
        aten.reciprocal: _fn(torch.reciprocal),
        aten.upsample_bicubic2d: _interpolate("bicubic", True),
    }
    for name, fn in (("relu", torch.relu), ("silu", F.silu), ("sigmoid", torch.sigmoid),
                     ("tanh", torch.tanh), ("hardswish", F.hardswish), ("hardsigmoid", F.hardsigmoid),
                     ("mish", F.mish), ("softplus", F.softplus), ("relu6", F.relu6)):
        for suffix in ("", "_"):
            packet = getattr(aten, name + suffix, None)
            if packet is not None:
                t[packet] = _fn(fn)
    return t


ADAPTERS: Dict[Any, Adapter] = _table()
FIRST_OF_TUPLE.update({aten._native_batch_norm_legit_no_training, aten.max_pool2d_with_indices,
                       aten.max_pool3d_with_indices})


def packet_of(target: Any) -> Any:
    """The ``OpOverloadPacket`` of an ATen overload (``aten.add.Tensor`` -> ``aten.add``), else ``None``."""
    return getattr(target, "overloadpacket", None) if isinstance(target, torch._ops.OpOverload) else None


def lift(node: fx.Node, args: tuple, kwargs: dict, rank: Callable[[int], int]) -> Optional[Lifted]:
    """The torch-level form of ATen ``node`` with (already mapped) ``args``/``kwargs``, or ``None``
    when the op has no adapter (it then keeps its ATen target). ``rank(i)`` is the rank of the
    tensor in argument ``i`` (negative dims are resolved with it)."""
    packet = packet_of(node.target)
    adapter = ADAPTERS.get(packet) if packet is not None else None
    return None if adapter is None else adapter(tuple(args), dict(kwargs), rank)


def short_name(target: Any) -> str:
    """A short op name for node names: ``aten.matmul.default`` -> ``matmul``."""
    packet = packet_of(target)
    if packet is not None:
        return packet.__name__.split(".")[-1].strip("_") or "op"
    return getattr(target, "__name__", "op").strip("_") or "op"
