"""Text models: Hugging Face encoders traced into lrpgraph's graph, token-level relevance.

Hugging Face models cannot be traced by plain ``torch.fx`` (their forward branches on argument
values); :func:`trace_hf` uses transformers' own fx tracer (``transformers.utils.fx``, present in
transformers 4.x; install the ``text`` extra) and returns a ``GraphModule`` that shares the model's
parameters and that :class:`lrpgraph.Explainer` accepts like any model::

    gm = lrpgraph.text.trace_hf(model, ["input_ids", "attention_mask"])
    e = lrpgraph.Explainer(gm, output="logits")(ids, extra_inputs=[mask])
    e.relevance                       # (B, N): one value per token

The embedding rule sums the relevance over the embedding dim, so the ``input_ids`` input gets
one value per token. :func:`similarity_graph` builds, from an encoder, a model whose output is the
cosine similarity of two sentence embeddings (mean pooling over the tokens, as sentence-transformers
does), to explain which tokens of both sentences make them similar.

Nothing here imports transformers until :func:`trace_hf` is called.
"""
from __future__ import annotations

import operator
from typing import Any, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` ``(B, N, D)`` over the tokens where ``mask`` ``(B, N)`` is non-zero: ``(B, D)``.

    One graph op with its own rules (the mask is a constant: relevance goes to ``x`` only).
    """
    m = mask.to(x.dtype)
    w = m / m.sum(dim=-1, keepdim=True).clamp(min=1.0)
    return (x * w.unsqueeze(-1)).sum(dim=-2)


def trace_hf(model: nn.Module, input_names: Sequence[str] = ("input_ids", "attention_mask")) -> fx.GraphModule:
    """Trace a Hugging Face model with transformers' fx tracer.

    The returned ``GraphModule`` shares parameters, buffers and submodules with ``model`` and has
    its training flag; the model itself is left as it was (the tracer's change of
    ``config.use_cache`` is undone).

    Raises:
        ImportError: transformers (4.x, with ``transformers.utils.fx``) is not installed.
    """
    try:
        from transformers.utils.fx import symbolic_trace
    except ImportError as exc:  # transformers missing, or 5.x (no fx tracer)
        raise ImportError("tracing a Hugging Face model needs transformers 4.x with transformers.utils.fx: "
                          "pip install 'lrpgraph[text]' (with -c constraints.txt)") from exc
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    try:
        from .trace import TRACE_LOCK
        with TRACE_LOCK.tracing():  # fx patches process-wide state: one trace at a time
            gm = symbolic_trace(model, input_names=list(input_names))
    finally:
        if config is not None and use_cache is not None:
            config.use_cache = use_cache
    _copy_training(gm, model)
    return gm


def similarity_graph(encoder: nn.Module, key: Any = "last_hidden_state",
                     input_names: Sequence[str] = ("input_ids", "attention_mask")) -> fx.GraphModule:
    """A model computing the cosine similarity of the mean-pooled embeddings of two sentences.

    The result takes ``input_ids`` and ``attention_mask`` shaped ``(B, 2, N)`` (a pair per
    sample) and returns ``(B, 1)``: ``cos(e_a, e_b)`` with ``e = masked_mean(states, mask)``, as
    sentence-transformers pools. Each sentence runs through its own copy of the encoder's graph
    (same parameters), so the batch axis stays the pairs' axis everywhere (per-sample statistics
    in the report stay per pair), and the relevance comes back as ``(B, 2, N)``: one value per
    token of each sentence. Explain it with ``output_relevance=torch.ones(B, 1)``.

    Args:
        encoder: a Hugging Face encoder (``BertModel``; traced with :func:`trace_hf`) or an
            already traced ``GraphModule`` taking ``(input_ids, attention_mask)`` ``(B, N)``.
        key: the entry of the encoder's output holding the token states ``(B, N, D)`` (a dict key
            or tuple index; ignored if the encoder returns a tensor).
    """
    enc = encoder if isinstance(encoder, fx.GraphModule) else trace_hf(encoder, input_names)
    ph = [n for n in enc.graph.nodes if n.op == "placeholder"]
    if len(ph) < 2:
        raise ValueError(f"the encoder graph takes {len(ph)} input(s); it needs (input_ids, attention_mask)")
    g = fx.Graph()
    ids, mask = g.placeholder("input_ids"), g.placeholder("attention_mask")
    embs = []
    for j in (0, 1):
        ij = g.call_function(operator.getitem, (ids, (slice(None), j)))
        mj = g.call_function(operator.getitem, (mask, (slice(None), j)))
        val_map = {ph[0]: ij, ph[1]: mj}
        for p in ph[2:]:  # further encoder inputs keep their defaults
            if not p.args:
                raise ValueError(f"encoder input `{p.name}` has no default; trace the encoder with "
                                 "input_names=('input_ids', 'attention_mask') only")
            val_map[p] = p.args[0]
        out = g.graph_copy(enc.graph, val_map)
        hidden = out if isinstance(out, fx.Node) else out[key if isinstance(out, dict) else 0]
        pooled = g.call_function(masked_mean, (hidden, mj))
        embs.append(g.call_function(F.normalize, (pooled,), {"dim": -1}))
    sim = g.call_function(torch.einsum, ("bd,bd->b", embs[0], embs[1]))
    g.output(g.call_method("unsqueeze", (sim, -1)))
    return _graph_module(enc, g, "SentenceSimilarity")


def _graph_module(root: nn.Module, graph: fx.Graph, name: str) -> fx.GraphModule:
    """``GraphModule(root, graph)`` with ``root``'s training flag on the containers it creates."""
    gm = fx.GraphModule(root, graph, class_name=name)
    _copy_training(gm, root)
    return gm


def _copy_training(gm: fx.GraphModule, root: nn.Module) -> None:
    """Give ``gm`` and the plain container modules it created ``root``'s training flag (``.train()``
    would also set it on the submodules ``gm`` shares with ``root``, i.e. change the user's model)."""
    own = {id(m) for m in root.modules()}
    for m in gm.modules():
        if id(m) not in own:
            m.training = root.training


def token_table(tokens: Sequence[str], relevance: Tensor, mask: Optional[Tensor] = None,
                width: int = 30) -> str:
    """A text bar chart of per-token relevance (one sample): ``token  value  ####``."""
    r = relevance.detach().double().cpu().reshape(-1)
    n = len(tokens) if mask is None else int(mask.reshape(-1).sum())
    peak = float(r[:n].abs().max()) or 1.0
    lines: List[str] = []
    tw = max(len(t) for t in tokens[:n])
    for t, v in zip(tokens[:n], r[:n].tolist()):
        bar = ("+" if v >= 0 else "-") * int(round(abs(v) / peak * width))
        lines.append(f"{t:<{tw}}  {v:+.4f}  {bar}")
    return "\n".join(lines)
