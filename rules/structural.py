"""Shape and routing ops: relevance is moved back exactly, never created or lost.

These rules are shared by every preset. They save no activations (only shapes are kept), and
the walker never renormalises them. Each one inverts the data movement of its op on the
relevance tensor, whose extra leading axis K shifts every dim by one.
"""
from __future__ import annotations

import operator
from typing import List, Optional

import torch
from torch import Tensor

from lrpgraph.rule import NodeContext, Rule, Split


class Structural(Rule):
    """Base: saves nothing, exact.

    Two flags tell the absLRP presets how to treat a routing rule (see
    :mod:`lrpgraph.rules.abslrp_routing`): ``moves_data`` (the op re-arranges or selects entries
    of an activation; ``abslrp`` then applies the identity-like absLRP rule around ``route``) and
    ``selects`` (the op drops entries, like indexing; ``abslrp-renorm`` applies it there too).
    A new routing rule that subclasses this class and implements ``route`` follows automatically.
    """

    saves = frozenset()
    exact = True
    moves_data = True
    selects = False

    def route(self, ctx: NodeContext, r):
        raise NotImplementedError

    def __call__(self, ctx: NodeContext, relevance):
        out: List[Optional[object]] = [None] * len(ctx.input_shapes)
        routed = self.route(ctx, relevance)
        if isinstance(routed, dict):
            for i, v in routed.items():
                out[i] = v
        else:
            out[0] = routed
        return out


class PassThrough(Structural):
    """Identity-like ops (Identity, Dropout in eval, contiguous, clone, dtype casts): ``R_x = R``."""

    moves_data = False

    @property
    def name(self) -> str:
        return "pass-through"

    def route(self, ctx, r):
        shape = ctx.input_shapes[0]
        if isinstance(r, Tensor) and tuple(r.shape[1:]) != tuple(shape):
            return r.reshape((r.shape[0],) + tuple(shape))
        return r


class Reshape(Structural):
    """view, reshape, flatten (module, function, method), squeeze, unsqueeze, unflatten."""

    @property
    def name(self) -> str:
        return "reshape"

    def route(self, ctx, r):
        return r.reshape((r.shape[0],) + tuple(ctx.input_shapes[0]))


def _dims(args, kwargs, start: int, key: str = "dims"):
    if key in kwargs:
        d = kwargs[key]
    else:
        d = args[start:]
        if len(d) == 1 and isinstance(d[0], (tuple, list)):
            d = d[0]
    return [int(x) for x in d]


class Permute(Structural):
    """``x.permute(*dims)`` / ``torch.permute(x, dims)``: apply the inverse permutation."""

    @property
    def name(self) -> str:
        return "permute"

    def route(self, ctx, r):
        nd = len(ctx.input_shapes[0])
        dims = [d % nd for d in _dims(ctx.args, ctx.kwargs, 1)]
        inv = [0] * nd
        for i, d in enumerate(dims):
            inv[d] = i
        return r.permute([0] + [i + 1 for i in inv])


class Transpose(Structural):
    """``transpose(a, b)`` / ``swapaxes``: swap the same two dims back (``x.t()`` / ``x.mT`` too)."""

    @property
    def name(self) -> str:
        return "transpose"

    def route(self, ctx, r):
        nd = len(ctx.input_shapes[0])
        if ctx.target in ("t",) or (len(ctx.args) < 3 and "dim0" not in ctx.kwargs):
            a, b = (nd - 2, nd - 1) if nd >= 2 else (0, 0)
        else:
            a = ctx.kwargs.get("dim0", ctx.args[1] if len(ctx.args) > 1 else None)
            b = ctx.kwargs.get("dim1", ctx.args[2] if len(ctx.args) > 2 else None)
        return r.transpose(a % nd + 1, b % nd + 1)


class Expand(Structural):
    """``expand`` / ``expand_as`` / ``broadcast_to``: sum the copies back (the total is kept)."""

    @property
    def name(self) -> str:
        return "expand"

    def route(self, ctx, r):
        from lrpgraph.rule import unbroadcast
        shape = tuple(ctx.input_shapes[0])

        def back(t):
            return unbroadcast(t, shape, ctx.batch_size).reshape((t.shape[0],) + shape) \
                if shape and shape[0] != 1 else unbroadcast(t, shape, ctx.batch_size)
        # summing the copies cancels signs like a fan-out does: return the two streams so that the
        # report measures them before they add (else every signed expand shows as a leak)
        return Split(back(r.clamp(min=0)), back(r.clamp(max=0)))


class GetItem(Structural):
    """``x[index]`` on a tensor (basic slicing, ints, None, Ellipsis, one index tensor) or on a
    tuple of tensors (``unbind``/``chunk`` results): relevance goes back to the selected entries."""

    selects = True
    # an index tensor is itself a slot (a buffer or computed value): it must be recorded, or the
    # rule sees None in its place and routes to x[:, None] (a crash or a wrong result)
    saves = frozenset({"inputs"})

    @property
    def name(self) -> str:
        return "getitem"

    def route(self, ctx, r):
        src_shape = ctx.input_shapes[0]
        index = ctx.args[1]
        if isinstance(src_shape, tuple) and src_shape and isinstance(src_shape[0], torch.Size):
            # tuple-valued input: relevance for one element of it
            n = len(src_shape)
            out = [None] * n
            out[index] = r
            return out
        if src_shape is None:
            return None
        full = torch.zeros((r.shape[0],) + tuple(src_shape), dtype=r.dtype, device=r.device)
        idx = index if isinstance(index, tuple) else (index,)
        tensors = [i for i in idx if isinstance(i, Tensor)]
        if len(tensors) > 1:
            raise NotImplementedError(f"{ctx.describe()}: indexing with several index tensors is not "
                                      "supported; index one dim at a time")
        key = (slice(None),) + idx
        if tensors:
            # advanced indexing may repeat an entry: accumulate, per sign stream (repeats add up
            # like a fan-out, so the report must see the streams before they cancel)
            ek = _expand_key(key, full)
            return Split(full.index_put(ek, r.clamp(min=0), accumulate=True),
                         full.index_put(ek, r.clamp(max=0), accumulate=True))
        else:
            full[key] = r
        return full


def _expand_key(key, full):
    """Turn a key with one index tensor and slices into index_put_ indices (broadcast aranges)."""
    dims = full.dim()
    # resolve Ellipsis
    if any(k is Ellipsis for k in key):
        i = next(j for j, k in enumerate(key) if k is Ellipsis)
        n_real = sum(1 for k in key if k is not None and k is not Ellipsis)
        key = key[:i] + (slice(None),) * (dims - n_real) + key[i + 1:]
    key = key + (slice(None),) * (dims - len([k for k in key if k is not None]))
    if any(k is None for k in key):
        raise NotImplementedError("indexing that mixes None with an index tensor is not supported")
    sizes = full.shape
    tpos = next(j for j, k in enumerate(key) if isinstance(k, Tensor))
    t = key[tpos]
    # each non-tensor dim becomes an arange, the tensor's own dims go at tpos
    out = []
    for j, k in enumerate(key):
        if isinstance(k, Tensor):
            shape = [1] * dims + list(t.shape)
            out.append(k.reshape([1] * tpos + list(t.shape) + [1] * (dims - tpos - 1)))
        else:
            rng = torch.arange(sizes[j], device=full.device)[k]
            if rng.dim() == 0:
                raise NotImplementedError("an integer index beside an index tensor is not supported")
            shape = [1] * (dims - 1 + t.dim())
            pos = j if j < tpos else j + t.dim() - 1
            shape[pos] = rng.numel()
            out.append(rng.reshape(shape))
    return tuple(out)


class Cat(Structural):
    """``torch.cat(tensors, dim)``: split the relevance by the inputs' sizes along ``dim``."""

    @property
    def name(self) -> str:
        return "cat"

    def route(self, ctx, r):
        dim = ctx.kwargs.get("dim", ctx.args[1] if len(ctx.args) > 1 else 0)
        shapes = ctx.input_shapes
        nd = len(shapes[0])
        d = dim % nd
        sizes = [s[d] for s in shapes]
        return dict(enumerate(torch.split(r, sizes, dim=d + 1)))


class Stack(Structural):
    """``torch.stack(tensors, dim)``: unbind the relevance along ``dim``."""

    @property
    def name(self) -> str:
        return "stack"

    def route(self, ctx, r):
        dim = ctx.kwargs.get("dim", ctx.args[1] if len(ctx.args) > 1 else 0)
        nd = len(ctx.input_shapes[0]) + 1
        return dict(enumerate(torch.unbind(r, dim=dim % nd + 1)))


class Unbind(Structural):
    """``unbind(dim)``: the node's relevance is a list; stack it back (missing entries are 0)."""

    @property
    def name(self) -> str:
        return "unbind"

    def route(self, ctx, r):
        shape = tuple(ctx.input_shapes[0])
        dim = ctx.kwargs.get("dim", ctx.args[1] if len(ctx.args) > 1 else 0) % len(shape)
        return _join(r, shape, dim, stack=True)


class Split_(Structural):
    """``chunk`` / ``split`` / ``tensor_split``: concatenate the pieces' relevance back."""

    @property
    def name(self) -> str:
        return "split"

    def route(self, ctx, r):
        shape = tuple(ctx.input_shapes[0])
        dim = ctx.kwargs.get("dim", ctx.args[2] if len(ctx.args) > 2 else 0) % len(shape)
        return _join(r, shape, dim, stack=False, piece_shapes=ctx.output_shape)


def _join(r, shape, dim, stack, piece_shapes=None):
    if isinstance(r, Tensor):
        return r
    ref = next(t for t in r if t is not None)
    k = ref.shape[0]
    parts = []
    for i, t in enumerate(r):
        if t is None:
            ps = piece_shapes[i] if piece_shapes is not None else shape[:dim] + shape[dim + 1:]
            t = torch.zeros((k,) + tuple(ps), dtype=ref.dtype, device=ref.device)
        parts.append(t)
    n_missing = (shape[dim] - len(parts)) if stack else 0
    if n_missing > 0:
        parts += [torch.zeros_like(parts[0])] * n_missing
    return torch.stack(parts, dim=dim + 1) if stack else torch.cat(parts, dim=dim + 1)


class Attribute(Structural):
    """``getattr(x, name)`` on a tensor (fx records ``x.mT`` / ``x.T`` this way): ``mT``/``mH`` swap
    the last two dims back, ``T``/``H`` reverse all dims back, ``real``/``data`` pass through.
    Attributes that are not tensors (``shape``, ``dtype``) never receive relevance."""

    @property
    def name(self) -> str:
        return "attribute"

    def route(self, ctx, r):
        shape = ctx.input_shapes[0]
        if isinstance(r, Tensor) and isinstance(shape, tuple) and shape and isinstance(shape[0], torch.Size):
            # a field of a tuple-valued op (``torch.sort(x).values``): route like ``[index]``, so
            # the producer's rule (or its missing-rule error) sees the relevance; never drop it
            index = _return_field_index(ctx.args[1])
            if index is None or index >= len(shape):
                raise NotImplementedError(f"{ctx.describe()}: cannot tell which element of the tuple "
                                          f"the field {ctx.args[1]!r} is; use [index] instead")
            out = [None] * len(shape)
            out[index] = r
            return out
        if not isinstance(r, Tensor) or not isinstance(shape, torch.Size):
            return None  # e.g. a field of a model-output object: nothing to route into
        attr, nd = ctx.args[1], len(shape)
        if attr in ("mT", "mH"):
            return r.transpose(nd - 1, nd)
        if attr in ("T", "H"):
            return r.permute([0] + list(range(nd, 0, -1)))
        if attr in ("real", "data"):
            return r
        raise NotImplementedError(f"{ctx.describe()}: no relevance rule for the tensor attribute "
                                  f"{attr!r}; register one for builtins.getattr")


def _return_field_index(field: str):
    """The position of ``field`` in torch's named-tuple return types (``values`` -> 0,
    ``indices`` -> 1), or ``None`` where the name is unknown or differs between types."""
    found = set()
    for t in vars(torch.return_types).values():
        if isinstance(t, type) and hasattr(t, "n_fields"):
            names = [k for k, v in vars(t).items() if type(v).__name__ == "member_descriptor"]
            if field in names:
                found.add(names.index(field))
    return found.pop() if len(found) == 1 else None


class NoRelevance(Rule):
    """Ops whose output carries no relevance (``size``, ``dim``, ``shape``): nothing flows."""

    saves = frozenset()
    exact = True

    @property
    def name(self) -> str:
        return "no-relevance"

    def __call__(self, ctx, relevance):
        return [None] * len(ctx.input_shapes)


def structural_table() -> dict:
    """The shape-op entries shared by every preset: ``{key: rule}``."""
    import torch.nn.functional as F
    from torch import nn

    passthrough, reshape = PassThrough(), Reshape()
    getitem, none = GetItem(), NoRelevance()
    table = {
        nn.Identity: passthrough, nn.Dropout: passthrough, nn.Dropout1d: passthrough,
        nn.Dropout2d: passthrough, nn.Dropout3d: passthrough, nn.AlphaDropout: passthrough,
        F.dropout: passthrough, F.dropout1d: passthrough, F.dropout2d: passthrough,
        F.dropout3d: passthrough, F.alpha_dropout: passthrough,
        nn.Flatten: reshape, nn.Unflatten: reshape, torch.flatten: reshape, torch.reshape: reshape,
        torch.squeeze: reshape, torch.unsqueeze: reshape, torch.unflatten: reshape,
        torch.permute: Permute(), torch.transpose: Transpose(), torch.swapaxes: Transpose(),
        torch.t: Transpose(),
        torch.cat: Cat(), torch.concat: Cat(), torch.concatenate: Cat(), torch.stack: Stack(),
        torch.unbind: Unbind(), torch.chunk: Split_(), torch.split: Split_(),
        operator.getitem: getitem, torch.broadcast_to: Expand(),
        # getattr was `none`, which silently dropped the relevance of x.mT / x.T (see Attribute)
        getattr: Attribute(), torch.numel: none,
    }
    for m in ("view", "reshape", "flatten", "squeeze", "unsqueeze", "view_as", "reshape_as", "unflatten"):
        table[m] = reshape
    for m in ("contiguous", "clone", "float", "double", "half", "bfloat16", "to", "type_as", "type"):
        table[m] = passthrough
    table.update({"permute": Permute(), "transpose": Transpose(), "swapaxes": Transpose(), "t": Transpose(),
                  "unbind": Unbind(), "chunk": Split_(), "split": Split_(), "expand": Expand(),
                  "expand_as": Expand(), "size": none, "dim": none, "numel": none})
    return table
