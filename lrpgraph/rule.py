"""The rule interface: what a relevance rule sees, what it returns, and shared numerics.

Relevance layout
----------------
Relevance for a tensor of shape ``(B, *F)`` is a tensor of shape ``(K, B, *F)``. The leading
``K`` axis stacks the "relevance batch": several targets per input, the two passes of a
contrastive explanation, and the positive/negative streams of the sign-split absLRP rule. The
forward pass runs once on ``B`` inputs; every rule broadcasts the saved activations over ``K``.
A node whose value is a tuple of tensors (``unbind``, ``chunk``) carries a list of such tensors
(``None`` where no relevance arrived).

A rule is a callable ``rule(ctx, relevance) -> sequence`` that returns one entry per *input
slot* of the node (each occurrence of an fx node in the flattened ``args``/``kwargs``, in
order): a relevance tensor shaped ``(K, *slot_shape)``, or ``None`` for slots that receive none
(non-tensor arguments, integer sizes, constants). Rules are explicit tensor maths: no autograd.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from .samples import (SAMPLE_ROWS, _per_sample, _row_dot, expand_stats, feature_dims,  # noqa: F401
                      per_sample_rows, sample_dot, sample_sum)

#: Stabiliser of the absLRP rules and of every normalisation (the reference code's value).
EPS = 1e-9

Relevance = Any  # Tensor, or a list of Optional[Tensor] for tuple-valued nodes


@dataclass
class NodeContext:
    """What the rule of one fx node is given.

    Attributes:
        name: the fx node name (``layer1_0_conv1``), used in errors and reports.
        op: ``call_module``, ``call_function`` or ``call_method``.
        target: module qualname, function object or method name.
        module: the called module for ``call_module`` nodes, else ``None``.
        args, kwargs: the node's arguments with every fx node replaced by its recorded value
            (``None`` for tensors the rule did not ask to keep; see ``Rule.saves``).
        inputs: the recorded value of each input slot (same ``None`` convention).
        input_shapes: the shape of each input slot (``None`` for non-tensors).
        output: the recorded output (``None`` unless the rule saves it).
        output_shape: the shape of the output (a tuple of shapes for tuple outputs).
        batch_size: ``B``, the size of dim 0 of the explained input.
        is_parameter: per slot, whether it is a constant: a parameter or buffer (``get_attr``) or a
            value computed from them alone (it does not depend on the input).
        options: free-form per-node options set by a composite (e.g. z-box bounds).
        report: whether the walker measures this node for the conservation report; without it a
            rule may return the sum of its sign streams instead of a :class:`Split`, computed in one
            pass (the absLRP fast path).
    """

    name: str
    op: str
    target: Any
    module: Optional[nn.Module]
    args: tuple
    kwargs: dict
    inputs: list
    input_shapes: list
    output: Any
    output_shape: Any
    batch_size: int
    is_parameter: list = field(default_factory=list)
    options: dict = field(default_factory=dict)
    report: bool = True
    #: the walker hands the incoming relevance over: nothing else refers to it, so a rule may
    #: overwrite it (and return the buffer as an input's relevance) instead of allocating
    owns_relevance: bool = False
    #: per-node scratch space, so that parts of one rule (column mass, contributions) share
    #: derived tensors such as |x| or |W| instead of computing them twice (see :func:`memo`)
    cache: dict = field(default_factory=dict)
    #: reusable temporary buffers shared by the nodes of one walk (see :func:`temp`)
    scratch: Optional["Scratch"] = None
    #: ``(dotted path, type name)`` of the model's module that ran this node, where the tracer
    #: knows it (the export tracer); named in error messages
    module_path: Optional[tuple] = None
    #: the fx node, the walk's plan and recording: for the few rules that need the graph around
    #: their node (abslrp-renorm's residual rule walks the branch, see rules/residual.py)
    node: Any = None
    plan: Any = None
    rec: Any = None
    #: the batch axis of each input's value and of the output's (a tuple for a tuple value; None
    #: where unknown or absent), from the walk's batch-axis probe: for rules that weigh a tensor
    #: whose batch is not its first axis, as ``(3, B, heads, N, d)`` q/k/v stacks
    input_axes: list = field(default_factory=list)
    output_axis: Any = None

    def describe(self) -> str:
        """A short human description: ``node `x` (torch.roll)``, plus the module that ran it."""
        where = f" in module `{self.module_path[0]}` ({self.module_path[1]})" if self.module_path else ""
        return f"node `{self.name}` ({describe_target(self.op, self.target, self.module)}){where}"


def memo(ctx: NodeContext, key: str, fn: Callable[[], Any]) -> Any:
    """``fn()`` computed once per node call and kept in ``ctx.cache[key]``."""
    if key not in ctx.cache:
        ctx.cache[key] = fn()
    return ctx.cache[key]


class Scratch:
    """Temporary buffers reused from node to node in one walk, keyed by name, shape, dtype, device.

    Why: the rules' temporaries are as large as a model's largest activations, and a fresh CPU
    allocation of that size may be page-faulted in on first touch (glibc hands freed memory of
    that size back to the OS). Measured on ViT-B/16, batch 8: up to 30 ms per 19 MB temporary,
    several per block. The blocks of a ViT (the stages of a ResNet) share shapes, so one buffer per
    (name, shape) serves them all. A buffer that no rule asked for during the last ``window``
    nodes is dropped, so that the shapes of a finished ResNet stage do not stay in memory.

    A buffer is valid only while the rule that asked for it runs: it must never be returned as
    relevance, kept, or used under another name at the same time.
    """

    def __init__(self, window: int = 64) -> None:
        self.window = window
        self._bufs: dict = {}
        self._last: dict = {}
        self._step = 0

    def get(self, key: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
        k = (key, tuple(shape), dtype, device)
        buf = self._bufs.get(k)
        if buf is None:
            buf = self._bufs[k] = torch.empty(tuple(shape), dtype=dtype, device=device)
        self._last[k] = self._step
        return buf

    def step(self) -> None:
        """Called by the walker once per node: drops buffers unused for ``window`` nodes."""
        self._step += 1
        if self._step % 16 == 0:
            for k in [k for k, t in self._last.items() if self._step - t > self.window]:
                del self._bufs[k], self._last[k]

    @property
    def nbytes(self) -> int:
        """Memory held by the buffers."""
        return sum(b.numel() * b.element_size() for b in self._bufs.values())


def temp(ctx: Optional[NodeContext], key: str, like: Tensor, shape: Optional[Sequence[int]] = None) -> Optional[Tensor]:
    """A buffer for the ``out=`` argument of a temporary that dies within the rule call: from the
    walk's :class:`Scratch` (``like``'s dtype and device, its shape unless ``shape`` is given), or
    ``None`` outside a walk or with autograd on (``out=None`` then allocates, as usual)."""
    if ctx is None or ctx.scratch is None or torch.is_grad_enabled():
        return None
    shape = tuple(like.shape) if shape is None else tuple(shape)
    return ctx.scratch.get(key, shape, like.dtype, like.device)


class Rule:
    """Base class of relevance rules.

    Class attributes a subclass may set:
        saves: which recorded values the rule needs: ``"inputs"`` and/or ``"output"``. The
            forward recorder keeps only these, so a shape op that saves nothing costs no memory.
        exact: the rule only routes relevance (shape ops, pass-through); its mass is conserved by
            construction.
        renormalise: after the conservation report has measured the rule's output, the walker
            rescales each input's relevance to unit L1 mass per sample (the absLRP "HEAD" code).
    """

    saves: frozenset = frozenset({"inputs", "output"})
    exact: bool = False
    renormalise: bool = False

    @property
    def name(self) -> str:
        """Name shown in reports; defaults to the class name."""
        return type(self).__name__

    def __call__(self, ctx: NodeContext, relevance: Relevance) -> Sequence[Relevance]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class FunctionRule(Rule):
    """Wraps a plain function ``fn(ctx, relevance) -> sequence`` as a rule (for ``register_rule``)."""

    def __init__(self, fn: Callable, saves: Sequence[str] = ("inputs", "output"),
                 exact: bool = False, renormalise: bool = False, name: Optional[str] = None):
        self.fn = fn
        self.saves = frozenset(saves)
        self.exact = exact
        self.renormalise = renormalise
        self._name = name or getattr(fn, "__name__", "FunctionRule")

    @property
    def name(self) -> str:
        return self._name

    def __call__(self, ctx: NodeContext, relevance: Relevance) -> Sequence[Relevance]:
        return self.fn(ctx, relevance)


class Absorbed:
    """Relevance that a rule hands to a constant inside its op (the entries a pad with a non-zero
    value adds), returned after the per-slot entries: absorbed by design, as a parameter's share."""

    __slots__ = ("relevance", "what")

    def __init__(self, relevance: Tensor, what: str):
        self.relevance, self.what = relevance, what


class Split:
    """Relevance for one input slot kept as its positive and negative streams (``pos + neg``)."""

    __slots__ = ("pos", "neg")

    def __init__(self, pos: Optional[Tensor], neg: Optional[Tensor]):
        self.pos = pos
        self.neg = neg

    def total(self) -> Optional[Tensor]:
        if self.pos is None:
            return self.neg
        if self.neg is None:
            return self.pos
        return self.pos + self.neg

    def map(self, fn) -> "Split":
        return Split(None if self.pos is None else fn(self.pos), None if self.neg is None else fn(self.neg))



# --------------------------------------------------------------------------------------------
# numerics shared by rules and the walker (the per-sample sums: lrpgraph/samples.py)


def unit_l1(t: Tensor, eps: float = EPS) -> Tensor:
    """Rescale each (k, sample) of ``t`` to unit L1 mass, signs kept (the reference's SUM_TO_ONE)."""
    return t / expand_stats(sample_sum(t.abs()) + eps, t)


def stabilise(z: Tensor, eps: float) -> Tensor:
    """``z + eps * sign(z)`` with sign(0) taken as +1, so the result is never zero for eps > 0."""
    return z + eps * (z >= 0).to(z.dtype) * 2 - eps


def flat_k(t: Tensor) -> Tensor:
    """Merge the K and batch axes: ``(K, B, ...) -> (K*B, ...)`` for ops that need a plain batch."""
    return t.reshape((t.shape[0] * t.shape[1],) + tuple(t.shape[2:]))


def unflat_k(t: Tensor, k: int) -> Tensor:
    """Inverse of :func:`flat_k`."""
    return t.reshape((k, t.shape[0] // k) + tuple(t.shape[1:]))


def unbroadcast(r: Tensor, shape: Sequence[int], batch_size: int) -> Tensor:
    """Sum a ``(K, *out_shape)`` relevance down to an operand that was broadcast to ``out_shape``.

    The batch axis is kept even when the operand had size 1 there (a parameter such as a position
    embedding): its relevance stays per sample, shaped ``(K, B, *shape[1:])``, so reports can say
    how much each sample gave to it (also where the batch is merged with windows, batch-major, as
    for a Swin's relative position bias).
    """
    shape = tuple(shape)
    out_rank = r.dim() - 1
    if len(shape) < out_rank:
        shape = (1,) * (out_rank - len(shape)) + shape
    dims = [i + 1 for i, (s, o) in enumerate(zip(shape, r.shape[1:])) if s == 1 and o != 1 and i > 0]
    if dims:
        r = r.sum(dim=dims, keepdim=True)
    if shape[0] == 1 and r.shape[1] != batch_size:
        if r.shape[1] % batch_size == 0:  # broadcast over the batch merged with windows, batch-major
            r = r.reshape((r.shape[0], batch_size, -1) + tuple(r.shape[2:])).sum(2)
        else:
            r = r.sum(dim=1, keepdim=True)
    return r


def conserve_signs(relevance: Tensor, raw: Callable[[Tensor], list], scale: Tensor,
                   signs_known: bool = False) -> list:
    """The paper-era absLRP sign split (spec 1.3): conserve positive and negative mass separately.

    ``raw(s)`` maps a stacked ``(K', B, ...)`` stabilised relevance to the un-normalised input
    relevance of every slot (a list, ``None`` for slots that get none); it must be linear in ``s``.
    With ``S = relevance / scale``, ``S+ = max(S, 0)`` and ``S- = min(S, 0)`` are pushed through
    ``raw`` in one batched call, and every slot gets ``P * r+ / |r+| + |N| * r- / |r-|``, where P and
    N are the positive and negative mass of ``relevance`` and ``|.|`` is the L1 mass summed over
    all slots (so multi-input nodes split by each operand's share, as the paper-era code does).
    Each slot's result is a :class:`Split` so that the report can measure both streams before
    they are added (and partly cancel). ``signs_known``: the rule guarantees ``r+ >= 0`` and
    ``r- <= 0`` (the ``2 z+`` form does), so L1 masses are plain sums.
    """
    s = relevance / scale
    pos_mass = sample_sum(relevance.clamp(min=0))
    neg_mass = sample_sum(relevance) - pos_mass
    k = relevance.shape[0]
    has_pos = bool((pos_mass != 0).any())
    has_neg = bool((neg_mass != 0).any())
    if not (has_pos or has_neg):
        return [None for _ in raw(s)]
    if has_pos and has_neg:  # both streams in one buffer: one batched call, no concatenation copy
        stacked = torch.empty((2 * k,) + tuple(s.shape[1:]), dtype=s.dtype, device=s.device)
        torch.clamp(s, min=0, out=stacked[:k])
        torch.clamp(s, max=0, out=stacked[k:])
    else:
        stacked = s.clamp(min=0) if has_pos else s.clamp(max=0)
    out = raw(stacked)
    mass = (lambda t: sample_sum(t).abs()) if signs_known else (lambda t: sample_sum(t.abs()))  # noqa: E731

    def split(r: Optional[Tensor]):
        if r is None:
            return None, None
        if has_pos and has_neg:
            return r[:k], r[k:]
        return (r, None) if has_pos else (None, r)

    parts = [split(r) for r in out]
    total = {}
    for sign, idx in (("pos", 0), ("neg", 1)):
        masses = [mass(p[idx]) for p in parts if p[idx] is not None]
        total[sign] = sum(masses) if masses else None
    result = []
    for (rp, rn) in parts:
        if rp is None and rn is None:
            result.append(None)
            continue
        pos = None if rp is None else rp * expand_stats(_ratio(pos_mass, total["pos"]), rp)
        neg = None if rn is None else rn * expand_stats(_ratio(neg_mass.abs(), total["neg"]), rn)
        result.append(Split(pos, neg))
    return result


def conserve_diagonal(relevance: Tensor, gains: Sequence[Optional[Tensor]], ctx: Optional[NodeContext] = None) -> list:
    """:func:`conserve_signs` for rules whose raw output is ``gain_k * relevance`` with ``gain_k >= 0``
    element-wise (activations, BatchNorm stages, additions, pass-through).

    Then the positive and negative streams never overlap, so one signed product per slot and a
    per-sign rescale give exactly the sign-split result: positive mass P and negative mass N of
    ``relevance`` are conserved jointly over the slots, with no stacking of streams. Every slot gets
    ``gain_k * (a R+ + b R-)`` with ``a = P / sum_k <gain_k, R+>`` and ``b = |N| / |sum_k <gain_k, R->|``.
    With ``ctx`` (a walk's node) whose relevance is handed over, the result is built in its buffer.
    """
    live = [g for g in gains if g is not None]
    if not live:
        return list(gains)
    own = ctx is not None and ctx.owns_relevance and not torch.is_grad_enabled()
    rp = torch.clamp(relevance, min=0, out=temp(ctx, "diagonal.r+", relevance) if own else None)
    pos_mass = sample_sum(rp)
    neg_mass = (sample_sum(relevance) - pos_mass).abs()
    tp = sum(sample_dot(rp, g) for g in live)
    tn = (sum(sample_dot(relevance, g) for g in live) - tp).abs()
    a = expand_stats(_ratio(pos_mass, tp), rp)
    b = expand_stats(_ratio(neg_mass, tn), rp)
    if own:  # b R + (a - b) R+ = a R+ + b R-, in the handed-over buffer (no residue where
        # the two terms cancel: a = 0 only where R+ = 0 or every gain on R+ is 0)
        scaled = relevance.mul_(b).addcmul_(rp, a - b)
    else:
        scaled = rp.mul_(a - b).addcmul_(relevance, b)
    last = max(i for i, g in enumerate(gains) if g is not None)
    out = [None if g is None or i == last else g * scaled for i, g in enumerate(gains)]
    g = gains[last]  # the last slot takes the buffer itself when the shapes allow it
    out[last] = scaled.mul_(g) if torch.broadcast_shapes(g.shape, scaled.shape) == scaled.shape else g * scaled
    return out


def _ratio(mass: Tensor, norm: Tensor) -> Tensor:
    """``mass / norm`` with 0 where ``norm`` is 0: an exact rescale (the reference adds 1e-9 to the
    norm, which leaks up to 1e-9/norm of the mass once cancellation makes the norm small)."""
    live = norm > 0
    return torch.where(live, mass / torch.where(live, norm, 1.0), 0.0)  # no division by 0 (nor its NaN)


def describe_target(op: str, target: Any, module: Optional[nn.Module] = None) -> str:
    """Readable name of what a node calls: ``torch.nn.Conv2d``, ``torch.roll``, ``Tensor.view``."""
    if op == "call_module" and module is not None:
        t = type(module)
        return f"{t.__module__}.{t.__qualname__}"
    if op == "call_method":
        return f"Tensor.{target}"
    if op == "call_function":
        if isinstance(target, torch._ops.OpOverload):
            return str(target)  # aten.roll.default
        mod = getattr(target, "__module__", None) or ""
        name = getattr(target, "__name__", None) or getattr(target, "__qualname__", repr(target))
        if mod in ("_operator", "operator"):
            return f"operator.{name}"
        if mod.startswith("torch._C") or mod == "torch":
            return f"torch.{name}"
        if mod == "torch.nn.functional":
            return f"torch.nn.functional.{name}"
        return f"{mod}.{name}" if mod else name
    return f"{op} {target}"
