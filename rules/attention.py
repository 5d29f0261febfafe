"""Attention rules: products of two activations (matmul, bmm, einsum, ``a * b``) and softmax.

Every rule is explicit tensor maths on the recorded forward values (no autograd). The absLRP
rules subclass :class:`~lrpgraph.rules.abslrp.AbsLRP`, so each exists in both variants
(``paper``: preset ``abslrp``; ``head``: preset ``abslrp-renorm``). With ``S = R / (|h| + 1e-9)``:

* **Product of two activations**, twin ``|a| |b|``: ``r_a = a * (S b^T) + |a| * (S |b|^T)``,
  ``r_b`` likewise. ``paper``: the operands share the conserved mass by their contributions;
  ``head``: each operand is renormalised separately. A constant operand (a weight) takes no
  relevance: the product is then an affine op.
* **Softmax**, max and denominator constants (``dh_j/dx_j = h_j``). ``head`` twin = softmax(|x|):
  ``r = (x h + |x| h_abs) S``. ``paper`` twin = h: ``r = 2 x h S``, with its sign (see
  :class:`_CoefficientRule`).

The classic presets' product rule (the epsilon z-rule split 50/50, LXT style) is in
:mod:`lrpgraph.rules.transformer`.
See ``docs/abslrp.md`` for the method and the choices.
"""
from __future__ import annotations

import operator
from typing import Any, List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrpgraph.rule import EPS, NodeContext, memo, temp

from .abslrp import AbsLRP, AbsScale, _nonneg, one_pass_diagonal, one_pass_scale
from .abslrp_onepass import one_pass_signed
from .einsum import _parse_einsum, einsum_contributions  # noqa: F401  (re-exported)
from .statistics import activation_slots

MATMULS = (torch.matmul, operator.matmul, "matmul", torch.bmm, "bmm")
EINSUMS = (torch.einsum,)
SOFTMAXES = (nn.Softmax, torch.softmax, F.softmax, "softmax")
GUARD = 1e-12


def _activations(ctx: NodeContext) -> List[int]:
    """Slots holding tensors that depend on the input (constants are weights; a statistic of the
    other operand, as in ``x / x.sum(-1, keepdim=True)``, is a constant gate: see :mod:`.statistics`)."""
    return activation_slots(ctx, Tensor)


# --------------------------------------------------------------------------------------------
# products of two operands: matmul / bmm / einsum / mul


def _promote(a: Tensor, b: Tensor, s: Tensor):
    """Matmul of 1-D operands as 2-D (numpy rules); returns the squeeze plan for the results."""
    sq_a = sq_b = False
    if a.dim() == 1:
        a, sq_a = a.unsqueeze(0), True
        s = s.unsqueeze(-2)
    if b.dim() == 1:
        b, sq_b = b.unsqueeze(-1), True
        s = s.unsqueeze(-1)
    return a, b, s, sq_a, sq_b


def matmul_contributions(a: Tensor, b: Tensor, s: Tensor, want_a: bool = True, want_b: bool = True,
                         ctx: Optional[NodeContext] = None):
    """``a * (s b^T) + |a| * (s |b|^T)`` and ``b * (a^T s) + |b| * (|a|^T s)`` for ``h = a @ b``.

    ``s`` is ``(K, *h.shape)``. Non-negative operands (attention weights, post-ReLU values) take the
    one-product fast path ``2 a * (s b+^T)``; results may carry broadcast batch dims (the walker sums
    them back). With ``ctx``, ``|a|``, ``|b|`` and the sign checks are shared with the column mass.
    """
    a_pos, b_pos, abs_a, abs_b = _operand_facts(a, b, ctx)
    a, b, s, sq_a, sq_b = _promote(a, b, s)
    # with one operand non-negative the twin terms merge: a s b^T + |a| s |b|^T = a s (2 b+)^T
    # (a >= 0); 2 b+ once per call, contiguous, so neither product copies it
    twice_pos = (lambda t, key: t.clamp(min=0).mul_(2) if ctx is None else  # noqa: E731
                 memo(ctx, key, lambda: torch.clamp(t, min=0, out=temp(ctx, "product." + key, t)).mul_(2)))
    ra = rb = None
    if want_a:
        bt = b.transpose(-1, -2)
        if a_pos:
            ra = (s @ twice_pos(b, "2b+").transpose(-1, -2)).mul_(a)
        elif b_pos:
            ra = (s @ bt).mul_(twice_pos(a, "2a+"))
        else:  # each matmul result is a new tensor: accumulate in place (no fused addcmul, see AbsAffine)
            ra = (s @ bt).mul_(a).add_((s @ _promote_like(abs_b(), b).transpose(-1, -2)).mul_(_promote_like(abs_a(), a)))
        if sq_a:
            ra = ra.squeeze(-2)
    if want_b:
        at = a.transpose(-1, -2)
        if b_pos:
            rb = (twice_pos(a, "2a+").transpose(-1, -2) @ s).mul_(b)
        elif a_pos:
            rb = (at @ s).mul_(twice_pos(b, "2b+"))
        else:
            rb = (at @ s).mul_(b).add_((_promote_like(abs_a(), a).transpose(-1, -2) @ s).mul_(_promote_like(abs_b(), b)))
        if sq_b:
            rb = rb.squeeze(-1)
    return ra, rb


def _operand_facts(a: Tensor, b: Tensor, ctx: Optional[NodeContext]):
    """(a >= 0?, b >= 0?, |a| getter, |b| getter), memoised per node call when ``ctx`` is given."""
    if ctx is None:
        return _nonneg(a), _nonneg(b), a.abs, b.abs
    return (memo(ctx, "a>=0", lambda: _nonneg(a)), memo(ctx, "b>=0", lambda: _nonneg(b)),
            lambda: memo(ctx, "|a|", lambda: torch.abs(a, out=temp(ctx, "product.|a|", a))),
            lambda: memo(ctx, "|b|", lambda: torch.abs(b, out=temp(ctx, "product.|b|", b))))


def _promote_like(t: Tensor, promoted: Tensor) -> Tensor:
    """``t`` (an operand before :func:`_promote`) shaped like its promoted form."""
    return t.reshape(promoted.shape) if t.dim() != promoted.dim() else t


def _operands(ctx: NodeContext):
    """(einsum equation or None, a, b) of a two-operand product node."""
    if ctx.target is torch.einsum:
        eq = ctx.args[0]
        ops = ctx.args[1] if len(ctx.args) == 2 and isinstance(ctx.args[1], (list, tuple)) else ctx.args[1:]
        if len(ops) != 2:
            raise NotImplementedError(f"{ctx.describe()}: einsum with {len(ops)} operands; only two "
                                      "operands are supported (split it into pairwise einsums)")
        return eq, ops[0], ops[1]
    return None, ctx.args[0], ctx.args[1] if len(ctx.args) > 1 else ctx.kwargs.get("other")


def _slot_of(ctx: NodeContext, value) -> Optional[int]:
    for i, v in enumerate(ctx.inputs):
        if v is value:
            return i
    return None


class _Product(NamedTuple):
    """The operands of a product node and which of them take relevance (activations, not weights)."""

    eq: Optional[str]
    a: Any
    b: Any
    ia: Optional[int]
    ib: Optional[int]
    want_a: bool
    want_b: bool

    def place(self, ctx: NodeContext, ra: Optional[Tensor], rb: Optional[Tensor]) -> List[Optional[Tensor]]:
        """The per-slot relevance list (summed when both operands are the same slot: ``x * x``)."""
        out: List[Optional[Tensor]] = [None] * len(ctx.inputs)
        if self.want_a:
            out[self.ia] = ra
        if self.want_b:
            out[self.ib] = rb if self.ib != self.ia else out[self.ib] + rb
        return out


def _product(ctx: NodeContext) -> _Product:
    """The node's operands, once per node call (the one-pass scale, the column mass and the
    contributions all ask; finding the activation slots walks the graph)."""
    def find() -> _Product:
        eq, a, b = _operands(ctx)
        ia, ib = _slot_of(ctx, a), _slot_of(ctx, b)
        acts = set(_activations(ctx))
        return _Product(eq, a, b, ia, ib, ia in acts, ib in acts)
    return memo(ctx, "product", find)


class AbsProduct(AbsLRP):
    """absLRP for ``matmul``/``bmm``/``einsum``/``a * b`` with one or two activation operands."""

    kind = "abslrp.product"

    def __call__(self, ctx, relevance):
        if self.variant == "paper" and not ctx.report:
            p = _product(ctx)  # each activation operand's contributions add up to the mass below
            scaled = one_pass_scale(relevance, lambda buf: _product_mass(ctx, buf),
                                    lambda buf: self.denominator(ctx, buf), ctx, mass_scale=int(p.want_a) + int(p.want_b))
            return self.contributions(ctx, scaled)
        return super().__call__(ctx, relevance)

    def contributions(self, ctx, s):
        p = _product(ctx)
        eq, a, b, want_a, want_b = p.eq, p.a, p.b, p.want_a, p.want_b
        if not isinstance(a, Tensor) or not isinstance(b, Tensor):
            raise NotImplementedError(f"{ctx.describe()}: expected two tensor operands")
        if eq is not None:
            ra, rb = einsum_contributions(eq, a, b, s, want_a, want_b)
        elif ctx.target in MATMULS:
            ra, rb = matmul_contributions(a, b, s, want_a, want_b, ctx)
        else:  # element-wise product
            z = a * b
            c = (z + z.abs()) * s
            ra, rb = (c if want_a else None), (c if want_b else None)
        return p.place(ctx, ra, rb)


def attention_scale(ctx: NodeContext) -> bool:
    """Whether the node scales attention scores by a positive number right before a softmax
    (``softmax((q @ k^T) * scale)``, as timm's non-fused attention writes it). Neither code era
    applies a rule there: relevance passes through, as at :func:`lrpgraph.attention.scale_query`.
    (The scaling rule ``2 (c x)+ S`` would drop the entries with negative scores, where the
    signed softmax rule puts one sign stream's relevance.)"""
    node, plan = ctx.node, ctx.plan
    if node is None or plan is None or not node.users or len(_activations(ctx)) != 1:
        return False
    if ctx.target not in (operator.mul, torch.mul, "mul", operator.truediv, torch.div, "div"):
        return False
    c = [a for a in ctx.args if not isinstance(a, Tensor) and a is not None]
    if len(ctx.args) != 2 or len(c) != 1 or not isinstance(c[0], (int, float)) or c[0] <= 0:
        return False
    for u in node.users:
        key = type(plan.modules.get(u)) if u.op == "call_module" else u.target
        if key not in SOFTMAXES:
            return False
    return True


class AbsMul(AbsLRP):
    """``a * b`` / ``a / c``: a scaling by a constant (:class:`AbsScale`) or, for two
    activations, the product rule (:class:`AbsProduct`)."""

    kind = "abslrp.mul"

    def __init__(self, variant: str = "paper"):
        super().__init__(variant)
        self._scale = AbsScale(variant)
        self._product = AbsProduct(variant)

    def __call__(self, ctx, relevance):
        if attention_scale(ctx):  # as ``scale_query``: no rule at the attention scale
            return [relevance if i == _activations(ctx)[0] else None for i in range(len(ctx.inputs))]
        if len(_activations(ctx)) >= 2:
            if ctx.target in (operator.truediv, torch.div, "div", torch.true_divide):
                raise NotImplementedError(f"{ctx.describe()} divides by an activation that is not a "
                                          "statistic of the numerator (such as its sum or norm); no rule for that")
            return self._product(ctx, relevance)
        return super().__call__(ctx, relevance)

    def contributions(self, ctx, s):
        if len(_activations(ctx)) >= 2:
            if ctx.target in (operator.truediv, torch.div, "div", torch.true_divide):
                raise NotImplementedError(f"{ctx.describe()} divides two activations; no rule for that")
            return self._product.contributions(ctx, s)
        return self._scale.contributions(ctx, s)


# --------------------------------------------------------------------------------------------
# softmax


def _softmax_dim(ctx: NodeContext) -> int:
    if ctx.module is not None:
        d = ctx.module.dim
    else:
        d = ctx.kwargs.get("dim", ctx.args[1] if len(ctx.args) > 1 else None)
    if d is None:
        raise NotImplementedError(f"{ctx.describe()}: softmax without an explicit dim")
    return d


class _CoefficientRule(AbsLRP):
    """An element-wise absLRP rule whose contribution is ``coefficient(ctx) * S`` (softmax,
    LayerNorm).

    **Signs (paper variant).** The paper-era coefficients (``2 x h`` at the softmax,
    ``x (g + |g| sign(x - mu)) / s`` at LayerNorm) are negative for some entries (a negative score;
    ``mu < x < 0``), so part of a relevance stream changes sign there. ``signs="flip"`` (default)
    keeps them as the paper-era code does: each stream is rescaled to its own mass by its L1 norm
    (the report measures streams by their mass, so the node conserves both), and the flipped part
    cancels against the other stream where they are added. ``signs="keep"`` weighs entries by the
    coefficient's magnitude instead, so no stream changes sign (a conserving variant that is not
    the authors' map).
    """

    def __init__(self, variant: str = "paper", signs: str = "flip"):
        super().__init__(variant)
        if signs not in ("keep", "flip"):
            raise ValueError(f"signs must be 'keep' or 'flip', got {signs!r}")
        self.signs = signs

    def __call__(self, ctx, relevance):
        if self.variant == "paper" and not ctx.report:
            if self.signs == "keep":
                return one_pass_diagonal(self, ctx, relevance)
            return one_pass_signed(self, ctx, relevance)
        return super().__call__(ctx, relevance)

    def contributions(self, ctx, s):
        out: List[Optional[Tensor]] = [None] * len(ctx.inputs)
        out[0] = self.coefficient(ctx) * s
        return out

    def coefficient(self, ctx) -> Tensor:
        raise NotImplementedError

    def gain(self, ctx) -> Tensor:
        """``coefficient / denominator`` up to one positive constant factor, for the one-pass
        forms of the paper variant: they rescale each sign stream to its mass, which cancels it."""
        return self.coefficient(ctx).div_(self.denominator(ctx))


class AbsSoftmax(_CoefficientRule):
    """absLRP softmax (spec 2.7); entries the softmax gives exactly 0 (masked) take nothing.

    Args:
        variant: ``"paper"`` or ``"head"``.
        signs: paper variant only: ``"flip"`` (default) uses ``2 x h`` with its sign, as the
            paper-era code; ``"keep"`` weighs by ``|2 x h|`` (see :class:`_CoefficientRule`).
    """

    kind = "abslrp.softmax"

    def denominator(self, ctx) -> Tensor:
        """``|h| + 1e-9`` as ``h + 1e-9``: a softmax is non-negative (one pass fewer)."""
        return torch.add(ctx.output, EPS, out=temp(ctx, "den", ctx.output))

    def coefficient(self, ctx) -> Tensor:
        """The contribution per unit ``S``: ``2 |x| h`` / ``2 x h`` (paper), ``x h + |x| h_abs`` (head)."""
        c = self._paper_half(ctx)
        return c.mul_(2) if c is not None else self._guarded(ctx)

    def gain(self, ctx) -> Tensor:
        """``x h / (h + 1e-9)`` (paper, ``signs="flip"``; ``|x|`` for ``"keep"``): half the gain."""
        c = self._paper_half(ctx)
        return c.div_(self.denominator(ctx)) if c is not None else super().gain(ctx)

    def _paper_half(self, ctx) -> Optional[Tensor]:
        """Paper variant without masked (-inf) scores: ``x h`` (``|x| h``), in a scratch buffer.
        ``None`` otherwise (one reduction instead of the guard's select pass)."""
        x, h = ctx.inputs[0], ctx.output
        if self.variant != "paper" or not x.numel() or not bool(torch.isfinite(torch.stack(torch.aminmax(x))).all()):
            return None
        buf = temp(ctx, "coefficient", x)
        return torch.abs(x, out=buf).mul_(h) if self.signs == "keep" else torch.mul(x, h, out=buf)

    def _guarded(self, ctx) -> Tensor:
        """The coefficient where entries may be masked: those the softmax gives 0 take nothing."""
        x, h = ctx.inputs[0], ctx.output
        live = h > 0
        xs = torch.where(live, x, torch.zeros((), dtype=x.dtype, device=x.device))  # -inf * 0 guard
        if self.variant == "paper":
            c = 2 * (xs.abs() if self.signs == "keep" else xs) * h
        else:
            dim = _softmax_dim(ctx)
            ninf = torch.full((), float("-inf"), dtype=x.dtype, device=x.device)
            h_abs = torch.softmax(torch.where(live, xs.abs(), ninf), dim=dim)
            h_abs = torch.nan_to_num(h_abs, nan=0.0)  # rows masked entirely
            c = xs * h + xs.abs() * h_abs
        return c


def _product_mass(ctx: NodeContext, out: Optional[Tensor] = None) -> Tensor:
    """The column mass of a product per activation operand: the total contribution of one operand
    into each output, ``h + |a| |b|`` (for ``n`` activation operands the total is ``n`` times it);
    a matmul writes it into ``out`` when given (a free buffer shaped like the output)."""
    p = _product(ctx)
    eq, a, b = p.eq, p.a, p.b
    h = ctx.output
    if eq is not None:
        habs = torch.einsum(eq, a.abs(), b.abs())
    elif ctx.target in MATMULS:
        a_pos, b_pos, abs_a, abs_b = _operand_facts(a, b, ctx)
        left, right = (a if a_pos else abs_a()), (b if b_pos else abs_b())
        if out is not None and not torch.is_grad_enabled() and out.shape == h.shape and a.dim() > 1 and b.dim() > 1:
            return torch.matmul(left, right, out=out).add_(h)  # (baddbmm measured slower: it copies h first)
        habs = torch.matmul(left, right)
    else:
        habs = (a * b).abs()
    return torch.add(h, habs)
