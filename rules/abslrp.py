"""absLRP: relative absolute magnitude LRP (Vukadin et al., ACM TIST 2024).

The method page is ``docs/abslrp.md``. Every rule here computes the building block of absLRP,

    r_k = a_k * VJP_{a_k}(h + h_abs)[S],   S = R / (|h| + 1e-9),

written as explicit tensor maths per op (for an affine op: ``x * (W^T S) + |x| * (|W|^T S)``).
Two variants share it:

* ``"paper"`` (preset ``abslrp``, spec 1.3): S is split into its positive and negative parts,
  both pushed through in one batched call, and the positive and negative relevance masses are
  conserved separately, jointly over all inputs of the node (so a residual addition splits by
  each summand's positive contribution, spec 2.9). Non-parametric element-wise ops use the twin
  ``|f(x)|`` (spec 2.4).
* ``"head"`` (preset ``abslrp-renorm``, spec 1.1): the raw ``r_k`` is returned; the walker
  measures it for the conservation report and then renormalises every input to unit L1 mass
  (so residual additions split 50/50). Element-wise ops use the twin ``f(|x|)``.
"""
from __future__ import annotations

import math
import operator
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrpgraph.rule import EPS, NodeContext, Rule, conserve_diagonal, conserve_signs, memo, temp

from .abslrp_onepass import one_pass_diagonal, one_pass_scale  # noqa: F401  (re-exported)
from .affine import LinearAffine, affine_of
from .statistics import activation_slots
from .derivatives import (ELEMENTWISE, _bind, _leaky_slope, d_gelu_erf, d_gelu_tanh, d_leaky,  # noqa: F401
                          d_relu, d_sigmoid, d_silu, d_tanh, gelu_erf, gelu_tanh)  # (re-exported)

VARIANTS = ("paper", "head")


class AbsLRP(Rule):
    """Base of the absLRP rules: subclasses implement :meth:`contributions`.

    Args:
        variant: ``"paper"`` (sign-split, conserving) or ``"head"`` (raw, renormalised by the walker).
        divide: divide the relevance by ``|h|`` (spec ``divide_relevance``; ``False`` only for the
            reference's VGG max-pool variant).
    """

    kind = "abslrp"
    #: r+ >= 0 and r- <= 0 by construction (the 2 z+ form); lets the sign split skip abs()
    signs_known = False

    def __init__(self, variant: str = "paper", divide: bool = True):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.variant = variant
        self.divide = divide
        self.renormalise = variant == "head"

    @property
    def name(self) -> str:
        return f"{self.kind}[{self.variant}]"

    @property
    def per_sample(self) -> bool:
        """The paper variant conserves each sample's sign masses with sums that take the batch to
        be the first axis; the walker refuses a node whose tensors have it elsewhere."""
        return self.variant == "paper"

    def denominator(self, ctx: NodeContext, out: Optional[Tensor] = None) -> Tensor:
        """``|h| + 1e-9``, in ``out`` or a scratch buffer (valid while the rule runs)."""
        return torch.abs(ctx.output, out=out if out is not None else temp(ctx, "den", ctx.output)).add_(EPS)

    def contributions(self, ctx: NodeContext, s: Tensor) -> List[Optional[Tensor]]:
        """``a_k * VJP_{a_k}(h + h_abs)[s]`` for every slot (linear in ``s``)."""
        raise NotImplementedError

    def gains(self, ctx: NodeContext) -> Optional[List[Optional[Tensor]]]:
        """For element-wise rules: ``g_k`` with ``r_k = g_k * R`` and ``g_k >= 0`` (the divisor
        included), which allows the fast :func:`conserve_diagonal`. ``None``: use the general path.
        The paper variant's gains may all carry one positive constant factor: the conservation
        rescales each sign stream to its mass, which cancels it."""
        return None

    def __call__(self, ctx: NodeContext, relevance: Tensor):
        g = self.gains(ctx) if self.divide else None
        if g is not None:
            if self.variant == "paper":
                return conserve_diagonal(relevance, g, ctx)
            return [None if gk is None else gk * relevance for gk in g]
        den = self.denominator(ctx) if self.divide else torch.ones((), dtype=relevance.dtype,
                                                                   device=relevance.device)
        if self.variant == "paper":
            return conserve_signs(relevance, lambda s: self.contributions(ctx, s), den,
                                  signs_known=self.signs_known)
        return self.contributions(ctx, relevance / den)


def _nonneg(x: Tensor) -> bool:
    """Whether every entry of ``x`` is >= 0. A signed activation (after LayerNorm, GELU, a
    projection) usually shows a negative entry within its first row, so a short prefix is scanned
    first and the full reduction runs only where the prefix is non-negative (exact either way)."""
    if x.numel() == 0:
        return True
    if x.numel() > 8192:
        head = x.reshape(-1)[:4096] if x.is_contiguous() else x[(0,) * (x.dim() - 1)]
        if bool(head.min() < 0):
            return False
    return bool(x.min() >= 0)  # a reduction, no boolean temporary


class AbsAffine(AbsLRP):
    """Linear, Conv1d/2d/3d, BatchNorm (one stage), average pools, means, resampling:
    ``x*(W^T S) + |x|*(|W|^T S)``.

    For non-negative inputs (after a ReLU) this is ``2 x * (W+^T S)``: one transposed product.
    """

    kind = "abslrp.affine"
    signs_known = True

    def __call__(self, ctx, relevance):
        linear = isinstance(ctx.module, nn.Linear) or ctx.target is F.linear
        if linear and self.variant == "paper" and self.divide and ctx.options.get("out_groups") is not None:
            from .abslrp_routing import grouped_affine  # a fused projection split into chunks
            return grouped_affine(self, ctx, relevance, ctx.options["out_groups"])
        if self.variant != "paper" or ctx.report or not self.divide or not linear:
            return super().__call__(ctx, relevance)
        # the one-pass form (see above): no second sign stream
        scaled = one_pass_scale(relevance, lambda buf: self.column_mass(ctx, buf),
                                lambda buf: self.denominator(ctx, buf), ctx)
        return self.contributions(ctx, scaled)

    def column_mass(self, ctx: NodeContext, out: Optional[Tensor] = None) -> Tensor:
        """Linear: ``C = (h - b) + |x| |W|^T``, the total contribution into each output (written
        into ``out`` if given, a free buffer shaped like the output)."""
        op = memo(ctx, "affine", lambda: affine_of(ctx))
        x = ctx.inputs[op.slot]
        xa = x if memo(ctx, "x>=0", lambda: _nonneg(x)) else _abs_input(ctx, x)
        wa = _abs_weight(ctx, op.weight)
        h = ctx.output
        if out is None or torch.is_grad_enabled() or not (out.is_contiguous() and h.is_contiguous() and xa.is_contiguous()):
            return F.linear(xa, wa, None if op.bias is None else -op.bias).add_(h)
        c = torch.addmm(h.reshape(-1, h.shape[-1]), xa.reshape(-1, xa.shape[-1]), wa.T,
                        out=out.view(-1, out.shape[-1]))
        if op.bias is not None:
            c.sub_(op.bias)
        return out

    def contributions(self, ctx, s):
        op = memo(ctx, "affine", lambda: affine_of(ctx))
        x = ctx.inputs[op.slot]
        w = op.weight
        if w is None and op.signed:  # signed implicit matrices (bicubic): |W| is their |.|, separable too
            r = x * op.transpose(s, None) + _abs_input(ctx, x) * memo(ctx, "|op|", op.absolute).transpose(s, None)
        elif w is None or (op.scan_weight_sign and memo(ctx, "W>=0", lambda: _nonneg(w))):  # pooling kernels: W = |W|
            r = (x + memo(ctx, "|x|", x.abs)) * op.transpose(s, w)
        elif memo(ctx, "x>=0", lambda: _nonneg(x)):
            wp = torch.clamp(w, min=0, out=temp(ctx, "affine.W+", w))
            if isinstance(op, LinearAffine):  # s @ W+ is a new tensor: in place
                r = op.transpose(s, wp).mul_(x).mul_(2)
            else:
                r = 2 * x * op.transpose(s, wp)
        elif isinstance(op, LinearAffine):  # s @ W is a new tensor: accumulate in place
            # (no addcmul: a fused multiply-add would leave rounding residue where the two terms
            # cancel exactly, and a stream's rescale would then blow that residue up)
            wa = _abs_weight(ctx, w)
            v = torch.matmul(s, wa, out=temp(ctx, "affine.v", s, tuple(s.shape[:-1]) + (wa.shape[1],)))
            r = op.transpose(s, w).mul_(x).add_(v.mul_(_abs_input(ctx, x)))
        else:
            r = x * op.transpose(s, w) + memo(ctx, "|x|", x.abs) * op.transpose(s, _abs_weight(ctx, w))
        return op.place(r)


def _abs_weight(ctx: NodeContext, w: Tensor) -> Tensor:
    """``|W|`` of an affine node's weight, once per node call, in a scratch buffer (a fresh
    allocation of a large weight's size is page-faulted in on every call)."""
    return memo(ctx, "|W|", lambda: torch.abs(w, out=temp(ctx, "affine.|W|", w)))


def _abs_input(ctx: NodeContext, x: Tensor) -> Tensor:
    """``|x|`` of an affine node's input, once per node call, in a scratch buffer."""
    return memo(ctx, "|x|", lambda: torch.abs(x, out=temp(ctx, "affine.|x|", x)))


class AbsBatchNormTwoStage(AbsLRP):
    """Paper-era BatchNorm (spec 2.3): normalise ``h1 = (x - mu)/sigma`` then affine ``g*h1 + b``,
    each stage its own sign-split conserving step; relevance reaches only ``x > 0``."""

    kind = "abslrp.batchnorm2"

    def __call__(self, ctx, relevance):
        m = ctx.module
        if m.training or m.running_mean is None:
            affine_of(ctx)  # raises the explanatory error
        x = ctx.inputs[0]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        sigma = torch.sqrt(m.running_var + m.eps).reshape(shape)
        mu = m.running_mean.reshape(shape)
        gamma = (m.weight if m.weight is not None else torch.ones_like(m.running_var)).reshape(shape)
        h1 = (x - mu) / sigma
        # stage 2: h = gamma*h1 + beta, twin |gamma||h1| + |beta|: r = 2 (gamma h1)+ R / |h|
        # stage 1: h1 = (x - mu)/sigma, twin (|x| - |mu|)/sqrt(|var| + eps): r = 2 x+ / sigma R / |h1|
        # Both gains are >= 0 and element-wise, so conserving after each stage equals conserving
        # once with their product (per-sign rescales commute): one pass instead of two.
        g = (4 * (gamma * h1).clamp(min=0) / (ctx.output.abs() + EPS)) * (x.clamp(min=0) / sigma / (h1.abs() + EPS))
        return conserve_diagonal(relevance, [g], ctx)


class AbsAdd(AbsLRP):
    """Residual and other additions ``a + b``: ``r_a = 2 a+ * S``, ``r_b = 2 b+ * S`` (twin ``|a|+|b|``).

    ``paper``: joint conservation gives each summand its share of the positive contribution.
    ``head``: each summand is renormalised to unit mass (a fixed 50/50 split).
    Constant summands (numbers) take no relevance slot; their share is absorbed.
    """

    kind = "abslrp.add"

    def __call__(self, ctx, relevance):
        if self.variant == "head":  # a shortcut that feeds its own branch: the current code's term
            from .residual import residual_head
            out = residual_head(self, ctx, relevance)
            if out is not None:
                return out
        return super().__call__(ctx, relevance)

    def contributions(self, ctx, s):
        out = []
        for v in ctx.inputs:
            out.append(None if not isinstance(v, Tensor) else 2 * v.clamp(min=0) * s)
        return out

    def gains(self, ctx):
        inv = self.denominator(ctx).reciprocal_()
        if self.variant == "head":  # raw values; the paper variant's conservation cancels the 2
            inv.mul_(2)
        return [None if not isinstance(v, Tensor) else
                torch.clamp(v, min=0, out=temp(ctx, f"add.gain{i}", v)).mul_(inv) if v.shape == inv.shape
                else v.clamp(min=0) * inv for i, v in enumerate(ctx.inputs)]


class AbsScale(AbsLRP):
    """Multiplication by a constant (number or parameter) ``y = c * x``: ``r_x = 2 (c x)+ * S``."""

    kind = "abslrp.scale"

    def contributions(self, ctx, s):
        i, x, c = constant_operand(ctx)
        out: List[Optional[Tensor]] = [None] * len(ctx.inputs)
        out[i] = 2 * (c * x).clamp(min=0) * s
        return out

    def gains(self, ctx):
        i, x, c = constant_operand(ctx)
        out: List[Optional[Tensor]] = [None] * len(ctx.inputs)
        out[i] = 2 * (c * x).clamp(min=0) / self.denominator(ctx)
        return out


def constant_operand(ctx: NodeContext):
    """For ``x * c`` or ``x / c`` with one activation ``x``: (slot of x, x, multiplier c). A
    statistic of ``x`` (``x / x.sum(-1, keepdim=True)``, see :mod:`.statistics`) counts as a constant."""
    acts = activation_slots(ctx)
    if len(acts) != 1:
        raise NotImplementedError(f"{ctx.describe()} combines {len(acts)} activations; a product "
                                  "of activations needs a product rule (see the transformer rules)")
    i = acts[0]
    x = ctx.inputs[i]
    a, b = ctx.args[0], ctx.args[1]
    other = b if a is x else a
    if ctx.target in (operator.truediv, torch.div, "div", torch.true_divide):
        if a is not x:
            raise NotImplementedError(f"{ctx.describe()} divides by an activation")
        other = 1.0 / other
    return i, x, other


class AbsElementwise(AbsLRP):
    """Element-wise activation ``y = f(x)`` with an explicit derivative ``df``.

    ``head`` twin ``f(|x|)``: ``r = [x f'(x) + |x| f'(|x|)] * S``.
    ``paper`` twin ``|f(x)|``: ``r = x f'(x) (1 + sign f(x)) * S``.
    """

    kind = "abslrp.elementwise"

    def __init__(self, f: Callable[[Tensor], Tensor], df: Callable[[Tensor], Tensor],
                 variant: str = "paper", label: str = ""):
        super().__init__(variant)
        self.f, self.df, self.label = f, df, label

    @property
    def name(self) -> str:
        return f"abslrp.{self.label or 'elementwise'}[{self.variant}]"

    def contributions(self, ctx, s):
        x = ctx.inputs[0]
        f, df = _bind(self.f, self.df, ctx)
        if s.shape[1:] != x.shape:  # nn.Flatten: element-wise, but the output is reshaped
            s = s.reshape((s.shape[0],) + tuple(x.shape))
        if self.variant == "head":
            g = x * df(x) + x.abs() * df(x.abs())
        else:
            y = ctx.output.reshape(x.shape)
            g = x * df(x) * (1 + torch.sign(y))
        out: List[Optional[Tensor]] = [None] * len(ctx.inputs)
        out[0] = g * s
        return out

    def gains(self, ctx):
        x = ctx.inputs[0]
        if self.label not in NONNEG_GAIN or tuple(ctx.output_shape) != tuple(x.shape):
            # sigmoid: x f'(x) < 0 for x < 0, so streams may cross; nn.Flatten reshapes: general path
            return None
        f, df = _bind(self.f, self.df, ctx)
        y = ctx.output.reshape(x.shape)
        out: List[Optional[Tensor]] = [None] * len(ctx.inputs)
        if self.variant == "paper" and f is gelu_erf:
            out[0] = _gelu_paper_gain(x, y, ctx)
            return out
        if self.variant == "head":
            g = x * df(x) + x.abs() * df(x.abs())
        else:
            g = (x * df(x)).mul_(torch.sign(y).add_(1))
        if self.label not in ("relu", "identity", "leaky_relu"):
            g = g.clamp_(min=0)  # exact 0 where rounding would give -0.0-ish values
        out[0] = g.div_(y.abs().add_(EPS))
        return out


def _gelu_paper_gain(x: Tensor, y: Tensor, ctx: Optional[NodeContext] = None) -> Tensor:
    """The paper gain of the exact GELU, ``x gelu'(x) (1 + sign y) / (|y| + eps)``, in few passes,
    times the constant ``sqrt(2 pi) / 2``, which the paper variant's conservation cancels.

    ``y = x Phi(x)`` is positive exactly where ``x`` is, and there ``x gelu'(x) = y + x^2 phi(x)``
    with ``phi(x) = exp(-x^2 / 2) / sqrt(2 pi)``: the recorded output replaces the erf, and
    ``x <= 0`` gives 0 (``x+ = 0`` and ``y+ = 0``). With ``ctx`` the gain is a scratch buffer
    (valid while the rule runs).
    """
    q = torch.clamp(x, min=0, out=temp(ctx, "gelu.x2", x))
    q.mul_(q)  # (x+)^2
    g = torch.mul(q, -0.5, out=temp(ctx, "gelu.gain", x)).exp_().mul_(q)
    yp = torch.clamp(y, min=0, out=temp(ctx, "gelu.x2", x))  # the (x+)^2 buffer, no longer needed
    g.add_(yp, alpha=math.sqrt(2 * math.pi))
    return g.div_(yp.add_(EPS))


#: activations whose gain x f'(x)(1 + sign f(x)) (paper) and x f'(x) + |x| f'(|x|) (head) is >= 0
NONNEG_GAIN = ("relu", "leaky_relu", "gelu", "silu", "tanh", "identity")




class AbsMaxPool(AbsLRP):
    """Max pooling: relevance to the arg-max input of each window (overlaps accumulate).

    ``head`` twin ``maxpool(|x|)``: ``r = x * scatter_x(S) + |x| * scatter_|x|(S)``.
    ``paper`` twin ``|h|``: ``r = x * scatter_x((1 + sign h) S)``. With ``divide=True`` (default)
    ``S = R/|h|`` so a positive winner gets ``2R``; ``divide=False`` is the reference's VGG variant.
    """

    kind = "abslrp.maxpool"
    signs_known = True

    def contributions(self, ctx, s):
        x = ctx.inputs[0]
        cfg = maxpool_config(ctx)
        if not bool(torch.isfinite(x).all()):  # -inf padding (timm's "same" max-pool) never wins a
            x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))  # window with a finite entry
            cfg = {**cfg, "winners_of": ctx.inputs[0]}
        if self.variant == "paper":
            r = x * scatter_max(x, (1 + torch.sign(ctx.output)) * s, cfg)
        elif _nonneg(x):
            r = 2 * x * scatter_max(x, s, cfg)
        else:
            r = x * scatter_max(x, s, cfg) + x.abs() * scatter_max(x.abs(), s, cfg)
        out: List[Optional[Tensor]] = [None] * len(ctx.inputs)
        out[0] = r
        return out


_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def maxpool_config(ctx: NodeContext) -> dict:
    """Kernel, stride, padding, dilation and ceil_mode of a max-pool node (module or function)."""
    m = ctx.module
    nd = len(ctx.input_shapes[0]) - 2
    if m is not None:
        return dict(nd=nd, kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
                    dilation=m.dilation, ceil_mode=m.ceil_mode)
    a = list(ctx.args) + [None] * 6
    kw = ctx.kwargs
    get = lambda i, n, d: kw.get(n, a[i] if a[i] is not None else d)  # noqa: E731
    ks = get(1, "kernel_size", None)
    return dict(nd=nd, kernel_size=ks, stride=get(2, "stride", None) or ks, padding=get(3, "padding", 0),
                dilation=get(4, "dilation", 1), ceil_mode=get(5, "ceil_mode", False))


def scatter_max(x: Tensor, s: Tensor, cfg: dict) -> Tensor:
    """Route ``s`` (``(K, *out)``) to the arg-max input of each window of ``x``: ``(K, *x.shape)``."""
    nd = cfg["nd"]
    x = cfg.get("winners_of", x)  # the arg-max of the values as recorded (padding included)
    _, idx = _MAXPOOL[nd](x, cfg["kernel_size"], cfg["stride"], cfg["padding"], cfg["dilation"],
                          cfg["ceil_mode"], return_indices=True)
    k = s.shape[0]
    spatial = int(torch.tensor(x.shape[2:]).prod())
    flat_idx = idx.reshape(1, x.shape[0], x.shape[1], -1).expand(k, -1, -1, -1)
    out = torch.zeros((k, x.shape[0], x.shape[1], spatial), dtype=s.dtype, device=s.device)
    out.scatter_add_(-1, flat_idx, s.reshape(k, x.shape[0], x.shape[1], -1))
    return out.reshape((k,) + tuple(x.shape))
