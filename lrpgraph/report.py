"""The per-node conservation report: relevance in and out of every node, before normalisation.

Each row holds, per relevance pass k and sample b (tensors shaped ``(K, B)``):

* ``in_sum``, ``in_pos``, ``in_neg``: the signed sum, positive mass and negative mass of the
  relevance that reached the node (summed over its users);
* ``out_sum``, ``out_pos``, ``out_neg``: the same for what the rule sent to the node's inputs,
  measured on the rule's own output, i.e. *before* the unit-mass renormalisation of
  ``abslrp-renorm`` (which would hide leaks). For the sign-split ``abslrp`` rule the positive and
  negative streams are measured before they are added, so cancellation is not mistaken for loss;
* ``cancelled``: positive mass that was delivered to this node by its users as separate streams
  and cancelled against negative mass when they were added (by design in ``abslrp``);
* ``abs_err`` = |in_sum - out_sum| and ``rel_err`` = ``abs_err`` / (in_pos + |in_neg|); ``mass_err``
  = max(|in_pos - out_pos|, |in_neg - out_neg|), which the sign-split ``abslrp`` preset also keeps
  (the report checks it for that preset; classic LRP-0 keeps the total but not the masses).

* ``fanout_err``: where a node's value feeds several users, |what the users delivered - ``in_sum``|,
  so relevance lost (or made) in the fan-out sum itself is a leak of that node too; an input
  (placeholder) gets a row of its own for this check (rule ``input``).

Any NaN or Inf in a row makes its error infinite: it is always a leak, never a pass.

Nodes that absorb relevance by design (parameters such as a position embedding, constants) get a
row with ``out = 0`` and a note, and are not counted as leaks.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence

import torch
from torch import Tensor

from .rule import Split

TINY = 1e-30
#: errors are taken relative to at least this share of the output's mass. Else a node that receives
#: only rounding residue of earlier cancellations (1e-16 of the total in float64) and drops it shows a
#: relative error of 1. With the default tolerance 1e-5, a node still leaks once it drops more than
#: 1e-14 of the total mass.
NOISE = 1e-9


def _batch_dim(t: Tensor, batch: int, axis: Optional[int] = None) -> Optional[int]:
    """The batch dim of a ``(K, ...)`` relevance tensor: ``axis + 1`` when the node's batch axis is
    known (:func:`lrpgraph.record.batch_axes`), else a guess by size: dim 1, else the first dim of
    size ``batch`` (relevance kept per sample for a parameter sits at dim 1). A known axis where the
    batch is merged with another one gives ``None`` (see :func:`stats`): another dim that happens to
    have the batch's size is not the batch (a Swin window's ``(B * nW, 2, 2, C)`` at batch 2)."""
    if axis is not None and t.dim() > axis + 1:
        return axis + 1 if t.shape[axis + 1] == batch else None
    if t.dim() >= 2 and t.shape[1] == batch:
        return 1
    for d in range(2, t.dim()):
        if t.shape[d] == batch:
            return d
    return None


def stats(t: Optional[Tensor], batch: int, axis: Optional[int] = None):
    """(sum, pos, neg) per (k, sample) of a ``(K, B, ...)`` tensor; ``None`` gives zeros later.
    ``axis``: the batch axis of the node's value, if known."""
    if t is None:
        return None
    d = _batch_dim(t, batch, axis)
    merged = axis + 1 if axis is not None and t.dim() > axis + 1 else (1 if t.dim() >= 2 else None)
    if d is None and merged is not None and t.shape[merged] % batch == 0 and t.shape[merged] > batch:
        # the batch merged with another axis, batch-major (``x.flatten(0, 1)``, Swin windows): that
        # axis found by the probe (else the first), split into (batch, rest)
        flat = t.movedim(merged, 1).reshape(t.shape[0], batch, -1)
        return flat.sum(-1), flat.clamp(min=0).sum(-1), flat.clamp(max=0).sum(-1)
    if d is None and axis is not None:  # the probe's axis does not fit this tensor: guess by size
        d = _batch_dim(t, batch)
    if d is None:  # no batch axis (should not happen for activations): spread the total evenly
        tot = lambda x: (x.reshape(x.shape[0], -1).sum(1, keepdim=True) / batch).expand(-1, batch)  # noqa: E731
        return tot(t), tot(t.clamp(min=0)), tot(t.clamp(max=0))
    if d != 1:
        t = t.movedim(d, 1)
    flat = t.reshape(t.shape[0], t.shape[1], -1)
    return flat.sum(-1), flat.clamp(min=0).sum(-1), flat.clamp(max=0).sum(-1)


def _stream(t: Optional[Tensor], batch: int, axis, sign: int):
    """(sum, pos, neg) of one sign stream measured by its L1 mass, with the stream's sign."""
    st = stats(t.abs(), batch, axis) if t is not None else None
    if st is None:
        return None
    m = st[0] * sign
    z = torch.zeros_like(m)
    return (m, m, z) if sign > 0 else (m, z, m)


def _acc(parts):
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    s, p, n = parts[0]
    for (a, b, c) in parts[1:]:
        s, p, n = s + a, p + b, n + c
    return s, p, n


def relevance_stats(r, batch: int, axis=None):
    """Stats of a relevance entry: a tensor, a :class:`Split`, or a list (tuple-valued node, with
    a tuple of batch axes)."""
    if r is None:
        return None
    if isinstance(r, Split):  # each stream by its mass (a paper-era rule may flip part of one)
        return _acc([_stream(r.pos, batch, axis, 1), _stream(r.neg, batch, axis, -1)])
    if isinstance(r, (list, tuple)):
        axes = axis if isinstance(axis, tuple) else (None,) * len(r)
        return _acc([relevance_stats(e, batch, a) for e, a in zip(r, axes)])
    return stats(r, batch, axis if not isinstance(axis, tuple) else None)


@dataclass
class NodeBalance:
    """One row of the conservation report (tensors are ``(K, B)``, on the CPU)."""

    name: str
    op: str
    rule: str
    in_sum: Tensor
    in_pos: Tensor
    in_neg: Tensor
    out_sum: Tensor
    out_pos: Tensor
    out_neg: Tensor
    cancelled: Tensor
    note: str = ""
    by_design: bool = False
    delivered_sum: Optional[Tensor] = None   # (K, B): what the node's users delivered, summed
    delivered_mass: Optional[Tensor] = None  # (K, B): the absolute mass of those deliveries
    #: (K, B) bool: the relevance came in only on entries where the node's value is exactly 0 (a
    #: classifier head with all-zero weights, as timm initialises some): no stream has a carrier
    dead: Optional[Tensor] = None

    @property
    def fanout_err(self) -> Tensor:
        """|delivered_sum - in_sum|: relevance lost or made where the users' relevance was summed."""
        if self.delivered_sum is None:
            return torch.zeros_like(self.in_sum)
        return (self.delivered_sum - self.in_sum).abs()

    @property
    def abs_err(self) -> Tensor:
        """|in_sum - out_sum| per (pass, sample): the signed total that every LRP rule should keep."""
        return (self.in_sum - self.out_sum).abs()

    @property
    def mass_err(self) -> Tensor:
        """max(|in_pos - out_pos|, |in_neg - out_neg|): what the sign-split absLRP rule keeps too."""
        return torch.maximum((self.in_pos - self.out_pos).abs(), (self.in_neg - self.out_neg).abs())

    @property
    def scale(self) -> Tensor:
        return self.in_pos + self.in_neg.abs() + TINY

    @property
    def rel_err(self) -> Tensor:
        """``abs_err`` relative to the total absolute mass that came in."""
        return self.abs_err / self.scale

    def lost(self) -> tuple:
        """``(lost_pos, lost_neg)`` per (pass, sample): the whole positive (negative) mass that came
        in where the rule had no carrier for it (nothing went out with that sign) while the other
        sign's stream was carried, or where neither was but the relevance lay only on entries whose
        value is exactly 0 (``dead``). absLRP's sign split can only rescale a stream that reaches some
        input with a non-zero contribution (for example, positive relevance arriving only where
        ``2 z+ = 0``); such a stream is lost by the method's definition, a named loss, not a leak.
        A rule that drops both streams of relevance on non-zero values still leaks."""
        zero = torch.zeros_like(self.in_pos)
        dead = self.dead if self.dead is not None else torch.zeros_like(self.in_pos, dtype=torch.bool)
        carried_neg = (self.out_neg != 0) | (self.in_neg == 0) | dead
        carried_pos = (self.out_pos != 0) | (self.in_pos == 0) | dead
        lp = torch.where((self.out_pos == 0) & (self.in_pos > 0) & carried_neg, self.in_pos, zero)
        ln = torch.where((self.out_neg == 0) & (self.in_neg < 0) & carried_pos, self.in_neg, zero)
        return lp, ln

    def rel_errors(self, masses: bool = False, floor: Optional[Tensor] = None) -> Tensor:
        """The relative error per pass and sample ``(K, B)``: what went missing or appeared (0 for
        by-design absorption); with ``masses`` the positive and negative masses count as well, and
        a stream lost for want of a carrier (:meth:`lost`) is left out (it is reported as a loss).
        ``floor`` (``(K, B)``): the smallest mass the error is taken relative to (see ``NOISE``).
        A broken fan-out sum counts, and a non-finite row is infinitely wrong."""
        scale = self.scale if floor is None else torch.maximum(self.scale, floor)
        # the fan-out sum is judged against the mass that was summed (which may have cancelled)
        w = self.fanout_err / (scale + (self.delivered_mass if self.delivered_mass is not None else 0))
        if not self.by_design:
            if not masses:
                err = self.abs_err
            else:
                lp, ln = self.lost()
                abs_err = (self.in_sum - lp - ln - self.out_sum).abs()
                mass_err = torch.maximum((self.in_pos - lp - self.out_pos).abs(), (self.in_neg - ln - self.out_neg).abs())
                err = torch.maximum(abs_err, mass_err)
            w = torch.maximum(w, err / scale)
        if not self.finite():
            return torch.full_like(w, math.inf)
        return w

    def worst(self, masses: bool = False, floor: Optional[Tensor] = None) -> float:
        """The largest of :meth:`rel_errors` over passes and samples."""
        return float(self.rel_errors(masses, floor).max())

    def finite(self) -> bool:
        """Whether every figure of the row is finite (NaN or Inf relevance is always a leak)."""
        ts = [self.in_sum, self.in_pos, self.in_neg, self.out_sum, self.out_pos, self.out_neg]
        ts += [t for t in (self.delivered_sum,) if t is not None]
        return all(bool(torch.isfinite(t).all()) for t in ts)

    def lost_share(self, floor: Optional[Tensor] = None) -> float:
        """The largest share of the incoming mass lost for want of a carrier (see :meth:`lost`);
        ``floor`` as for :meth:`worst`."""
        lp, ln = self.lost()
        scale = self.scale if floor is None else torch.maximum(self.scale, floor)
        return float(((lp - ln) / scale).max())


def balance(name: str, op: str, rule: str, r_in, outs: Optional[Sequence], batch: int,
            note: str = "", delivered_pos: Optional[Tensor] = None, axis=None,
            out_axes: Optional[Sequence] = None, delivered=None, value=None) -> NodeBalance:
    """Build a row from a node's incoming relevance and its rule's per-slot output (``axis`` and
    ``out_axes``: the batch axes of the node's value and of each slot's, if known; ``delivered``:
    ``(sum, mass)`` of what the node's users delivered, for the fan-out check; ``value``: the
    node's recorded value, if kept, for :attr:`NodeBalance.dead`)."""
    by_design = outs is None  # absorbed on purpose (parameters, constants)
    s_in = relevance_stats(r_in, batch, axis)
    outs = list(outs or [])
    out_axes = list(out_axes) if out_axes is not None else [None] * len(outs)
    s_out = _acc([relevance_stats(o, batch, a) for o, a in zip(outs, out_axes)])
    zero = torch.zeros_like(s_in[0])
    if s_out is None:
        s_out = (zero, zero, zero)
    cancelled = zero if delivered_pos is None else (delivered_pos - s_in[1]).clamp(min=0)
    cpu = lambda t: t.detach().to("cpu", torch.float64)  # noqa: E731
    # only where the rule sent nothing at all (cheap otherwise): did any relevance lie on a value?
    nothing = (s_out[1] == 0) & (s_out[2] == 0) & (s_in[1] - s_in[2] > 0)
    dead = _dead(r_in, value, batch, axis) if value is not None and not by_design and bool(nothing.any()) else None
    d_sum, d_mass = (cpu(delivered[0]), cpu(delivered[1])) if delivered is not None else (None, None)
    return NodeBalance(name, op, rule, *(cpu(t) for t in s_in), *(cpu(t) for t in s_out),
                       cpu(cancelled), note=note, by_design=by_design, delivered_sum=d_sum, delivered_mass=d_mass,
                       dead=dead)


def _dead(r, value, batch: int, axis) -> Optional[Tensor]:
    """(K, B): whether no entry with non-zero relevance has a non-zero value (``None`` if unknown)."""
    if not isinstance(r, Tensor) or not isinstance(value, Tensor) or tuple(r.shape[1:]) != tuple(value.shape):
        return None
    live = stats(((r != 0) & (value != 0)).to(r.dtype), batch, axis if not isinstance(axis, tuple) else None)
    return live[0].detach().cpu() == 0


@dataclass
class ConservationReport:
    """Rows in backward order (output first). Iterate, index by node name, or print ``table()``.

    ``masses``: whether leaks are judged on the positive and negative masses as well as on the
    signed total (true for the sign-split ``abslrp`` preset, whose guarantee that is; classic
    rules such as LRP-0 conserve the total but may create positive and negative mass).
    """

    rows: List[NodeBalance] = field(default_factory=list)
    preset: str = ""
    masses: bool = False
    # forward cancellation C and backward amplification A per residual addition (lrpgraph.residuals)
    residuals: list = field(default_factory=list)

    def __iter__(self) -> Iterator[NodeBalance]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, name: str) -> NodeBalance:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def _masses(self, masses: Optional[bool]) -> bool:
        return self.masses if masses is None else masses

    def noise_floor(self) -> Optional[Tensor]:
        """``NOISE`` times the mass at the output (the first row): a node that receives only rounding
        residue of earlier cancellations (1e-16 of the total) is judged against the total."""
        return self.rows[0].scale * NOISE if self.rows else None

    def leaks(self, tol: float = 1e-5, masses: Optional[bool] = None) -> List[NodeBalance]:
        """Rows whose relative error exceeds ``tol`` (by-design absorption excluded)."""
        m, f = self._masses(masses), self.noise_floor()
        return [r for r in self.rows if r.worst(m, f) > tol]

    def losses(self, tol: float = 1e-5) -> List[NodeBalance]:
        """Rows of the sign-split preset where a whole sign stream had no carrier (more than ``tol``
        of the incoming mass): named losses, kept out of :meth:`leaks` (see :meth:`NodeBalance.lost`)."""
        if not self.masses:
            return []
        f = self.noise_floor()
        return [r for r in self.rows if not r.by_design and r.lost_share(f) > tol]

    def max_rel_error(self, masses: Optional[bool] = None) -> float:
        """The worst relative error over all nodes, passes and samples."""
        m, f = self._masses(masses), self.noise_floor()
        return max((r.worst(m, f) for r in self.rows), default=0.0)

    def table(self, tol: float = 1e-5, sample: Optional[int] = None, masses: Optional[bool] = None) -> str:
        """A fixed-width text table; leaking rows are marked ``LEAK``. Values are for ``sample``
        (first pass) or, by default, the first sample, with the error column the worst over all."""
        m = self._masses(masses)
        b = 0 if sample is None else sample
        head = ("node", "op", "rule", "in", "out", "in+", "out+", "in-", "out-", "cancel", "rel.err", "")
        lines = []
        for r in self.rows:
            w = r.worst(m, self.noise_floor())
            flag = ("LEAK non-finite" if not r.finite() else "LEAK") if w > tol else ("by design" if r.by_design else "")
            share = r.lost_share(self.noise_floor()) if m and not r.by_design else 0.0
            if not flag.startswith("LEAK") and share > tol:
                flag = f"LOSS: a sign stream had no carrier ({share:.1e} of the mass)"
            v = lambda t: f"{float(t[0, b]):.6g}"  # noqa: E731
            lines.append((r.name, _short(r.op), r.rule, v(r.in_sum), v(r.out_sum), v(r.in_pos),
                          v(r.out_pos), v(r.in_neg), v(r.out_neg), v(r.cancelled),
                          f"{w:.2e}", flag + (f" {r.note}" if r.note and flag != "LEAK" else "")))
        widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)] if lines else [len(h) for h in head]
        fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()  # noqa: E731
        out = [fmt(head), fmt(tuple("-" * w for w in widths))] + [fmt(l) for l in lines]
        leaks = self.leaks(tol, m)
        what = "signed total and positive/negative mass" if m else "signed total"
        out.append("")
        losses = self.losses(tol) if m else []
        out.append(f"{len(self.rows)} nodes, preset {self.preset!r}; checked: {what}; worst relative "
                   f"error {self.max_rel_error(m):.2e}; {len(leaks)} node(s) leak beyond {tol:g}"
                   + (f"; {len(losses)} node(s) lose a sign stream with no carrier" if losses else ""))
        return "\n".join(out)

    def to_csv(self) -> str:
        """Every row, pass and sample as CSV text."""
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["node", "op", "rule", "pass", "sample", "in_sum", "out_sum", "in_pos", "out_pos",
                    "in_neg", "out_neg", "cancelled", "abs_err", "rel_err", "mass_err", "by_design", "note",
                    "fanout_err"])
        for r in self.rows:
            ae, re_ = r.abs_err, r.rel_err
            me, fe = r.mass_err, r.fanout_err
            for k in range(r.in_sum.shape[0]):
                for b in range(r.in_sum.shape[1]):
                    w.writerow([r.name, r.op, r.rule, k, b] +
                               [f"{float(t[k, b]):.9g}" for t in (r.in_sum, r.out_sum, r.in_pos, r.out_pos,
                                                                   r.in_neg, r.out_neg, r.cancelled, ae, re_, me)] +
                               [int(r.by_design), r.note, f"{float(fe[k, b]):.9g}"])
        return buf.getvalue()


def _short(op: str) -> str:
    for prefix in ("torch.nn.modules.", "torch.nn.functional.", "torch.nn."):
        if op.startswith(prefix):
            parts = op.split(".")
            return parts[-1] if prefix != "torch.nn.functional." else "F." + parts[-1]
    return op
