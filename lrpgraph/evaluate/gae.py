"""GAE, the Global Attribution Evaluation of Vukadin et al. (2024), as the authors' current code
computes it (``abslrp_gae/gae/gae.py`` with fix ``2754310``), with its two known defects fixed
(docs/evaluation.md lists every difference with its measured effect):

* every mosaic is four *consecutive* images (``x[4m:4m+4]`` -> TL, TR, BL, BR) at any batch size
  that is a multiple of 4 (the reference builds mosaics from chunked indices but samples the
  positive image from consecutive ones, which agree only at batch 4);
* the centre lines of the contrastiveness score map are full two-pixel-wide cross lines set to +1
  (the reference sets only the 2x2 centre square although its comment says "centre lines").

Per mosaic ``m`` (images ``4m..4m+3``), with ``T = num_masking_steps``:

1. the mosaic is the four images downscaled by 2 (nearest) in a 2x2 grid; the positive quadrant
   ``q*`` is sampled from ``softmax_q(mosaic_logit[pred(4m+q)])`` with a seeded generator; the
   positive image ``x+ = x[4m+q*]`` (full resolution) is explained for ``y+ = pred(x+)``;
2. gradient-guided MoRF and LeRF trajectories on ``x+``: at step ``t`` the map
   ``r_t = |x(t-1) * d|logit_y+|/dx|`` (sum to one) of the *current* input selects the
   ``floor(t/T * D)`` largest (MoRF) / smallest (LeRF) entries of ``r_t``, set to ``mask_value``
   (``D`` = C*H*W; channels independently; ranked in float64, ties by index). Selecting from the
   current map means MoRF skips entries already masked (it saturates after ~4 steps) and LeRF
   re-selects them. These passes run in their own fixed batch (``plan_batch_size``), so the
   trajectories do not depend on ``batch_size`` or ``explain_batch_size``;
3. faithfulness ``F = sum(CIM * rho+) / sum(rho+)`` with the combined impact map
   ``CIM = sign(norm1(sum_t r_t^LeRF) - norm1(sum_t r_t^MoRF))``;
4. robustness ``Rb = 1 - 2 d(dr, do)`` over the ``T-1`` masked inputs with the dice distance
   ``d(u, v) = sum|u-v| / (sum|u| + sum|v|)``, ``dr_s = d(rho+, rho(MoRF_s)) - d(rho+, rho(LeRF_s))``,
   ``do_s = (a^LeRF_{s+1} - a^MoRF_{s+1}) / a_1`` (target logits, relative to the unmasked one);
5. ``LC = relu(F + Rb) / 2``; contrastiveness ``C = relu(sum(score * rho_mos) / sum(rho_mos))``
   with the score map ``2 s_q / s_q* - 1`` per quadrant (``s_q`` = softmax of ``model(x+)`` at the
   dataset label of quadrant q's image) and +1 on the centre cross; ``GAE = LC * C``.

Every map ``rho`` is ``relu(map) / max`` per sample. The trajectories use the original model with
autograd: this is the evaluator, not the LRP engine. They do not depend on the attribution method,
so :meth:`GAE.evaluate` computes them once for many methods.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import (EvaluationError, ExplainFn, MetricResult, cat_results, check_inputs, check_map,
                      check_targets, forward, max_to_one, progress, sum_to_one)

_EPS = 1e-9


@dataclasses.dataclass
class GAEResult(MetricResult):
    """Per-mosaic GAE scores (``N/4`` entries for ``N`` images).

    Attributes:
        local_consistency: ``relu(F + Rb) / 2`` in [0, 1].
        faithfulness: ``F`` in [-1, 1]: the map's mass on entries the model keeps relying on.
        robustness: ``Rb`` in [-1, 1]: the map changes under MoRF vs LeRF as the output does.
        contrastiveness: ``C`` in [0, 1]: the mosaic map's mass on the positive quadrant.
        gae: ``LC * C`` in [0, 1] (higher is better).
        positive: index into ``x`` of each mosaic's positive image.
        target: the explained class ``y+`` (the model's prediction on the positive image).
        morf_logits, lerf_logits: ``(M, T)`` target logits along the two trajectories
            (method independent; ``[:, 0]`` is the unmasked logit).
    """

    local_consistency: Tensor
    faithfulness: Tensor
    robustness: Tensor
    contrastiveness: Tensor
    gae: Tensor
    positive: Tensor
    target: Tensor
    morf_logits: Tensor
    lerf_logits: Tensor


@dataclasses.dataclass
class GAEPlan:
    """The method-independent part of GAE for a batch (see :meth:`GAE.prepare`).

    Shapes use ``M`` mosaics, ``T`` masking steps and image shape ``(C, H, W)``.
    """

    positive: Tensor        # (M,) index of the positive image in x
    target: Tensor          # (M,) y+ = predicted class of the positive image
    x_pos: Tensor           # (M, C, H, W)
    mosaic: Tensor          # (M, C, H, W)
    score_map: Tensor       # (M, 1, H, W)
    morf_inputs: Tensor     # (M, T, C, H, W), [:, 0] = x_pos
    lerf_inputs: Tensor     # (M, T, C, H, W)
    morf_logits: Tensor     # (M, T)
    lerf_logits: Tensor     # (M, T)
    cim: Tensor             # (M, C, H, W) combined impact map in {-1, 0, 1}

    def __len__(self) -> int:
        return self.positive.shape[0]

    def slice(self, s: slice) -> "GAEPlan":
        return GAEPlan(**{f.name: getattr(self, f.name)[s] for f in dataclasses.fields(self)})


class GAE:
    """Global Attribution Evaluation (higher is better).

    Args:
        num_masking_steps: ``T``, steps of each masking trajectory (``T - 1`` masked inputs are
            explained per trajectory); the reference uses 10.
        seed: seeds the positive-quadrant sampling, so two runs give the same numbers.
        batch_size: images per scoring chunk (a multiple of 4). A chunk's explanations are ``5 * batch_size`` inputs (positive, mosaic and ``2 (T-1)`` masked
            inputs per mosaic at T = 10), split by ``explain_batch_size``.
        explain_batch_size: the most inputs passed to ``explain`` at once (``None``: a whole chunk).
        plan_batch_size: the batch of every method-independent pass (forwards of the images and
            mosaics, the trajectory gradients: MoRF and LeRF of ``plan_batch_size / 2`` positives).
            It is separate from ``batch_size`` and fixed, so that ``batch_size`` and
            ``explain_batch_size`` cannot change which entries the trajectories mask: a model's
            output for one sample can differ in its last bits between batch sizes, and one flipped
            near-tie changes the whole rest of a trajectory. Keep it fixed when comparing runs.
        mask_value: what masked entries are set to (0 = the dataset mean for standardised inputs,
            as in the reference).
        progress: show a progress bar (tqdm if installed).

    Example::

        gae = GAE(seed=0)
        res = gae(model, x, y, explain=lrpgraph.evaluate.get_method("abslrp"))
        res.aggregate()   # {'local_consistency': ..., 'faithfulness': ..., 'gae': ...}
    """

    name = "GAE"
    score_direction = "higher"

    def __init__(self, num_masking_steps: int = 10, seed: int = 0, batch_size: int = 32,
                 explain_batch_size: Optional[int] = None, mask_value: float = 0.0, progress: bool = True,
                 plan_batch_size: int = 32):
        if not isinstance(num_masking_steps, int) or num_masking_steps < 2:
            raise ValueError(f"num_masking_steps must be an int >= 2, got {num_masking_steps!r}")
        if not isinstance(batch_size, int) or batch_size < 4 or batch_size % 4:
            raise ValueError(f"batch_size must be a positive multiple of 4 (four images per mosaic), "
                             f"got {batch_size!r}")
        if explain_batch_size is not None and explain_batch_size < 1:
            raise ValueError(f"explain_batch_size must be >= 1 or None, got {explain_batch_size!r}")
        if not isinstance(plan_batch_size, int) or plan_batch_size < 2 or plan_batch_size % 2:
            raise ValueError(f"plan_batch_size must be an even int >= 2 (MoRF and LeRF of "
                             f"plan_batch_size / 2 positives per pass), got {plan_batch_size!r}")
        self.plan_batch_size = plan_batch_size
        self.num_masking_steps = num_masking_steps
        self.seed = seed
        self.batch_size = batch_size
        self.explain_batch_size = explain_batch_size
        self.mask_value = float(mask_value)
        self.progress = progress

    def __repr__(self) -> str:
        return (f"GAE(num_masking_steps={self.num_masking_steps}, seed={self.seed}, "
                f"batch_size={self.batch_size}, mask_value={self.mask_value}, "
                f"plan_batch_size={self.plan_batch_size})")

    # ----------------------------------------------------------------------------------------
    # public entry points

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, attributions: Optional[Tensor] = None,
                 explain: Optional[ExplainFn] = None) -> GAEResult:
        """Score one attribution method on ``x`` (``N`` images, ``N`` a multiple of 4).

        Args:
            model: the classifier, in eval mode.
            x: ``(N, C, H, W)`` inputs as the model expects them, ``H`` and ``W`` even.
            y: ``(N,)`` dataset labels (used by the contrastiveness score map).
            attributions: optional maps for ``x`` explaining the model's *predicted* classes; they
                replace the explanation of the positive images. The mosaics and the masked inputs
                are always explained with ``explain``.
            explain: ``(model, x, target) -> map shaped like x``; required.
        """
        if explain is None:
            raise EvaluationError("GAE explains mosaics and masked inputs that do not exist before the "
                                  "metric runs, so it needs explain=callable (model, x, target) -> map; "
                                  "e.g. explain=lrpgraph.evaluate.get_method('abslrp')")
        return self.evaluate(model, x, y, {"method": explain},
                             attributions=None if attributions is None else {"method": attributions})["method"]

    def evaluate(self, model: nn.Module, x: Tensor, y: Tensor, methods: Mapping[str, ExplainFn],
                 attributions: Optional[Mapping[str, Tensor]] = None,
                 plan: Optional[GAEPlan] = None) -> Dict[str, GAEResult]:
        """Score several methods on the same mosaics and trajectories (computed once).

        Returns ``{name: GAEResult}``. ``plan`` may be passed from :meth:`prepare` to reuse it.
        """
        y = self._check(model, x, y)
        if not methods:
            raise EvaluationError("methods is empty; pass {name: explain_fn}")
        attributions = dict(attributions or {})
        for name, a in attributions.items():
            attributions[name] = check_map(a, x, f"attributions[{name!r}]")
        if plan is None:
            plan = self.prepare(model, x, y)
        elif len(plan) != x.shape[0] // 4 or plan.x_pos.shape[1:] != x.shape[1:]:
            raise EvaluationError(f"the plan holds {len(plan)} mosaics of shape {tuple(plan.x_pos.shape[1:])} "
                                  f"but x has {x.shape[0] // 4} of shape {tuple(x.shape[1:])}; pass the plan "
                                  "that GAE.prepare returned for this x")
        M, cs = len(plan), self.batch_size // 4
        bar = progress(len(methods) * -(-M // cs), "GAE", self.progress)
        out: Dict[str, GAEResult] = {}
        try:
            for name, fn in methods.items():
                if not callable(fn):
                    raise EvaluationError(f"method {name!r} is not callable; pass (model, x, target) -> map")
                a = attributions.get(name)
                parts = []
                for s in range(0, M, cs):
                    sub = plan.slice(slice(s, s + cs))
                    rho_pos = None if a is None else a[sub.positive]
                    parts.append(self._score(model, sub, fn, rho_pos, name))
                    bar.update(1)
                out[name] = cat_results(GAEResult, parts)
        finally:
            bar.close()
        return out

    def prepare(self, model: nn.Module, x: Tensor, y: Tensor) -> GAEPlan:
        """Mosaics, positive images (seeded sampling), score maps and both masking trajectories:
        everything that does not depend on the attribution method."""
        y = self._check(model, x, y)
        M = x.shape[0] // 4
        bs = self.plan_batch_size                                      # not batch_size: see __init__
        logits = forward(model, x, bs)
        check_targets(y, logits.shape[1], "y")
        pred = logits.argmax(1)
        mosaic = make_mosaic(x)
        mos_logits = forward(model, mosaic, bs)
        w = mos_logits.gather(1, pred.view(M, 4))                      # (M, 4)
        gen = torch.Generator(device="cpu").manual_seed(self.seed)      # device-independent draws
        q = torch.multinomial(torch.softmax(w.double(), 1).cpu(), 1, generator=gen)[:, 0].to(x.device)
        positive = torch.arange(M, device=x.device) * 4 + q
        target = pred[positive]
        x_pos = x[positive]
        probs = torch.softmax(logits[positive].double(), 1)             # s = softmax(o(x+))
        score = score_map(probs, y.view(M, 4), q, x.shape[-2], x.shape[-1]).to(x.dtype)
        starts = range(0, M, bs // 2)
        bar = progress(len(starts), "GAE trajectories", self.progress)
        trajs = []
        try:
            for s in starts:
                trajs.append(self._trajectories(model, x_pos[s:s + bs // 2], target[s:s + bs // 2]))
                bar.update(1)
        finally:
            bar.close()
        mi, ml, li, ll, cim = (torch.cat([t[k] for t in trajs]) for k in range(5))
        return GAEPlan(positive=positive, target=target, x_pos=x_pos, mosaic=mosaic, score_map=score,
                       morf_inputs=mi, lerf_inputs=li, morf_logits=ml, lerf_logits=ll, cim=cim)

    # ----------------------------------------------------------------------------------------
    # internals

    def _check(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        y = check_inputs(model, x, y)
        if y is None:
            raise EvaluationError("GAE needs the dataset labels y (the contrastiveness score map uses them)")
        if x.dim() != 4:
            raise EvaluationError(f"GAE needs image batches (N, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[0] % 4:
            raise EvaluationError(f"GAE builds 2x2 mosaics of four consecutive images, so the number of "
                                  f"images must be a multiple of 4; got {x.shape[0]}. Drop the last "
                                  f"{x.shape[0] % 4} image(s) (x[:{x.shape[0] - x.shape[0] % 4}]) or add more")
        if x.shape[-1] % 2 or x.shape[-2] % 2:
            raise EvaluationError(f"GAE halves the images for the mosaic, so H and W must be even; got "
                                  f"{tuple(x.shape[-2:])}. Pad or resize the images")
        return y

    def _trajectories(self, model: nn.Module, x_pos: Tensor, target: Tensor):
        """MoRF and LeRF trajectories of ``x_pos``, batched together (first M rows MoRF)."""
        T, M = self.num_masking_steps, x_pos.shape[0]
        cur = torch.cat([x_pos, x_pos]).detach()
        tgt = torch.cat([target, target]).view(-1, 1)
        D = cur[0].numel()
        inputs, logits, rsum = [], [], torch.zeros_like(cur, dtype=torch.float64)
        for t in range(1, T + 1):
            xi = cur.clone().requires_grad_(True)
            with torch.enable_grad():
                a = model(xi).gather(1, tgt)[:, 0]
                (g,) = torch.autograd.grad(a.abs().sum(), xi)       # per-sample: sum, not mean
            r = sum_to_one((g.double() * cur.double()).abs())       # float64 from here on
            inputs.append(cur)
            logits.append(a.detach())
            rsum += r
            if t < T:
                k = masked_count(t, T, D)
                flat = r.flatten(1)
                idx = torch.cat([select_masked(flat[:M], k, True), select_masked(flat[M:], k, False)])
                cur = cur.flatten(1).scatter(1, idx, self.mask_value).view_as(cur)
        inputs_t = torch.stack(inputs, 1)                               # (2M, T, C, H, W)
        logits_t = torch.stack(logits, 1)                               # (2M, T)
        cim = torch.sign(sum_to_one(rsum[M:]) - sum_to_one(rsum[:M])).to(x_pos.dtype)   # LeRF - MoRF
        return inputs_t[:M], logits_t[:M], inputs_t[M:], logits_t[M:], cim

    def _explain(self, model: nn.Module, fn: ExplainFn, inputs: Tensor, target: Tensor, name: str) -> Tensor:
        bs = self.explain_batch_size or inputs.shape[0]
        maps = []
        for s in range(0, inputs.shape[0], bs):
            xi, ti = inputs[s:s + bs], target[s:s + bs]
            maps.append(check_map(fn(model, xi, ti), xi, f"method {name!r}'s map"))
        return torch.cat(maps)

    def _score(self, model: nn.Module, p: GAEPlan, fn: ExplainFn, rho_pos: Optional[Tensor],
               name: str) -> GAEResult:
        M, T = len(p), self.num_masking_steps
        shape = p.x_pos.shape[1:]
        masked = torch.cat([p.morf_inputs[:, 1:].reshape(-1, *shape), p.lerf_inputs[:, 1:].reshape(-1, *shape)])
        t_masked = p.target.repeat_interleave(T - 1).repeat(2)
        parts = [p.mosaic, masked] if rho_pos is not None else [p.x_pos, p.mosaic, masked]
        tparts = [p.target, t_masked] if rho_pos is not None else [p.target, p.target, t_masked]
        rho = max_to_one(self._explain(model, fn, torch.cat(parts), torch.cat(tparts), name))
        if rho_pos is None:
            rho_pos, rho = rho[:M], rho[M:]
        else:
            rho_pos = max_to_one(rho_pos)
        rho_mos, rho_masked = rho[:M], rho[M:]
        rho_morf = rho_masked[:M * (T - 1)].view(M, T - 1, *shape)
        rho_lerf = rho_masked[M * (T - 1):].view(M, T - 1, *shape)

        faith = (p.cim * rho_pos).flatten(1).sum(1) / (rho_pos.flatten(1).sum(1) + _EPS)
        dr = dice(rho_pos.unsqueeze(1), rho_morf) - dice(rho_pos.unsqueeze(1), rho_lerf)    # (M, T-1)
        a1 = p.morf_logits[:, :1]
        do = (p.lerf_logits[:, 1:] - p.morf_logits[:, 1:]) / (a1 + _EPS)
        robust = 1 - 2 * dice(dr, do)
        lc = torch.relu(faith + robust) / 2
        contrast = torch.relu((p.score_map * rho_mos).flatten(1).sum(1) / (rho_mos.flatten(1).sum(1) + _EPS))
        return GAEResult(local_consistency=lc, faithfulness=faith, robustness=robust,
                         contrastiveness=contrast, gae=lc * contrast, positive=p.positive, target=p.target,
                         morf_logits=p.morf_logits, lerf_logits=p.lerf_logits)


# --------------------------------------------------------------------------------------------
# building blocks (public for tests and for users who want to look at them)


def masked_count(t: int, T: int, D: int) -> int:
    """Entries masked after step ``t`` of ``T``: ``floor(t * D / T)`` in integers, so step 5 of 10
    masks exactly half. (The reference computes ``int(float32(t / T) * D)``, one entry fewer at
    some steps; see docs/evaluation.md.)"""
    return (t * D) // T


def select_masked(r: Tensor, k: int, descending: bool) -> Tensor:
    """Indices ``(B, k)`` of the ``k`` largest (MoRF) or smallest (LeRF) entries of each row of
    ``r`` ``(B, D)``: ranked by the score in float64, ties by entry index (a stable sort), so exact
    ties never depend on the sort algorithm or the device."""
    return torch.argsort(r.double(), dim=1, descending=descending, stable=True)[:, :k]


def make_mosaic(x: Tensor) -> Tensor:
    """``(N, C, H, W) -> (N/4, C, H, W)``: images ``4m, 4m+1, 4m+2, 4m+3`` downscaled by 2 (nearest)
    at top-left, top-right, bottom-left, bottom-right of mosaic ``m``."""
    N, C, H, W = x.shape
    small = F.interpolate(x, size=(H // 2, W // 2), mode="nearest").view(N // 4, 2, 2, C, H // 2, W // 2)
    # (M, row, col, C, h, w) -> (M, C, row, h, col, w)
    return small.permute(0, 3, 1, 4, 2, 5).reshape(N // 4, C, H, W)


def score_map(probs: Tensor, labels: Tensor, q: Tensor, H: int, W: int) -> Tensor:
    """The contrastiveness score map ``(M, 1, H, W)``.

    Args:
        probs: ``(M, K)`` softmax of the model on each positive image.
        labels: ``(M, 4)`` dataset labels of each mosaic's quadrants (TL, TR, BL, BR).
        q: ``(M,)`` positive quadrant.

    Quadrant ``j`` holds ``2 s_j / s_q* - 1`` with ``s_j = probs[labels[j]]`` (the positive
    quadrant is +1); the centre cross (rows and columns ``H/2-1, H/2`` and ``W/2-1, W/2``, full
    length) is +1.
    """
    s = probs.gather(1, labels)                                    # (M, 4)
    s_pos = s.gather(1, q.view(-1, 1)).clamp_min(1e-30)
    v = 2 * s / s_pos - 1                                          # (M, 4)
    m = v.view(-1, 1, 2, 1, 2, 1).expand(-1, 1, 2, H // 2, 2, W // 2).reshape(-1, 1, H, W).clone()
    m[:, :, H // 2 - 1:H // 2 + 1, :] = 1
    m[:, :, :, W // 2 - 1:W // 2 + 1] = 1
    return m


def dice(u: Tensor, v: Tensor) -> Tensor:
    """``sum|u - v| / (sum|u| + sum|v| + 1e-9)`` over the trailing dims from dim 2 (``u``, ``v``
    broadcast to ``(M, S, ...)``), or over dim 1 for 2-D inputs: the reference's "dice loss"."""
    u, v = torch.broadcast_tensors(u, v)
    start = 1 if u.dim() == 2 else 2
    return (u - v).abs().flatten(start).sum(-1) / (u.abs().flatten(start).sum(-1) + v.abs().flatten(start).sum(-1) + _EPS)
