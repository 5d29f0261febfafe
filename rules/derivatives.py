"""Element-wise activation functions and their explicit derivatives, shared by the absLRP and
the classic element-wise rules (``x f'(x)`` needs ``f'`` as tensor maths, never autograd), and
:func:`_bind`, which picks the variant a module or call asks for (LeakyReLU slope, tanh GELU)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _bind(f, df, ctx):
    """Element-wise functions may depend on the module (LeakyReLU slope, GELU approximation)."""
    m = ctx.module
    if m is not None and hasattr(m, "negative_slope"):
        a = m.negative_slope
        return (lambda x: F.leaky_relu(x, a)), (lambda x: _leaky_slope(x, a))
    if ctx.kwargs.get("negative_slope") is not None or (ctx.target is F.leaky_relu and len(ctx.args) > 1):
        a = ctx.kwargs.get("negative_slope", ctx.args[1] if len(ctx.args) > 1 else 0.01)
        return (lambda x: F.leaky_relu(x, a)), (lambda x: _leaky_slope(x, a))
    approx = getattr(m, "approximate", None) or ctx.kwargs.get("approximate")
    if approx == "tanh" and f is gelu_erf:
        return gelu_tanh, d_gelu_tanh
    return f, df


# explicit derivatives -------------------------------------------------------------------------

def d_relu(x: Tensor) -> Tensor:
    return (x > 0).to(x.dtype)


def d_sigmoid(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 - s)


def d_tanh(x: Tensor) -> Tensor:
    return 1 - torch.tanh(x) ** 2


def d_silu(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def gelu_erf(x: Tensor) -> Tensor:
    return F.gelu(x)


def d_gelu_erf(x: Tensor) -> Tensor:
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return cdf + x * pdf


def gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def d_gelu_tanh(x: Tensor) -> Tensor:
    c = math.sqrt(2 / math.pi)
    u = c * (x + 0.044715 * x ** 3)
    t = torch.tanh(u)
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)


def _leaky_slope(x: Tensor, a: float) -> Tensor:
    """1 where x > 0, else ``a``, in x's dtype. (``torch.where(x > 0, 1.0, a)`` builds the scalars in
    the default dtype, float32, so a float64 slope such as 0.01 came back rounded to ~1e-8.)"""
    return torch.where(x > 0, torch.ones_like(x), torch.full_like(x, a))


def d_leaky(x: Tensor) -> Tensor:  # default slope; module slopes are bound in _bind
    return _leaky_slope(x, 0.01)


ELEMENTWISE = {
    "relu": (F.relu, d_relu),
    "leaky_relu": (F.leaky_relu, d_leaky),
    "gelu": (gelu_erf, d_gelu_erf),
    "silu": (F.silu, d_silu),
    "sigmoid": (torch.sigmoid, d_sigmoid),
    "tanh": (torch.tanh, d_tanh),
}
