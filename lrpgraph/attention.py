"""Make fused attention explicit: a graph pass that rewrites ``F.scaled_dot_product_attention``.

timm and Hugging Face models call ``torch.nn.functional.scaled_dot_product_attention`` (SDPA), one
fused op with no relevance rule of its own. :func:`explicit_attention` replaces every such node of
lrpgraph's traced graph (never the user's model) by the ops SDPA computes::

    q_s    = scale_query(q, scale)       (q * scale; scale=None: 1/sqrt(head dim))
    k_t    = k.transpose(-2, -1)
    scores = torch.matmul(q_s, k_t)
    scores = attention_mask(scores, attn_mask, is_causal)   (only when a mask or causal flag is given)
    attn   = torch.softmax(scores, dim=-1)
    out    = torch.matmul(attn, v)

so the transformer rules (:mod:`lrpgraph.rules.transformer`) see each step, and the relevance of
the attention map is visible per node. ``dropout_p`` must be 0 (a model in eval mode); grouped
query attention (``enable_gqa=True``) is not supported yet. The outputs equal the fused op's to
float rounding (the fused kernel scales q and k by sqrt(scale) each; we scale q once).
"""
from __future__ import annotations

import math
from numbers import Number
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from .passes import register_pass

_SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def scale_query(q: Tensor, scale: Optional[float] = None) -> Tensor:
    """``q * scale``, by default ``q / sqrt(q.shape[-1])`` (SDPA's scale; the head dim is only known
    at run time). One op with its own rule: the reference passes relevance through the scale."""
    return q * (scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))


def attention_mask(scores: Tensor, mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
    """Apply SDPA's mask to attention ``scores`` ``(..., L, S)``.

    A boolean ``mask`` keeps the entries where it is True (the others become ``-inf``); a float
    mask is added. ``is_causal`` keeps the lower triangle (top-left aligned, as SDPA does). The mask
    is a constant for relevance: its rule sends all relevance to ``scores``.
    """
    if is_causal:
        L, S = scores.shape[-2], scores.shape[-1]
        keep = torch.ones(L, S, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    return scores


def _is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and (node.target in _SDPA or
                                           getattr(node.target, "__name__", "") == "scaled_dot_product_attention")


def _sdpa_args(node: fx.Node) -> dict:
    vals: dict = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
    for name, a in zip(_SDPA_PARAMS, node.args):
        vals[name] = a
    for k, v in node.kwargs.items():
        if k not in _SDPA_PARAMS:
            raise NotImplementedError(f"node `{node.name}` (scaled_dot_product_attention): unknown argument {k!r}")
        vals[k] = v
    return vals


def _literal(node: fx.Node, name: str, v: Any, ok) -> Any:
    if isinstance(v, fx.Node):
        raise NotImplementedError(
            f"node `{node.name}` (scaled_dot_product_attention): `{name}` is computed in the graph "
            f"({v.name}); lrpgraph needs it as a literal to make the attention explicit")
    if not ok(v):
        raise ValueError(f"node `{node.name}` (scaled_dot_product_attention): unsupported {name}={v!r}")
    return v


@register_pass
def explicit_attention(gm: fx.GraphModule) -> None:
    """Rewrite every ``scaled_dot_product_attention`` node into explicit nodes (see module doc)."""
    g = gm.graph
    for node in list(g.nodes):
        if not _is_sdpa(node):
            continue
        a = _sdpa_args(node)
        dropout = _literal(node, "dropout_p", a["dropout_p"], lambda v: isinstance(v, Number))
        if dropout != 0:
            raise ValueError(f"node `{node.name}` (scaled_dot_product_attention) has dropout_p={dropout}: "
                             "the model was traced in training mode; call model.eval() before explaining")
        causal = a["is_causal"]  # a literal, or a graph input with a default (timm's forward(x, is_causal=False))
        if not isinstance(causal, (bool, fx.Node)):
            raise ValueError(f"node `{node.name}` (scaled_dot_product_attention): unsupported is_causal={causal!r}")
        gqa = _literal(node, "enable_gqa", a["enable_gqa"], lambda v: isinstance(v, bool))
        if gqa:
            raise NotImplementedError(f"node `{node.name}` (scaled_dot_product_attention): enable_gqa=True "
                                      "(grouped query attention) is not supported yet")
        scale = _literal(node, "scale", a["scale"], lambda v: v is None or isinstance(v, Number))
        mask = a["attn_mask"]
        q, k, v = a["query"], a["key"], a["value"]
        with g.inserting_before(node):
            qs = g.call_function(scale_query, (q, None if scale is None else float(scale)))
            kt = g.call_method("transpose", (k, -2, -1))
            scores = g.call_function(torch.matmul, (qs, kt))
            if mask is not None or causal is not False:
                scores = g.call_function(attention_mask, (scores, mask, causal))
            attn = g.call_function(torch.softmax, (scores,), {"dim": -1})
            out = g.call_function(torch.matmul, (attn, v))
        out.meta.update(node.meta)
        node.replace_all_uses_with(out)
        g.erase_node(node)
