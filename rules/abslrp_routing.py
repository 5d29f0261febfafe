"""absLRP on routing ops and on fused projections (the paper-era code's treatment).

**Identity-like routing.** The paper-era absLRP code wraps every re-arrangement of an
activation (head split and merge, patch flatten, class-token concat and select) as a layer of its
own whose absolute twin is ``|h|``: with ``S = R / |h|`` the relevance of an input entry
is ``x * route((1 + sign h) S) = route(2 * 1[h > 0] * R)``, i.e. the routed relevance goes only to the
positive entries (doubled), and the positive and negative masses are then conserved per node, as
for every absLRP layer. :class:`AbsRouting` gives a structural rule (any
:class:`~lrpgraph.rules.structural.Structural` subclass: its ``route`` is the exact transposed data
movement) that treatment. Constant slots (a class token, a parameter) take nothing: their share
goes to the activation, as the reference's concatenation does. Chains of routing ops give the same
map as one (the rule is idempotent on the positive entries).

Which routing rules get it is a class flag of :class:`Structural`:

* ``abslrp`` (paper era): every structural rule with ``moves_data = True`` (the default; pure
  pass-through such as Identity, Dropout and dtype casts sets it ``False``).
* ``abslrp-renorm`` (current code): only selections that drop entries (``selects = True``, e.g.
  indexing such as the class-token select ``x[:, 0]``); the current code re-arranges heads, q/k/v
  and patches exactly, inside its explain functions, and wraps only the token select as a layer.

**Fused projections.** The paper-era code explains q, k and v as three Linear layers, each
conserving its own positive and negative mass. For a Linear node whose output the graph splits
into chunks (found by :mod:`lrpgraph.projections`, ``ctx.options["out_groups"]``), the paper
variant conserves per chunk and adds the chunks' input relevance, so fusing q/k/v in a model does
not change its explanation.
"""
from __future__ import annotations

import operator
from typing import List, Optional

import torch
from torch import Tensor

from lrpgraph import projections as _projections  # noqa: F401  (registers the pass)
from lrpgraph.registry import RuleTable
from lrpgraph.rule import Absorbed, NodeContext, Split, _ratio, expand_stats, sample_dot, sample_sum, temp
from lrpgraph.samples import batch_to_front

from .abslrp import AbsLRP
from .abslrp_onepass import block_dots, one_pass_streams
from .structural import Structural


class AbsRouting(AbsLRP):
    """The identity-like absLRP rule around an exact routing rule ``inner`` (see the module doc).

    The routed entries of ``h`` are copies of entries of ``x``, so ``x * route((1 + sign h) S)``
    equals ``2 x+ / (|x| + eps) * route(R)``: the relevance is routed exactly, then weighed on the
    input side (whose batch axis is dim 0 even where the output's is not, as for timm's
    ``(3, B, heads, N, d)`` q/k/v stack) and each sign's mass conserved there.

    Nodes whose value or input is a tuple (``unbind``, ``getitem`` of a tuple) are routed exactly:
    the tensors around them get the rule.
    """

    kind = "abslrp.routing"
    signs_known = True
    per_sample = False  # it moves each weighed value's batch axis to the front itself

    def __init__(self, inner: Structural, variant: str = "paper"):
        super().__init__(variant)
        self.inner = inner

    @property
    def name(self) -> str:
        return f"abslrp.routing[{self.variant}]({self.inner.name})"

    def _applies(self, ctx: NodeContext, relevance) -> bool:
        if not isinstance(relevance, Tensor) or not isinstance(ctx.output, Tensor):
            return False
        acts = [v for v, c in zip(ctx.inputs, ctx.is_parameter) if not c]
        return bool(acts) and all(isinstance(v, Tensor) and v.is_floating_point() for v in acts)

    def __call__(self, ctx, relevance):
        if isinstance(relevance, list) and isinstance(ctx.output, (tuple, list)):
            # a split into several tensors (unbind, chunk): each piece is a tensor of its own
            # (q, k, v), weighed and conserved on its own before the exact routing
            axes = ctx.output_axis if isinstance(ctx.output_axis, (tuple, list)) else [None] * len(ctx.output)
            pieces = [r if r is None or not isinstance(h, Tensor) or not h.is_floating_point()
                      or self._piece_on_positive(ctx, i) else
                      self._piece(ctx, r, h, axes[i]) for i, (r, h) in enumerate(zip(relevance, ctx.output))]
            if ctx.node is not None and self.variant == "paper":
                ctx.node.meta[_ON_POSITIVE] = True
            return self.inner(ctx, pieces)
        if not self._applies(ctx, relevance):
            return self.inner(ctx, relevance)
        if self.variant == "paper" and _after_routing(ctx):
            # every user already gave relevance only to positive entries of this value (and
            # conserved each sign's mass): the rule would change nothing (it is idempotent)
            return self.inner(ctx, relevance)
        routed = list(self.inner(ctx, relevance))  # Split where copies were summed (expand)
        # a pad's constant entries: their share stays with the constant (absorbed), as a parameter's
        extra = [routed.pop()] if routed and isinstance(routed[-1], Absorbed) else []
        # the paper variant conserves per sample: an input whose batch is not its first axis (a
        # (2, B, heads, N, d) q/k stack) is weighed with its batch axis moved to the front
        axes = [_axis(a) if self.variant == "paper" else 0 for a in (ctx.input_axes or [None] * len(routed))]
        routed = [_front(r, a) for r, a in zip(routed, axes)]
        xs = [x.movedim(a, 0) if a and isinstance(x, Tensor) else x for x, a in zip(ctx.inputs, axes)]
        out = None
        if self.variant == "paper" and not ctx.report:
            out = _one_slot_fast(ctx, routed, xs)
        if out is None:
            gains = [None if r is None or c or not isinstance(x, Tensor) else _gain(x)
                     for r, x, c in zip(routed, xs, ctx.is_parameter)]
            out = self._weigh(gains, routed)
        return [_front(o, a, back=True) for o, a in zip(out, axes)] + extra

    def _piece_on_positive(self, ctx: NodeContext, i: int) -> bool:
        """Fast path, paper: whether piece ``i``'s relevance already lies on its positive entries
        only (every ``getitem`` of it reaches only routing nodes that weighed, through pass-through
        nodes), so the idempotent rule may skip it, as :func:`_after_routing` does for a tensor."""
        node, plan = ctx.node, ctx.plan
        if self.variant != "paper" or ctx.report or node is None or plan is None:
            return False
        users = list(node.users)
        if not all(u.op == "call_function" and u.target is operator.getitem and len(u.args) == 2
                   and isinstance(u.args[1], int) for u in users):
            return False
        mine = [u for u in users if u.args[1] % len(ctx.output) == i]
        return bool(mine) and all(_users_on_positive(u, plan) for u in mine)

    def _piece(self, ctx: NodeContext, r, h: Tensor, axis=None):
        """One piece ``h`` of a split and its relevance ``r``, weighed per sample (``axis``: the
        piece's batch axis, moved to the front for the weighing in the paper variant)."""
        a = _axis(axis) if self.variant == "paper" else 0
        r, h = _front(r, a), (h.movedim(a, 0) if a else h)
        fast_path = self.variant == "paper" and not ctx.report and isinstance(r, Tensor)
        g = _gain(h, temp(ctx, "abs_routing.gain", h), scale=1) if fast_path else _gain(h)
        out = _weigh_one(r, g) if fast_path else None
        return _front(out if out is not None else self._weigh([g], [r])[0], a, back=True)

    def _weigh(self, gains: list, routed: list) -> list:
        """``gain * relevance`` per slot; paper: each sign's mass (of everything routed,
        constant slots included) conserved over the slots with a gain. A :class:`Split` (copies
        of one entry summed, as for ``expand``) keeps its streams apart."""
        if self.variant != "paper":
            return [None if g is None or r is None else
                    g * (r.total() if isinstance(r, Split) else r) for g, r in zip(gains, routed)]
        parts = [None if r is None else (r.pos, r.neg) if isinstance(r, Split) else (r.clamp(min=0), r.clamp(max=0))
                 for r in routed]
        live = [(g, p) for g, p in zip(gains, parts) if g is not None and p is not None]
        if not live:
            return [None] * len(routed)
        mass = lambda t: 0 if t is None else sample_sum(t)  # noqa: E731
        # the masses of everything routed (constant slots included: their share moves to x)
        pos = sum(mass(p[0]) for p in parts if p is not None)
        neg = abs(sum(mass(p[1]) for p in parts if p is not None))
        tp = sum(mass(None if p[0] is None else g * p[0]) for g, p in live)
        tn = abs(sum(mass(None if p[1] is None else g * p[1]) for g, p in live))
        a, b = _ratio(_t(pos), _t(tp)), _ratio(_t(neg), _t(tn))
        lost_p = ((_t(tp) <= 0) & (_t(pos) > 0)).to(a.dtype)
        lost_n = ((_t(tn) <= 0) & (_t(neg) > 0)).to(b.dtype)
        out: list = []
        for g, p, r in zip(gains, parts, routed):
            if g is None or p is None:
                out.append(None)
                continue
            # a stream that meets no positive entry at all would vanish (the reference loses it):
            # it is routed exactly instead, so no mass is lost silently
            rp = None if p[0] is None else g * p[0] * expand_stats(a, p[0]) + p[0] * expand_stats(lost_p, p[0])
            rn = None if p[1] is None else g * p[1] * expand_stats(b, p[1]) + p[1] * expand_stats(lost_n, p[1])
            out.append(Split(rp, rn) if isinstance(r, Split) else rp + rn)
        return out


def _one_slot_fast(ctx: NodeContext, routed: list, xs: list) -> Optional[list]:
    """The paper rule for one activation slot and a plain routed tensor, in few passes
    (:func:`conserve_diagonal` with the gain); ``None`` when a stream meets no positive entry
    (the general path then routes that stream exactly) or the node has several slots.
    ``xs``: the inputs' values, batch axis first."""
    live = [i for i, r in enumerate(routed) if r is not None]
    if len(live) != 1 or ctx.is_parameter[live[0]] or not isinstance(routed[live[0]], Tensor):
        return None
    i = live[0]
    out: list = [None] * len(routed)
    x = xs[i]
    out[i] = _weigh_one(routed[i], _gain(x, temp(ctx, "abs_routing.gain", x), scale=1))
    return None if out[i] is None else out


def _weigh_one(r: Tensor, g: Tensor) -> Optional[Tensor]:
    """``g (a r+ + b r-)`` with each sign's mass conserved; ``None`` if a stream is lost."""
    if not r.is_contiguous() and g.is_contiguous():  # routed back as a view (a transpose): one
        r = r.contiguous()  # copy here instead of one in each per-sample dot below
    rp = r.clamp(min=0)
    pos, tot = sample_sum(rp), sample_sum(r)
    tp, tt = sample_dot(rp, g), sample_dot(r, g)
    if bool(((tp <= 0) & (pos > 0)).any()) or bool(((tt - tp >= 0) & (tot - pos < 0)).any()):
        return None
    a = expand_stats(_ratio(pos, tp), r)
    b = expand_stats(_ratio((tot - pos).abs(), (tt - tp).abs()), r)
    return rp.mul_(a - b).addcmul_(r, b).mul_(g)  # g (a r+ + b r-)


def _axis(a) -> int:
    """The batch axis from the walk's probe as an int: 0 where it is unknown, absent or a tuple."""
    return a if isinstance(a, int) and a > 0 else 0


def _front(r, axis: int, back: bool = False):
    """:func:`~lrpgraph.samples.batch_to_front` for a routed relevance (``None``, a tensor or a
    :class:`Split` of two)."""
    if r is None or not axis:
        return r
    if isinstance(r, Split):
        return r.map(lambda t: batch_to_front(t, axis, back))
    return batch_to_front(r, axis, back)


def _t(v) -> Tensor:
    return v if isinstance(v, Tensor) else torch.zeros(())


_ON_POSITIVE = "lrpgraph_relevance_on_positive"


def _after_routing(ctx: NodeContext) -> bool:
    """Whether every user of this node is a routing node of this preset that weighed (or could
    skip): then the relevance here lies on positive entries only. Marks this node likewise."""
    node, plan = ctx.node, ctx.plan
    if node is None or plan is None:
        return False
    users = list(node.users)
    skip = bool(users) and all(u.meta.get(_ON_POSITIVE) is True and isinstance(plan.rules.get(u), AbsRouting)
                               for u in users)
    node.meta[_ON_POSITIVE] = True  # weighed here, or skipped: either way on positive entries
    return skip


def _users_on_positive(node, plan) -> bool:
    """Whether every user of ``node`` is a routing node of this preset that weighed (or skipped),
    looking through pass-through nodes (``moves_data = False``: Identity, Dropout, dtype casts keep
    the entries and their signs), so that the relevance of ``node`` lies on positive entries only."""
    users = list(node.users)
    for u in users:
        rule = plan.rules.get(u)
        if isinstance(rule, AbsRouting):
            if u.meta.get(_ON_POSITIVE) is not True:
                return False
        elif not (isinstance(rule, Structural) and not rule.moves_data and _users_on_positive(u, plan)):
            return False
    return bool(users)


def _gain(x: Tensor, out: Optional[Tensor] = None, scale: float = 2.0) -> Tensor:
    """``x (1 + sign x) / |x|`` = 2 on positive entries, 0 elsewhere. The paper-era code divides by
    ``h`` itself where ``h != 0`` (``1e-9`` only where ``h == 0``), so its gain is exactly this.
    Computed as ``2 max(sign x, 0)`` (a third of the time of ``2 (x > 0)`` on CPU); ``out``: a
    scratch buffer shaped like ``x``. ``scale=1`` leaves out the 2 where each sign's mass is
    conserved right after (which cancels it): one pass fewer."""
    g = torch.sign(x, out=out).clamp_(min=0)
    return g.mul_(scale) if scale != 1 else g


def absolute_routing(table: RuleTable, variant: str) -> RuleTable:
    """``table`` with its structural rules wrapped in :class:`AbsRouting` where the variant's
    flag says so (``moves_data`` for ``"paper"``, ``selects`` for ``"head"``)."""
    flag = "moves_data" if variant == "paper" else "selects"
    wrapped: dict = {}

    def wrap(rule):
        if isinstance(rule, Structural) and getattr(rule, flag, False):
            if id(rule) not in wrapped:
                wrapped[id(rule)] = AbsRouting(rule, variant)
            return wrapped[id(rule)]
        return rule

    out = RuleTable()
    for part in ("modules", "functions", "methods"):
        setattr(out, part, {k: wrap(r) for k, r in getattr(table, part).items()})
    return out


# --------------------------------------------------------------------------------------------
# fused projections, paper variant: conserve per output chunk


def _group_sums(t: Tensor, w: Optional[Tensor], onehot: Tensor) -> Tensor:
    """``sum over entries of chunk g of t * w`` (``w`` None: of ``t``) per (k, sample, g): ``(K, B, G)``."""
    tw = t if w is None else t * w
    return tw.reshape(t.shape[0], t.shape[1], -1, t.shape[-1]).sum(2) @ onehot


def grouped_affine(rule, ctx: NodeContext, relevance: Tensor, groups: Tensor) -> list:
    """The paper-variant affine rule with the positive and negative mass conserved per chunk of
    output features (``groups``: the chunk id of each feature), the chunks' results added."""
    groups = groups.to(relevance.device)
    G = int(groups.max()) + 1
    onehot = torch.nn.functional.one_hot(groups, G).to(relevance.dtype)  # (F, G)
    if ctx.report:  # each chunk as its own relevance rows, measured as streams
        shape = (G, 1) + (1,) * (relevance.dim() - 2) + (onehot.shape[0],)
        stacked = (relevance.unsqueeze(0) * onehot.T.reshape(shape)).reshape((-1,) + tuple(relevance.shape[1:]))
        k = relevance.shape[0]
        out = AbsLRP.__call__(rule, ctx, stacked)
        fold = lambda t: None if t is None else t.reshape((G, k) + tuple(t.shape[1:])).sum(0)  # noqa: E731
        return [None if o is None else Split(fold(o.pos), fold(o.neg)) if isinstance(o, Split) else fold(o)
                for o in out]
    size = onehot.shape[0] // G
    if size * G == onehot.shape[0] and torch.equal(groups, torch.arange(onehot.shape[0], device=groups.device) // size):
        return rule.contributions(ctx, _scale_blocks(rule, ctx, relevance, G))
    # with S = R / den: the masses are sums of R+ and R; the totals of the contributions are sums
    # of R+ * c / den and R * c / den (c: the column mass), per chunk
    den = rule.denominator(ctx).clone()
    q = rule.column_mass(ctx).div_(den)
    rp = relevance.clamp(min=0)
    p, t = _group_sums(rp, None, onehot), _group_sums(relevance, None, onehot)
    mp, mt = _group_sums(rp, q, onehot), _group_sums(relevance, q, onehot)
    bshape = (rp.shape[0], rp.shape[1]) + (1,) * (rp.dim() - 3) + (rp.shape[-1],)
    a = _ratio(p, mp)[..., groups].reshape(bshape)
    b = _ratio((t - p).abs(), (mt - mp).abs())[..., groups].reshape(bshape)
    return rule.contributions(ctx, rp.mul_(a - b).add_(relevance * b).div_(den))  # a S+ + b S-


def _scale_blocks(rule, ctx: NodeContext, relevance: Tensor, G: int) -> Tensor:
    """:func:`~.abslrp_onepass.one_pass_scale` per chunk, for ``G`` chunks that are equal
    contiguous blocks of the features (timm's q/k/v): ``a_g S+ + b_g S-`` in every block ``g``."""
    streams, joint = one_pass_streams(rule, ctx, relevance)
    dots = block_dots(streams, joint, G)  # (2, 2, K, B, G): [S+, S] x [den, C] per block
    p, mp = dots[0, 0], dots[0, 1]
    a, b = _ratio(p, mp), _ratio((dots[1, 0] - p).abs(), (dots[1, 1] - mp).abs())
    sp, s = streams[0], streams[1]
    shape = tuple(sp.shape[:-1]) + (G, sp.shape[-1] // G)
    bshape = tuple(a.shape[:2]) + (1,) * (len(shape) - 4) + (G, 1)
    a, b = a.reshape(bshape), b.reshape(bshape)
    return sp.view(shape).mul_(a - b).addcmul_(s.view(shape), b).view(sp.shape)  # a S+ + b S-


def out_groups(ctx: NodeContext) -> Optional[Tensor]:
    """The output chunks of a fused projection, if the graph splits this node's output."""
    return ctx.options.get("out_groups")


__all__: List[str] = ["AbsRouting", "absolute_routing", "grouped_affine", "out_groups"]
