"""Coverage of Hugging Face models: BERT, DistilBERT, MiniLM, ViT, DeiT, DINOv2 and Swin from
transformers, each built from a small random-weight config (nothing is downloaded), float64,
batch 2, explained with each preset through the Explainer's automatic tracer (``torch.export``:
transformers models do not trace with plain fx). Recorded as in ``coverage.py``: traced, explained,
conserved at every node under ``abslrp`` (1e-5 relative), the worst error and the failure.

Writes ``docs/coverage_hf.md`` and ``docs/coverage_hf.json``::

    OMP_NUM_THREADS=1 python benchmarks/coverage_hf.py                  # all (about a minute)
    OMP_NUM_THREADS=1 python benchmarks/coverage_hf.py --models bert vit --out /tmp/cov

Needs the ``text`` extra (transformers).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from coverage import PRESETS, TOL, _cell, _failure, _short_error, explain_row, run_worker  # noqa: E402

#: one small config per architecture: 2 layers, width 64, 4 heads (MiniLM: its real shape)
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
TOKENS = (2, 8)  # batch, sequence length of the text inputs
IMAGE = (2, 3, 64, 64)


def _text(cfg_name: str, model_name: str, **kw):
    import torch
    import transformers as T
    cfg = getattr(T, cfg_name)(vocab_size=100, max_position_embeddings=64, num_labels=3, **kw)
    ids = torch.randint(1, 100, TOKENS, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(TOKENS, dtype=torch.long)
    mask[1, -3:] = 0  # one padded sample: the mask must keep padding out of the relevance
    return getattr(T, model_name)(cfg), ids, {"extra_inputs": [mask], "output": "logits"}


def _image(cfg_name: str, model_name: str, **kw):
    import torch
    import transformers as T
    cfg = getattr(T, cfg_name)(image_size=IMAGE[-1], num_labels=3, **kw)
    x = torch.randn(IMAGE, generator=torch.Generator().manual_seed(0))
    return getattr(T, model_name)(cfg), x, {"output": "logits"}


def _minilm():
    """all-MiniLM-L6-v2's architecture (BERT, 6 layers, width 384, 12 heads), random weights, as a
    sentence-similarity model (:func:`lrpgraph.text.similarity_graph`)."""
    import torch
    import transformers as T
    from lrpgraph.text import similarity_graph
    cfg = T.BertConfig(vocab_size=100, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                       intermediate_size=1536, max_position_embeddings=64)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (TOKENS[0], 2, TOKENS[1]), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 1, -2:] = 0
    model = similarity_graph(T.BertModel(cfg).eval().double())
    return model, ids, {"extra_inputs": [mask], "output_relevance": torch.ones(TOKENS[0], 1, dtype=torch.float64)}


MODELS: Dict[str, Tuple[str, Callable]] = {
    "bert": ("BertForSequenceClassification", lambda: _text("BertConfig", "BertForSequenceClassification", **SMALL)),
    "distilbert": ("DistilBertForSequenceClassification", lambda: _text(
        "DistilBertConfig", "DistilBertForSequenceClassification", dim=64, n_layers=2, n_heads=4, hidden_dim=128)),
    "minilm": ("all-MiniLM-L6-v2 shape, BertModel + similarity_graph", _minilm),
    "vit": ("ViTForImageClassification", lambda: _image("ViTConfig", "ViTForImageClassification",
                                                        patch_size=16, **SMALL)),
    "deit": ("DeiTForImageClassification", lambda: _image("DeiTConfig", "DeiTForImageClassification",
                                                         patch_size=16, **SMALL)),
    "dinov2": ("Dinov2ForImageClassification", lambda: _image("Dinov2Config", "Dinov2ForImageClassification",
                                                              patch_size=16, **SMALL)),
    "swin": ("SwinForImageClassification", lambda: _image(
        "SwinConfig", "SwinForImageClassification", patch_size=4, window_size=4, embed_dim=16,
        depths=[1, 1], num_heads=[2, 2])),
}


def run_one(key: str, presets) -> dict:
    """Build one model (random weights, float64) and explain it with each preset."""
    import torch
    from lrpgraph.timmzoo import ensure_torchvision
    ensure_torchvision()  # transformers imports torchvision
    torch.manual_seed(0)
    row: dict = {"model": key, "class": MODELS[key][0]}
    try:
        model, x, call = MODELS[key][1]()
        model = model.eval().double()
        x = x.double() if x.is_floating_point() else x
    except Exception as exc:  # noqa: BLE001
        row["error"] = _short_error(exc)
        return row
    row["input"] = "x".join(str(s) for s in x.shape[1:]) + ("" if x.is_floating_point() else " token ids")
    for p in presets:
        row[p] = explain_row(model, x, p, **dict(call))
    return row


def _child(key: str, presets, timeout: float) -> dict:
    return run_worker([os.path.abspath(__file__), "--worker", key, "--presets", *presets], timeout,
                      {"model": key, "class": MODELS[key][0]})


def write(rows: List[dict], out: str, command: str) -> None:
    import transformers
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "coverage_hf.json"), "w") as f:
        json.dump(rows, f, indent=1)
    n = len(rows)
    ok = lambda p, k: sum(bool((r.get(p) or {}).get(k)) for r in rows)  # noqa: E731
    md = ["# Coverage of Hugging Face models", "",
          f"transformers {transformers.__version__}; each architecture from a small random-weight config "
          "(nothing downloaded): text models 2 layers, width 64, 4 heads (MiniLM: its real shape, 6 layers, "
          "width 384, 12 heads, as a sentence-similarity model), token ids (2, 8) with one padded sample; "
          "image models 3x64x64. float64, batch 2, each model in its own process, captured by the "
          "Explainer's automatic tracer (`torch.export`). Columns as in [coverage.md](coverage.md): "
          f"*abslrp* `yes` = explained and conserved at every node (within {TOL:g} relative), `leak` = "
          "explained with some node off by more, `error` = not explained.", "",
          "Reproduce:", "", "```text", command, "```", "", "| | models |", "|---|---|",
          f"| `abslrp` explained | {ok('abslrp', 'explained')} / {n} |",
          f"| `abslrp` explained and conserved | {sum(_cell(r, 'abslrp') == 'yes' for r in rows)} / {n} |",
          f"| `abslrp-renorm` explained | {ok('abslrp-renorm', 'explained')} / {n} |",
          f"| `lrp-epsilon` explained | {ok('lrp-epsilon', 'explained')} / {n} |", "",
          "| model | class | input | tracer | abslrp | worst | abslrp-renorm | lrp-epsilon | failure |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r.get("abslrp") or {}
        worst = "" if c.get("worst") is None else f"{c['worst']:.1e}"
        fail = _failure(r).replace("|", "\\|").replace("\n", " ")
        md.append(f"| {r['model']} | {r.get('class', '')} | {r.get('input', '')} | {c.get('tracer', '')} | "
                  f"{_cell(r, 'abslrp')} | {worst} | {_cell(r, 'abslrp-renorm')} | {_cell(r, 'lrp-epsilon')} | {fail} |")
    with open(os.path.join(out, "coverage_hf.md"), "w") as f:
        f.write("\n".join(md) + "\n")


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--presets", nargs="*", default=list(PRESETS))
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per model")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(run_one(a.worker, a.presets)), flush=True)
        return
    rows = []
    for k in a.models:
        rows.append(_child(k, a.presets, a.timeout))
        print(f"{k:12s} abslrp={_cell(rows[-1], 'abslrp'):5s} {_failure(rows[-1])[:140]}", flush=True)
    cmd = "OMP_NUM_THREADS=1 python benchmarks/coverage_hf.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write(rows, a.out, cmd.strip())


if __name__ == "__main__":
    main()
