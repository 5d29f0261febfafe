"""Checks that turn a would-be silent wrong result into a clear error.

Each check names what is wrong and what to do: a non-finite input sample, float16 (whose range
cannot hold the rules' stabilisers), non-finite logits or relevance (naming the first node in
backward order), and forward hooks that tracing would silently skip.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence

import torch
from torch import Tensor, nn


class NonFiniteError(ValueError):
    """Relevance (or the input, or the logits) holds NaN or Inf. ``node`` names the first node in
    backward order whose rule produced it, where known; ``report`` is the conservation report of
    the failed call when one was collected (``None`` otherwise)."""

    def __init__(self, message: str, node: Optional[str] = None, report=None):
        super().__init__(message)
        self.node = node
        self.report = report


def _bad_samples(t: Tensor, batch_dim: int = 0) -> List[int]:
    flat = t.detach().movedim(batch_dim, 0).reshape(t.shape[batch_dim], -1)
    return [int(i) for i in (~torch.isfinite(flat)).any(1).nonzero().flatten()]


def _samples(idx: Sequence[int]) -> str:
    shown = ", ".join(str(i) for i in idx[:8])
    return shown + (f" and {len(idx) - 8} more" if len(idx) > 8 else "")


def check_input(x: Tensor) -> None:
    """Refuse a float16 input and name the samples of ``x`` that hold NaN or Inf."""
    if x.dtype == torch.float16:
        raise TypeError(_FLOAT16)
    if x.is_floating_point() or x.is_complex():
        bad = _bad_samples(x)
        if bad:
            raise NonFiniteError(f"x holds NaN or Inf in sample(s) {_samples(bad)} (of {x.shape[0]}); "
                                 "their relevance would be NaN and their predicted class arbitrary. "
                                 "Fix or drop those samples")


_FLOAT16 = ("float16 is not supported: its range cannot hold the rules' stabilisers (1e-9 rounds to 0) "
            "and the relevance would be NaN. Explain in float32 or bfloat16, e.g. "
            "Explainer(copy.deepcopy(model).float())(x.float())")


def check_logits(logits: Tensor) -> None:
    """Refuse float16 logits (a float16 model fed integer ids) and name non-finite samples."""
    if logits.dtype == torch.float16:
        raise TypeError(_FLOAT16)
    if logits.is_floating_point() and logits.dim() >= 1 and logits.shape[0] > 0:
        bad = _bad_samples(logits)
        if bad:
            raise NonFiniteError(f"the model output holds NaN or Inf for sample(s) {_samples(bad)} although "
                                 "the input is finite; no relevance can start from it (check the model's "
                                 "weights and dtype)")


def first_nonfinite(rows: Iterable) -> Optional[object]:
    """The first report row (backward order) whose incoming or outgoing relevance is not finite."""
    for r in rows:
        if r.by_design:
            continue
        if not all(bool(torch.isfinite(t).all()) for t in (r.in_sum, r.in_pos, r.in_neg,
                                                            r.out_sum, r.out_pos, r.out_neg)):
            return r
    return None


def nonfinite_error(row, report=None) -> NonFiniteError:
    where = "its incoming relevance" if not bool(torch.isfinite(row.in_sum).all()) else "its rule's output"
    return NonFiniteError(f"non-finite relevance (NaN or Inf) first at node `{row.name}` ({row.op}, rule "
                          f"{row.rule}), in {where}; the explanation would be wrong. Check that node's "
                          "inputs and dtype, or use a preset with a stabiliser there (e.g. lrp-epsilon)",
                          node=row.name, report=report)


def check_hooks(model: nn.Module, leaves: Iterable[str]) -> None:
    """Refuse forward (pre-)hooks on modules that tracing goes through: the traced graph calls
    their ``forward`` without the hooks, so the logits would differ from ``model(x)``. Hooks on
    modules that stay single graph nodes (leaves) run as usual."""
    leaves = set(leaves)
    for name, m in model.named_modules():
        parts = name.split(".")
        # a leaf, or inside one: the name or one of its dotted prefixes is a leaf (linear in the depth)
        if name in leaves or any(".".join(parts[:i]) in leaves for i in range(1, len(parts))):
            continue
        if m._forward_hooks or m._forward_pre_hooks:
            what = f"module `{name}` ({type(m).__qualname__})" if name else f"the model ({type(model).__qualname__})"
            raise ValueError(f"{what} has forward hooks or pre-hooks, which the traced graph would skip "
                             "(the logits would differ from model(x)). Remove them, or wrap the model so "
                             "that the hook's effect is part of a module's forward")
