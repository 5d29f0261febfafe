"""Explain a whole data set: batched explanations written as safetensors shards, resumable and
sharded over processes (``torchrun``).

:func:`explain_dataset` cuts the first ``n`` samples of a dataset into fixed, contiguous shards of
``shard_size`` samples (``shard-00000.safetensors``, ...). The shards do not depend on the number
of processes: under ``torch.distributed`` rank ``r`` of ``W`` takes the shards ``k`` with
``k % W == r``, and every batch lies inside one shard, so each sample is explained in the same
batch whatever the number of processes, and the union over ranks equals a one-process run bit for
bit. A shard file is written to a temporary name and renamed into place, so it is either complete
or absent: a rerun skips the shards that exist and finishes a killed run without duplicates or gaps.

Each shard holds the tensors ``index`` (int64 sample index), ``relevance`` (``relevance_dtype``),
``target`` (int64), ``logits``, and the per-sample conservation summary ``relevance_sum`` (sum of
the input relevance) and ``rel_error`` (the worst relative conservation error over the nodes,
before any normalisation; its node is in the shard's metadata). ``manifest.json`` records the
configuration, the versions and, once every shard exists, the shard list with sample ranges and
SHA-256 checksums; ``conservation.csv`` has one row per sample.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .explainer import Explainer
from .registry import Composite, get_composite

FORMAT = "lrpgraph-dataset/1"
MANIFEST = "manifest.json"
DTYPES = {"float16": torch.float16, "float32": torch.float32, "float64": torch.float64}
#: test hook: exit abruptly (as a kill would) after this many shards were written in one run
FAIL_AFTER_ENV = "LRPGRAPH_DATASET_FAIL_AFTER"


class DatasetError(ValueError):
    """A dataset run that cannot start or cannot resume (bad arguments, a foreign manifest)."""


def shard_ranges(n: int, shard_size: int) -> List[Tuple[int, int]]:
    """``[(start, stop), ...]``: the contiguous sample ranges of the shards of ``n`` samples."""
    return [(lo, min(lo + shard_size, n)) for lo in range(0, n, shard_size)]


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def _dist() -> Tuple[int, int]:
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _dist()[1] > 1:
        torch.distributed.barrier()


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and values of the model's parameters and buffers:
    a resumed run refuses to mix shards of different weights."""
    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        t = t.detach()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.dtype == torch.bfloat16:
            t = t.float()
        h.update(t.cpu().contiguous().numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path: Union[str, Path]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _versions() -> Dict[str, str]:
    from . import __version__
    try:
        import safetensors
        st = safetensors.__version__
    except Exception:  # pragma: no cover - safetensors is required to get here
        st = "?"
    return {"lrpgraph": __version__, "torch": torch.__version__, "safetensors": st,
            "python": platform.python_version()}


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def read_manifest(out: Union[str, Path]) -> Dict[str, Any]:
    """The manifest of a dataset run in ``out`` (:class:`DatasetError` if there is none)."""
    path = Path(out) / MANIFEST
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{out}: no {MANIFEST}; this is not the output of `lrpgraph dataset`") from None
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: unreadable manifest ({exc})") from None
    if m.get("format") != FORMAT:
        raise DatasetError(f"{path}: format {m.get('format')!r}, expected {FORMAT!r}")
    return m


def _check_out(out: Path, config: Dict[str, Any]) -> None:
    """Refuse an output folder that holds another run, or that cannot be written."""
    if out.exists() and not out.is_dir():
        raise DatasetError(f"--out {out}: exists and is not a folder")
    if (out / MANIFEST).exists():
        old = read_manifest(out)["config"]
        diff = [k for k in sorted(set(old) | set(config)) if old.get(k) != config.get(k)]
        if diff:
            short = lambda v: repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "..."  # noqa: E731
            what = "; ".join(f"{k}: {short(old.get(k))} there, {short(config.get(k))} now" for k in diff[:3])
            raise DatasetError(f"{out} holds a run with another configuration ({what}); resume with "
                               "the same arguments, or choose an empty --out")
    elif out.is_dir() and any(out.glob("shard-*.safetensors")):
        raise DatasetError(f"{out} holds shards but no {MANIFEST}; choose an empty --out")


def _shard_done(path: Path, lo: int, hi: int) -> bool:
    """A finished shard: present, readable, holding exactly the samples ``lo..hi-1``."""
    if not path.is_file():
        return False
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            idx = f.get_tensor("index")
    except Exception:
        return False
    return torch.equal(idx, torch.arange(lo, hi, dtype=idx.dtype))


def _targets_for(targets: Any, labels: Optional[Tensor], b: int) -> Optional[Tensor]:
    if targets in (None, "predicted"):
        return None
    if targets == "label":
        if labels is None:
            raise DatasetError("targets='label' needs a dataset that yields (input, label) pairs")
        if bool((labels < 0).any()):
            raise DatasetError("targets='label': some samples have no label (-1); use targets='predicted'")
        return labels
    return torch.full((b,), int(targets), dtype=torch.long)


def _summary(e, b: int) -> Tuple[Tensor, List[str]]:
    """Per sample: the worst relative conservation error over the nodes, and that node."""
    rep = e.conservation()
    worst = torch.zeros(b, dtype=torch.float64)
    node = [""] * b
    floor = rep.noise_floor()
    for r in rep:
        if r.by_design:
            continue
        per = r.rel_errors(rep.masses, floor).amax(0)  # as the report judges the row, per sample
        for i in torch.nonzero(per > worst).flatten().tolist():
            worst[i], node[i] = per[i], r.name
    return worst, node


def explain_dataset(model: nn.Module, dataset: "torch.utils.data.Dataset", rules: Union[str, Composite] = "abslrp",
                    out: Union[str, Path] = "explanations", batch_size: int = 32, targets: Any = "predicted", *,
                    n: Optional[int] = None, shard_size: int = 256, relevance_dtype: str = "float32",
                    contrastive: bool = True, conservation: bool = True, num_workers: int = 0,
                    name: Optional[str] = None, data: str = "", progress: bool = True) -> Dict[str, Any]:
    """Explain the first ``n`` samples of ``dataset`` and write safetensors shards to ``out``.

    Args:
        model: the classifier, in eval mode, on the device to run on; it is not modified. Inputs
            are moved to its device and floating dtype.
        dataset: any ``torch.utils.data.Dataset`` yielding an input tensor, or ``(input, label)``.
        rules: a preset name or a :class:`~lrpgraph.registry.Composite`.
        out: output folder (created); a rerun with the same arguments resumes there.
        batch_size: samples per explained batch (batches never cross a shard).
        targets: ``"predicted"`` (the model's class), ``"label"`` (the dataset's), or a class index.
        n: how many samples (default: all).
        shard_size: samples per shard file.
        relevance_dtype: ``"float32"``, ``"float16"`` (half the disk) or ``"float64"``.
        contrastive: the preset's contrastive start, as in :class:`~lrpgraph.Explainer`.
        conservation: collect the per-sample conservation summary (off: a little faster).
        num_workers: DataLoader worker processes.
        name, data: how the model and the data are named in the manifest.
        progress: show a tqdm progress bar with images/s and an ETA (rank 0 only).

    Returns:
        The manifest (on every rank; the shard list is complete once all ranks are done).
    """
    if batch_size < 1 or shard_size < 1:
        raise DatasetError(f"batch_size and shard_size must be >= 1, got {batch_size}, {shard_size}")
    if relevance_dtype not in DTYPES:
        raise DatasetError(f"relevance_dtype {relevance_dtype!r}: choose one of {sorted(DTYPES)}")
    if not (targets in (None, "predicted", "label") or isinstance(targets, int)):
        raise DatasetError(f"targets {targets!r}: use 'predicted', 'label' or a class index")
    total = len(dataset)
    n = total if n is None else n
    if not 0 < n <= total:
        raise DatasetError(f"n={n}: the dataset has {total} samples")
    composite = get_composite(rules)
    param = next((p for p in list(model.parameters()) + list(model.buffers()) if p.is_floating_point()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    first = dataset[0]
    x0 = first[0] if isinstance(first, (tuple, list)) else first
    config = {"model": name or type(model).__name__, "model_sha256": model_fingerprint(model),
              "preset": composite.name, "rules": composite.description, "contrastive": contrastive,
              "targets": "predicted" if targets is None else targets, "data": data, "n": n,
              "input_shape": list(x0.shape), "compute_dtype": str(dtype).replace("torch.", ""),
              "relevance_dtype": relevance_dtype, "shard_size": shard_size, "batch_size": batch_size,
              "conservation": conservation}
    out = Path(out)
    rank, world = _dist()
    _check_out(out, config)          # every rank checks the same files: all refuse alike
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(f"--out {out}: cannot create the folder ({exc.strerror})") from None
    if not os.access(out, os.W_OK):
        raise DatasetError(f"--out {out}: the folder is not writable")
    if rank == 0 and not (out / MANIFEST).exists():
        _write_json(out / MANIFEST, {"format": FORMAT, "config": config, "versions": _versions(),
                                     "complete": False, "shards": []})
    _barrier()

    ranges = shard_ranges(n, shard_size)
    mine = [k for k in range(len(ranges)) if k % world == rank]
    todo = [k for k in mine if not _shard_done(out / shard_name(k), *ranges[k])]
    skipped = len(mine) - len(todo)
    for k in todo:                                   # half-written files of a killed run
        (out / f".{shard_name(k)}.tmp").unlink(missing_ok=True)
    ex = Explainer(model, rules=composite)
    rel_dtype = DTYPES[relevance_dtype]
    batches = [list(range(lo, min(lo + batch_size, ranges[k][1])))
               for k in todo for lo in range(ranges[k][0], ranges[k][1], batch_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers)
    pending = sum(ranges[k][1] - ranges[k][0] for k in todo)
    bar = _bar(pending, progress and rank == 0, f"rank 0/{world}" if world > 1 else "explain")
    fail_after = int(os.environ.get(FAIL_AFTER_ENV, "0") or 0)
    t0, done, written, t1 = time.perf_counter(), 0, 0, None
    parts: Dict[str, List[Tensor]] = {}
    nodes: List[str] = []
    shard_iter = iter(todo)
    k = next(shard_iter, None)
    for batch in loader:
        x, labels = (batch[0], batch[1] if len(batch) > 1 else None) if isinstance(batch, (tuple, list)) else (batch, None)
        b = x.shape[0]
        x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
        tgt = _targets_for(targets, None if labels is None else torch.as_tensor(labels).long(), b)
        e = ex(x, target=None if tgt is None else tgt.to(device), contrastive=contrastive, report=conservation)
        lo = ranges[k][0] + sum(len(t) for t in parts.get("index", []))
        rel = e.relevance.detach()
        new = {"index": torch.arange(lo, lo + b, dtype=torch.long), "relevance": rel.to("cpu", rel_dtype),
               "target": e.target.detach().to("cpu", torch.long),
               "logits": e.logits.detach().to("cpu", torch.float64 if rel_dtype == torch.float64 else torch.float32),
               "relevance_sum": rel.flatten(1).sum(1).to("cpu", torch.float64)}
        if conservation:
            worst, where = _summary(e, b)
            new["rel_error"] = worst
            nodes += where
        bad = ~torch.isfinite(new["relevance"].flatten(1)).all(1)
        if bool(bad.any()):      # never store a non-finite map (float16 overflows beyond 65504)
            i = lo + int(torch.nonzero(bad)[0])
            raise DatasetError(f"sample {i}: the relevance is not finite as {relevance_dtype}"
                               + ("; store float32" if relevance_dtype == "float16" else ""))
        for key, t in new.items():
            parts.setdefault(key, []).append(t)
        done += b
        bar.update(b)
        t1 = t1 or (time.perf_counter(), done)      # after the first batch (one-off set-up costs)
        if lo + b == ranges[k][1]:                     # the shard is complete: write it
            _write_shard(out, k, {key: torch.cat(v) for key, v in parts.items()}, nodes)
            parts, nodes, written = {}, [], written + 1
            if fail_after and written >= fail_after:       # test hook: die as a kill would,
                nxt = todo[todo.index(k) + 1:]             # leaving a half-written next shard
                if nxt:
                    (out / f".{shard_name(nxt[0])}.tmp").write_bytes(b"partial")
                os._exit(3)
            k = next(shard_iter, None)
    bar.close()
    now = time.perf_counter()
    dt = now - t0
    steady = f", {(done - t1[1]) / (now - t1[0]):.1f} after the first batch" if t1 and done > t1[1] else ""
    if rank == 0 or world == 1:
        print(f"rank {rank}: explained {done} samples in {len(todo)} shard(s) in {dt:.1f} s"
              + (f" ({done / dt:.1f} images/s{steady})" if done and dt > 0 else "")
              + (f"; {skipped} finished shard(s) skipped" if skipped else ""), file=sys.stderr)
    _barrier()
    if rank == 0:
        merge_manifest(out)
    _barrier()
    return read_manifest(out)


def _bar(total: int, enabled: bool, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the dataset extra
        from .evaluate._common import progress
        return progress(total, desc, enabled)
    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, smoothing=0.1)


def _write_shard(out: Path, k: int, tensors: Dict[str, Tensor], nodes: Sequence[str]) -> None:
    """Write shard ``k`` to a temporary file and rename it into place (atomic on POSIX)."""
    from safetensors.torch import save_file
    tmp = out / f".{shard_name(k)}.tmp"
    meta = {"shard": str(k), "worst_node": json.dumps(list(nodes))}
    save_file({key: t.contiguous() for key, t in tensors.items()}, str(tmp), metadata=meta)
    os.chmod(tmp, 0o644)
    os.replace(tmp, out / shard_name(k))


def merge_manifest(out: Union[str, Path], tol: float = 1e-5) -> Dict[str, Any]:
    """Complete the manifest of ``out``: shard list with sample ranges and checksums, and the
    conservation summary (``conservation.csv``). Raises :class:`DatasetError` if a shard is
    missing (another process has not finished; rerun to resume)."""
    from safetensors import safe_open
    out = Path(out)
    m = read_manifest(out)
    cfg = m["config"]
    ranges = shard_ranges(cfg["n"], cfg["shard_size"])
    missing = [k for k, r in enumerate(ranges) if not _shard_done(out / shard_name(k), *r)]
    if missing:
        raise DatasetError(f"{out}: {len(missing)} of {len(ranges)} shards are missing (first: "
                           f"{shard_name(missing[0])}); rerun the same command to finish them")
    shards, rows, worst = [], ["index,target,predicted,relevance_sum,rel_error,worst_node"], 0.0
    leaking = 0
    for k, (lo, hi) in enumerate(ranges):
        path = out / shard_name(k)
        shards.append({"file": path.name, "start": lo, "stop": hi, "sha256": file_sha256(path),
                       "bytes": path.stat().st_size})
        with safe_open(str(path), framework="pt") as f:
            t = {key: f.get_tensor(key) for key in f.keys()}
            where = json.loads((f.metadata() or {}).get("worst_node", "[]"))
        err = t.get("rel_error")
        pred = t["logits"].argmax(1)
        for i in range(hi - lo):
            e = float(err[i]) if err is not None else float("nan")
            rows.append(f"{lo + i},{int(t['target'][i])},{int(pred[i])},{float(t['relevance_sum'][i]):.9g},"
                        f"{e:.3e},{where[i] if i < len(where) else ''}")
        if err is not None:
            worst = max(worst, float(err.max()))
            leaking += int((err > tol).sum())
    (out / "conservation.csv").write_text("\n".join(rows) + "\n")
    m.update(complete=True, shards=shards, versions=_versions(),
             summary={"samples": cfg["n"], "worst_rel_error": worst if cfg["conservation"] else None,
                      f"samples_leaking_beyond_{tol:g}": leaking if cfg["conservation"] else None})
    _write_json(out / MANIFEST, m)
    return m


def load_shards(out: Union[str, Path], indices: Optional[Sequence[int]] = None,
                verify: bool = True) -> Dict[str, Tensor]:
    """The tensors of a finished run, concatenated in sample order (``indices``: only those
    samples, in that order). ``verify`` checks each shard's SHA-256 against the manifest."""
    from safetensors.torch import load_file
    out = Path(out)
    m = read_manifest(out)
    if not m.get("complete"):
        raise DatasetError(f"{out}: the run is not finished; rerun `lrpgraph dataset` with the same arguments")
    parts: Dict[str, List[Tensor]] = {}
    for s in m["shards"]:
        path = out / s["file"]
        if verify and file_sha256(path) != s["sha256"]:
            raise DatasetError(f"{path}: checksum differs from the manifest (file changed or corrupt)")
        for key, t in load_file(str(path)).items():
            parts.setdefault(key, []).append(t)
    res = {key: torch.cat(v) for key, v in parts.items()}
    if indices is not None:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        bad = idx[(idx < 0) | (idx >= len(res["index"]))]
        if len(bad):
            raise DatasetError(f"{out}: holds samples 0..{len(res['index']) - 1}; sample {int(bad[0])} is not there")
        res = {key: t[idx] for key, t in res.items()}
    return res
