"""Perturbation curves: MoRF (most relevant first), LeRF (least relevant first), ABPC, the area
between them (``AUC(LeRF) - AUC(MoRF)``, higher is better; pnpxai ``AbPC``), and SRG, the Symmetric
Relevance Gain of Blücher, Vielhaben and Strodthoff (TMLR 2024): the same area in their setting
(patches filled with the per-channel dataset mean, 100 steps, logit).

Conventions, all constructor parameters:

* ``unit``: ``"element"`` (each entry, channels independently, as Quantus ``PixelFlipping`` and GAE),
  ``"pixel"`` (all channels of a pixel together, as xplique and Chefer) or ``"patch"``
  (``patch_size`` squares, as Quantus ``RegionPerturbation``; edge patches may be smaller).
* channel reduction of the map for pixels and patches: ``"sum"`` (default, the LRP convention),
  ``"mean"``, ``"max"`` or ``"abs"`` (sum of absolute values); a patch's relevance is the sum over
  its pixels.
* ``baseline``: a number (0 = the dataset mean for standardised inputs), one value per channel (a
  sequence or a ``(C,)`` tensor, e.g. the training set's per-channel mean), ``"dataset-mean"`` (the
  per-channel mean over every image passed in one call: an estimate of the dataset mean),
  ``"mean"`` (each image's own per-channel mean), ``"black"`` (each image's minimum, Quantus'
  "black") or a callable ``x -> tensor broadcastable to x``.
* step schedule: ``steps`` equal steps from 0 % to 100 % of the units, or ``features_per_step``
  as a count (int) or a fraction (float); the 0 % point is included unless ``include_zero=False``.
* ``score``: the target's ``"logit"`` or softmax ``"probability"``.
* AUC: trapezoid over the fraction of units removed, an x-axis in [0, 1] (not ``dx=1``).
* ties in the map are ordered by ``torch.argsort(..., stable=True)`` (lower index first).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ._common import (EvaluationError, ExplainFn, MetricResult, check_inputs, check_map, check_targets,
                      progress)

Baseline = Union[float, int, str, Sequence[float], Tensor, Callable[[Tensor], Tensor]]


@dataclasses.dataclass
class CurveResult(MetricResult):
    """A perturbation curve per sample.

    Attributes:
        curve: ``(N, S)`` score of the target after removing ``steps[i]`` of the units.
        steps: ``(S,)`` the fraction of units removed at each point (the x-axis, in [0, 1]).
        auc: ``(N,)`` trapezoid area under ``curve`` over ``steps``.
        target: ``(N,)`` the class whose score is tracked.
    """

    curve: Tensor
    steps: Tensor
    auc: Tensor
    target: Tensor


@dataclasses.dataclass
class ABPCResult(MetricResult):
    """Area between the perturbation curves, ``auc(LeRF) - auc(MoRF)`` per sample (higher is better)."""

    abpc: Tensor
    morf: CurveResult
    lerf: CurveResult

    def aggregate(self):
        out = {"abpc": float(self.abpc.float().mean())}
        out["morf_auc"] = float(self.morf.auc.float().mean())
        out["lerf_auc"] = float(self.lerf.auc.float().mean())
        return out


class _Perturbation:
    """Shared machinery of :class:`MoRF`, :class:`LeRF` and :class:`ABPC`."""

    def __init__(self, unit: str = "pixel", patch_size: Union[int, Tuple[int, int]] = 4,
                 baseline: Baseline = 0.0, steps: int = 10,
                 features_per_step: Optional[Union[int, float]] = None, include_zero: bool = True,
                 score: str = "logit", channel_reduce: str = "sum", batch_size: int = 64,
                 progress: bool = True):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if unit not in ("element", "pixel", "patch"):
            raise ValueError(f"unit must be 'element', 'pixel' or 'patch', got {unit!r}")
        if score not in ("logit", "probability"):
            raise ValueError(f"score must be 'logit' or 'probability', got {score!r}")
        if channel_reduce not in ("sum", "mean", "max", "abs"):
            raise ValueError(f"channel_reduce must be 'sum', 'mean', 'max' or 'abs', got {channel_reduce!r}")
        if isinstance(baseline, str) and baseline not in ("mean", "black", "dataset-mean"):
            raise ValueError(f"baseline must be a number, per-channel values, 'dataset-mean', 'mean', "
                             f"'black' or a callable, got {baseline!r}")
        if isinstance(baseline, (list, tuple, Tensor)):
            baseline = torch.as_tensor(baseline, dtype=torch.float64).flatten()
        if features_per_step is None and (not isinstance(steps, int) or steps < 1):
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        if features_per_step is not None:
            ok = (isinstance(features_per_step, int) and features_per_step >= 1) or \
                 (isinstance(features_per_step, float) and 0 < features_per_step <= 1)
            if not ok:
                raise ValueError("features_per_step must be a count (int >= 1) or a fraction (float in "
                                 f"(0, 1]), got {features_per_step!r}")
        ps = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        if len(ps) != 2 or min(ps) < 1:
            raise ValueError(f"patch_size must be an int or (h, w) >= 1, got {patch_size!r}")
        self.unit, self.patch_size, self.baseline = unit, ps, baseline
        self.steps, self.features_per_step, self.include_zero = steps, features_per_step, include_zero
        self.score, self.channel_reduce = score, channel_reduce
        self.batch_size, self.progress = batch_size, progress

    # -- units ------------------------------------------------------------------------------

    def _unit_index(self, x: Tensor) -> Tuple[Tensor, int]:
        """``(index shaped like one sample (or (1, H, W) for pixels/patches), number of units)``."""
        shape = x.shape[1:]
        dev = x.device
        if self.unit == "element":
            n = int(torch.tensor(shape).prod()) if len(shape) else 1
            return torch.arange(n, device=dev).view(shape), n
        if x.dim() != 4:
            raise EvaluationError(f"unit={self.unit!r} needs image batches (N, C, H, W), got shape "
                                  f"{tuple(x.shape)}; use unit='element' for other inputs")
        H, W = shape[-2:]
        ph, pw = (1, 1) if self.unit == "pixel" else self.patch_size
        nw = -(-W // pw)
        rows = torch.arange(H, device=dev) // ph
        cols = torch.arange(W, device=dev) // pw
        idx = rows.view(H, 1) * nw + cols.view(1, W)
        return idx.view(1, H, W), (-(-H // ph)) * nw

    def _unit_relevance(self, a: Tensor, idx: Tensor, n: int) -> Tensor:
        if self.unit != "element":
            red = self.channel_reduce
            a = (a.sum(1) if red == "sum" else a.mean(1) if red == "mean" else
                 a.amax(1) if red == "max" else a.abs().sum(1)).unsqueeze(1)
        flat = a.flatten(1).to(torch.float64)
        out = torch.zeros(a.shape[0], n, dtype=flat.dtype, device=a.device)
        return out.scatter_add_(1, idx.flatten().expand_as(flat), flat)

    def _schedule(self, n: int) -> Tensor:
        """Number of units removed at each point, 0 (optional) ... n."""
        if self.features_per_step is None:
            k = [(i * n) // self.steps for i in range(self.steps + 1)]
        else:
            c = self.features_per_step if isinstance(self.features_per_step, int) else \
                max(1, round(self.features_per_step * n))
            k = list(range(0, n, c)) + [n]
        if not self.include_zero:
            k = k[1:]
        return torch.tensor(sorted(set(k)), dtype=torch.long)

    def _baseline(self, x: Tensor) -> Tensor:
        b = self.baseline
        if callable(b):
            v = b(x)
        elif isinstance(b, Tensor):                                    # one value per channel
            if x.dim() < 2 or b.numel() != x.shape[1]:
                raise EvaluationError(f"the baseline has {b.numel()} per-channel values but the input has "
                                      f"{x.shape[1] if x.dim() > 1 else 0} channels (dim 1 of {tuple(x.shape)})")
            v = b.view(1, -1, *([1] * (x.dim() - 2)))
        elif b == "dataset-mean":
            dims = tuple(d for d in range(x.dim()) if d != 1)
            v = x.double().mean(dim=dims, keepdim=True)
        elif b == "mean":
            v = x.mean(dim=tuple(range(2, x.dim())), keepdim=True) if x.dim() > 2 else x.mean(1, keepdim=True)
        elif b == "black":
            v = x.flatten(1).amin(1).view(-1, *([1] * (x.dim() - 1)))
        else:
            v = torch.tensor(float(b), dtype=x.dtype, device=x.device)
        v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
        try:
            return torch.broadcast_to(v, x.shape)
        except RuntimeError:
            raise EvaluationError(f"the baseline has shape {tuple(v.shape)}, which does not broadcast to the "
                                  f"input {tuple(x.shape)}")

    # -- curves -----------------------------------------------------------------------------

    def _prepare(self, model, x, y, attributions, explain):
        y = check_inputs(model, x, y)
        with torch.no_grad():
            logits0 = model(x[:1])
        if logits0.dim() != 2:
            raise EvaluationError(f"the model returned shape {tuple(logits0.shape)}; perturbation curves "
                                  "need (B, C) class logits")
        if y is None:
            raise EvaluationError("y (one target class per sample) is required; pass the labels or "
                                  "model(x).argmax(1) to explain the predictions")
        check_targets(y, logits0.shape[1], "y")
        if attributions is None:
            if explain is None:
                raise EvaluationError("pass attributions= (maps shaped like x) or explain= "
                                      "(a callable (model, x, target) -> map)")
            attributions = torch.cat([explain(model, x[s:s + self.batch_size], y[s:s + self.batch_size])
                                      for s in range(0, x.shape[0], self.batch_size)])
            who = "the explain function's map"
        else:
            who = "attributions"
        return y, check_map(attributions, x, who)

    def _curves(self, model: nn.Module, x: Tensor, y: Tensor, a: Tensor, orders: Tuple[str, ...],
                desc: str):
        idx, n = self._unit_index(x)
        rel = self._unit_relevance(a, idx, n)                          # (N, U)
        ks = self._schedule(n).to(x.device)                            # (S,)
        base = self._baseline(x)
        S, N = ks.shape[0], x.shape[0]
        ranks = {}
        for o in orders:
            order = torch.argsort(rel, dim=1, descending=(o == "morf"), stable=True)
            rk = torch.empty_like(order)
            rk.scatter_(1, order, torch.arange(n, device=x.device).expand_as(order))
            ranks[o] = rk                                              # rank of each unit
        curves = {o: torch.empty(N, S, dtype=torch.float64, device=x.device) for o in orders}
        # one perturbed input per (sample, point): flattened and processed in chunks
        jobs = [(o, i) for o in orders for i in range(S)]
        per = max(1, self.batch_size // max(1, N)) if N < self.batch_size else 1
        bar = progress(-(-len(jobs) // per) * -(-N // self.batch_size), desc, self.progress)
        try:
            for s in range(0, N, self.batch_size):
                xs, ys, bs_ = x[s:s + self.batch_size], y[s:s + self.batch_size], base[s:s + self.batch_size]
                for j in range(0, len(jobs), per):
                    group = jobs[j:j + per]
                    inp = []
                    for o, i in group:
                        removed = ranks[o][s:s + self.batch_size] < ks[i]              # (b, U)
                        mask = removed.gather(1, idx.flatten().expand(removed.shape[0], -1)).view(
                            removed.shape[0], *idx.shape)
                        inp.append(torch.where(mask, bs_, xs))
                    with torch.no_grad():
                        out = model(torch.cat(inp))
                    if self.score == "probability":
                        out = torch.softmax(out.double(), 1)
                    sc = out.gather(1, ys.repeat(len(group)).view(-1, 1))[:, 0].view(len(group), -1)
                    for g, (o, i) in enumerate(group):
                        curves[o][s:s + self.batch_size, i] = sc[g].double()
                    bar.update(1)
        finally:
            bar.close()
        xs_axis = (ks.double() / n)
        res = {}
        for o in orders:
            c = curves[o]
            auc = torch.trapezoid(c, xs_axis, dim=1) if S > 1 else c[:, 0]
            res[o] = CurveResult(curve=c, steps=xs_axis, auc=auc, target=y)
        return res


class MoRF(_Perturbation):
    """Most-relevant-first deletion curve (lower AUC is better). See the module doc for parameters.

    ``__call__(model, x, y, attributions=None, explain=None) -> CurveResult``.
    """

    name = "MoRF"
    score_direction = "lower"
    _order = "morf"

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, attributions: Optional[Tensor] = None,
                 explain: Optional[ExplainFn] = None) -> CurveResult:
        y, a = self._prepare(model, x, y, attributions, explain)
        return self._curves(model, x, y, a, (self._order,), self.name)[self._order]


class LeRF(MoRF):
    """Least-relevant-first deletion curve (higher AUC is better)."""

    name = "LeRF"
    score_direction = "higher"
    _order = "lerf"


class ABPC(_Perturbation):
    """Area between the LeRF and MoRF curves: ``AUC(LeRF) - AUC(MoRF)`` (higher is better).

    Both curves share the attributions and are computed in the same batches.
    """

    name = "ABPC"
    score_direction = "higher"

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, attributions: Optional[Tensor] = None,
                 explain: Optional[ExplainFn] = None) -> ABPCResult:
        y, a = self._prepare(model, x, y, attributions, explain)
        r = self._curves(model, x, y, a, ("morf", "lerf"), self.name)
        return ABPCResult(abpc=r["lerf"].auc - r["morf"].auc, morf=r["morf"], lerf=r["lerf"])


@dataclasses.dataclass
class SRGResult(MetricResult):
    """Symmetric Relevance Gain per sample, ``auc(LeRF) - auc(MoRF)`` (higher is better)."""

    srg: Tensor
    morf: CurveResult
    lerf: CurveResult

    def aggregate(self):
        return {"srg": float(self.srg.float().mean()), "srg_morf_auc": float(self.morf.auc.float().mean()),
                "srg_lerf_auc": float(self.lerf.auc.float().mean())}


class SRG(ABPC):
    """Symmetric Relevance Gain (Blücher, Vielhaben and Strodthoff, TMLR 2024; higher is better).

    Occlude square patches in MoRF and in LeRF order, filled with the per-channel dataset mean,
    and track the target's logit; SRG is the area between the two curves over the occluded
    fraction in [0, 1] (trapezoid rule, the unoccluded point included):
    ``SRG = AUC(LeRF) - AUC(MoRF)``. It is the sum of the paper's most- and least-relevant gains
    against a random ranking (``(AUC(random) - AUC(MoRF)) + (AUC(LeRF) - AUC(random))``), so
    the random curve cancels and a random map scores 0 in expectation. The area is in logit units
    (the x-axis is a fraction, so it does not grow with ``steps``). When ``patch_size`` does not
    divide the image, edge patches are smaller and the x-axis counts patches, not pixels.

    Defaults: ``unit="patch"``, ``patch_size=16`` (a 14 x 14 grid on 224-pixel images; use a size
    that gives a grid of comparable resolution on other images), ``baseline="dataset-mean"``
    (the per-channel mean over the images of the call; pass the training set's per-channel mean
    as a sequence when known), ``steps=100`` (fewer points when there are fewer patches),
    ``score="logit"``, patch relevance = the sum of its map over channels and pixels. Every
    parameter of :class:`ABPC` is accepted.
    """

    name = "SRG"

    def __init__(self, unit: str = "patch", patch_size: Union[int, Tuple[int, int]] = 16,
                 baseline: Baseline = "dataset-mean", steps: int = 100, **kw):
        super().__init__(unit=unit, patch_size=patch_size, baseline=baseline, steps=steps, **kw)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, attributions: Optional[Tensor] = None,
                 explain: Optional[ExplainFn] = None) -> SRGResult:
        r = super().__call__(model, x, y, attributions=attributions, explain=explain)
        return SRGResult(srg=r.abpc, morf=r.morf, lerf=r.lerf)
