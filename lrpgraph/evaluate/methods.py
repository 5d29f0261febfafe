"""Attribution methods to compare, all behind one signature ``(model, x, target) -> map like x``.

* every lrpgraph preset (``lrpgraph.composite_names()``), through a cached
  :class:`lrpgraph.Explainer` (traced once per model and preset); contrastive by default, as
  :func:`lrpgraph.explain` is (for absLRP: the target against all other classes);
* ``gradient``, ``gradient-x-input``, ``integrated-gradients`` (zero baseline, ``steps`` Riemann
  midpoints), ``smoothgrad`` (``n`` noisy copies, ``sigma`` relative to each image's value range,
  seeded) and ``random`` (seeded uniform noise): baselines computed with autograd.

``METHODS`` maps names to default instances; :func:`get_method` builds a fresh one (with its own
random state and cache) and accepts keyword arguments.
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch
from torch import Tensor, nn

import lrpgraph

from ._common import ExplainFn


def _input_grad(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """d logit_target / dx for each sample (parameters' .grad untouched)."""
    xi = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = model(xi)
        sel = out.gather(1, target.view(-1, 1).to(out.device)).sum()
        (g,) = torch.autograd.grad(sel, xi)
    return g


class LRPMethod:
    """An lrpgraph preset as an attribution method. Keeps one traced :class:`~lrpgraph.Explainer`
    per model (the last few models), so the hundreds of GAE calls trace only once."""

    def __init__(self, preset: str, contrastive: bool = True, cache_size: int = 4):
        self.preset, self.contrastive, self.cache_size = preset, contrastive, cache_size
        self._cache: Dict[int, tuple] = {}
        self.__name__ = preset

    def __repr__(self) -> str:
        return f"LRPMethod({self.preset!r}, contrastive={self.contrastive})"

    def explainer(self, model: nn.Module) -> "lrpgraph.Explainer":
        hit = self._cache.get(id(model))
        if hit is not None and hit[0] is model:
            return hit[1]
        ex = lrpgraph.Explainer(model, rules=self.preset)
        if len(self._cache) >= self.cache_size:
            self._cache.pop(next(iter(self._cache)))
        self._cache[id(model)] = (model, ex)
        return ex

    def __call__(self, model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        return self.explainer(model)(x, target, contrastive=self.contrastive, report=False).relevance


class Gradient:
    """The input gradient of the target logit."""

    __name__ = "gradient"

    def __call__(self, model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        return _input_grad(model, x, target)


class GradientXInput:
    """Gradient times input."""

    __name__ = "gradient-x-input"

    def __call__(self, model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        return _input_grad(model, x, target) * x


class IntegratedGradients:
    """Integrated gradients from a zero baseline: ``x * mean_k grad(x * (k + 0.5) / steps)``.

    ``batch_size`` bounds the number of interpolated inputs per backward pass.
    """

    __name__ = "integrated-gradients"

    def __init__(self, steps: int = 32, batch_size: int = 256):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.steps, self.batch_size = steps, batch_size

    def __call__(self, model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        alphas = (torch.arange(self.steps, device=x.device, dtype=x.dtype) + 0.5) / self.steps
        total = torch.zeros_like(x)
        per = max(1, self.batch_size // x.shape[0])                 # alphas per backward
        for s in range(0, self.steps, per):
            a = alphas[s:s + per]
            xs = (a.view(-1, *([1] * x.dim())) * x.unsqueeze(0)).reshape(-1, *x.shape[1:])
            g = _input_grad(model, xs, target.repeat(a.shape[0]))
            total += g.view(a.shape[0], *x.shape).sum(0)
        return x * total / self.steps


class SmoothGrad:
    """SmoothGrad: the mean input gradient over ``n`` copies with Gaussian noise of standard deviation
    ``sigma * (max(x) - min(x))`` per image. Seeded: a fresh instance gives the same sequence."""

    __name__ = "smoothgrad"

    def __init__(self, n: int = 16, sigma: float = 0.15, seed: int = 0, batch_size: int = 256):
        if n < 1 or sigma < 0:
            raise ValueError(f"need n >= 1 and sigma >= 0, got n={n}, sigma={sigma}")
        self.n, self.sigma, self.seed, self.batch_size = n, sigma, seed, batch_size
        self.reset()

    def reset(self) -> None:
        """Restart the noise sequence."""
        self._gen = torch.Generator(device="cpu").manual_seed(self.seed)

    def __call__(self, model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        rng = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(-1, *([1] * (x.dim() - 1)))
        total = torch.zeros_like(x)
        per = max(1, self.batch_size // x.shape[0])
        for s in range(0, self.n, per):
            k = min(per, self.n - s)
            noise = torch.randn((k, *x.shape), generator=self._gen, dtype=x.dtype).to(x.device)
            xs = (x.unsqueeze(0) + noise * self.sigma * rng.unsqueeze(0)).reshape(-1, *x.shape[1:])
            total += _input_grad(model, xs, target.repeat(k)).view(k, *x.shape).sum(0)
        return total / self.n


class RandomMap:
    """Uniform noise in [0, 1) shaped like ``x``, independent of the model: the floor every method
    should beat. Seeded: a fresh instance (or ``reset()``) gives the same sequence of maps."""

    __name__ = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.reset()

    def reset(self) -> None:
        """Restart the random sequence."""
        self._gen = torch.Generator(device="cpu").manual_seed(self.seed)

    def __call__(self, model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        return torch.rand(x.shape, generator=self._gen, dtype=x.dtype).to(x.device)


BASELINES: Dict[str, Callable[..., ExplainFn]] = {
    "gradient": Gradient,
    "gradient-x-input": GradientXInput,
    "integrated-gradients": IntegratedGradients,
    "smoothgrad": SmoothGrad,
    "random": RandomMap,
}

#: short names accepted by :func:`get_method` and the CLI
ALIASES = {"grad": "gradient", "gxi": "gradient-x-input", "gradxinput": "gradient-x-input",
           "ig": "integrated-gradients", "sg": "smoothgrad"}


def method_names() -> List[str]:
    """Every method name: the lrpgraph presets, then the baselines."""
    return list(lrpgraph.composite_names()) + list(BASELINES)


def get_method(name: str, **kwargs) -> ExplainFn:
    """A fresh attribution method ``(model, x, target) -> map`` by name (see :func:`method_names`).

    ``kwargs`` go to the constructor (``contrastive=`` for presets, ``steps=`` for IG, ``n=``,
    ``sigma=``, ``seed=`` for SmoothGrad, ``seed=`` for random).
    """
    key = ALIASES.get(name, name)
    if key in BASELINES:
        return BASELINES[key](**kwargs)
    if key in lrpgraph.composite_names():
        return LRPMethod(key, **kwargs)
    raise KeyError(f"unknown attribution method {name!r}; choose from {method_names()} "
                   f"(aliases {sorted(ALIASES)})")


class _Registry(dict):
    """``METHODS[name]``: the default instance of each method; presets registered later (by other
    modules) are looked up on access."""

    def __missing__(self, key: str) -> ExplainFn:
        m = get_method(key)
        self[key] = m
        return m


METHODS: Dict[str, ExplainFn] = _Registry({n: get_method(n) for n in method_names()})
