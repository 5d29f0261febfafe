"""Stored maps as an attribution method: ``lrpgraph evaluate --attributions DIR`` scores the maps
of a finished ``lrpgraph dataset`` run instead of computing them."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Union

import torch
from torch import Tensor, nn

from .dataset import MANIFEST, DatasetError, load_shards, model_fingerprint, read_manifest


class PrecomputedMaps:
    """An attribution method ``(model, x, target) -> map`` that looks the maps of a finished run
    up instead of computing them (``lrpgraph evaluate --attributions``): each row of ``x`` is
    matched by value to a sample of the run's data (``inputs``; default: the bundled images for a
    ``--data bundled`` run). Refuses other weights, inputs that are not among the samples, and
    targets other than the stored ones."""

    def __init__(self, out: Union[str, Path], inputs: Optional[Tensor] = None) -> None:
        self.out, cfg = out, read_manifest(out)["config"]
        if inputs is None:
            if cfg.get("data") != "bundled":
                raise DatasetError(f"{out}: made from --data {cfg.get('data')!r}; pass the inputs to look them up")
            from . import zoo
            inputs = zoo.load_samples(cfg["n"])[0]
        t = load_shards(out)
        self.relevance, self.target, self.fingerprint = t["relevance"], t["target"], cfg["model_sha256"]
        self._index = {self._key(inputs[i]): i for i in range(min(len(inputs), cfg["n"]))}
        self._models: set = set()
        self.__name__ = f"{cfg['preset']} (precomputed)"

    @staticmethod
    def _key(row: Tensor) -> bytes:
        return row.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()

    def __call__(self, model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        if id(model) not in self._models:
            if model_fingerprint(model) != self.fingerprint:
                raise DatasetError(f"{self.out}: the maps were made with other weights than this model")
            self._models.add(id(model))
        idx = [self._index.get(self._key(row), -1) for row in x]
        if -1 in idx:
            raise DatasetError(f"{self.out}: an input is not among the run's {len(self._index)} samples "
                               "(GAE explains mosaics, which a run does not hold)")
        idx_t = torch.tensor(idx)
        bad = torch.nonzero(self.target[idx_t] != target.cpu().view(-1)).flatten()
        if len(bad):
            j = int(bad[0])
            raise DatasetError(f"sample {idx[j]}'s stored map explains class {int(self.target[idx[j]])}, not "
                               f"class {int(target.view(-1)[j])}; make the run with --targets predicted")
        return self.relevance[idx_t].to(x.device, x.dtype)


_PRECOMPUTED: Dict[str, PrecomputedMaps] = {}


def precomputed(out: Union[str, Path]) -> PrecomputedMaps:
    """:class:`PrecomputedMaps` of a bundled-data run, loaded once per folder."""
    key = f"{Path(out).resolve()}:{(Path(out) / MANIFEST).stat().st_mtime_ns}"   # a changed run reloads
    if key not in _PRECOMPUTED:
        _PRECOMPUTED[key] = PrecomputedMaps(out)
    return _PRECOMPUTED[key]
