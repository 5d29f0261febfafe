"""``lrpgraph dataset``: explain a data set into resumable safetensors shards (see
:mod:`lrpgraph.dataset`), in one process or several under ``torchrun``::

    lrpgraph dataset --model vgg --data bundled --n 512 --out runs/vgg
    torchrun --standalone --nproc_per_node 2 -m lrpgraph dataset --model vgg --num-samples 512 --out runs/vgg

Data: ``bundled`` (the bundled Fashion-MNIST test images, with labels) or a folder of images
(:class:`ImageFolder`).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageFolder(torch.utils.data.Dataset):
    """The images under ``root`` (recursively; extensions :data:`IMAGE_EXTS`), sorted by their
    path relative to ``root``. An image in a sub-folder gets the label of that first-level
    sub-folder (sub-folders sorted by name: 0, 1, ...), as in torchvision's ImageFolder; an
    image directly in ``root`` gets the label -1 (none).

    Transform (documented, fixed): convert to RGB; resize so that the shorter side is ``size``
    (bilinear); crop the centre ``size x size``; scale to [0, 1]; normalise per channel with
    ``mean`` and ``std``. Yields ``(float32 (3, size, size), int64 label)``.
    """

    def __init__(self, root: str, size: int, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"{root}: not a folder")
        self.files = sorted((p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()),
                            key=lambda p: p.relative_to(self.root).as_posix())
        if not self.files:
            raise ValueError(f"{root}: no images ({', '.join(IMAGE_EXTS)}) in it")
        self.classes = sorted({p.relative_to(self.root).parts[0] for p in self.files
                               if len(p.relative_to(self.root).parts) > 1})
        self.size = size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Tuple[Tensor, Tensor]:
        import numpy as np
        from PIL import Image

        path = self.files[i]
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = self.size / min(w, h)
            im = im.resize((max(self.size, round(w * s)), max(self.size, round(h * s))), Image.BILINEAR)
            w, h = im.size
            left, top = (w - self.size) // 2, (h - self.size) // 2
            im = im.crop((left, top, left + self.size, top + self.size))
            x = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        parts = path.relative_to(self.root).parts
        label = self.classes.index(parts[0]) if len(parts) > 1 else -1
        return (x - self.mean) / self.std, torch.tensor(label, dtype=torch.long)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lrpgraph dataset", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="vgg", help="vgg | resnet | vit (bundled, trained) | timm:NAME (random weights)")
    p.add_argument("--data", default="bundled", help="'bundled' or a folder of images")
    p.add_argument("--n", "--num-samples", dest="n", type=int, default=None,
                   help="the first N samples (default: all); under torchrun write --num-samples (torchrun "
                        "takes --n for an abbreviation of its own options)")
    p.add_argument("--out", required=True, help="output folder; rerun with the same arguments to resume")
    p.add_argument("--rules", default="abslrp", help="preset (lrpgraph presets)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard file")
    p.add_argument("--targets", default="predicted", help="'predicted', 'label' or a class index")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "float64"),
                   help="stored relevance dtype")
    p.add_argument("--double", action="store_true", help="compute in float64")
    p.add_argument("--no-contrastive", action="store_true", help="explain the target alone")
    p.add_argument("--no-conservation", action="store_true", help="skip the per-sample conservation summary")
    p.add_argument("--size", type=int, default=None,
                   help="image side for folder data and timm models (default 32 for the bundled models, else 224)")
    p.add_argument("--device", default=None, help="default: cuda (one GPU per torchrun process) if present, else cpu")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _fail(msg: str) -> int:
    print(f"lrpgraph dataset: {msg}", file=sys.stderr)
    return 2


def _validate(a: argparse.Namespace) -> Optional[str]:
    """The first problem with the arguments, as one line, or None (checked before any work)."""
    from . import composite_names
    from .cli import ZOO

    if a.model not in ZOO and not (a.model.startswith("timm:") and len(a.model) > 5):
        return f"--model {a.model!r}: use one of {', '.join(ZOO)} or timm:NAME"
    if a.rules not in composite_names():
        return f"--rules {a.rules!r}: use one of {', '.join(composite_names())}"
    if a.data != "bundled" and not Path(a.data).is_dir():
        return f"--data {a.data!r}: use 'bundled' or an existing folder of images"
    for flag, v in (("--n", a.n), ("--batch-size", a.batch_size), ("--shard-size", a.shard_size),
                    ("--size", a.size)):
        if v is not None and v < 1:
            return f"{flag} must be at least 1, got {v}"
    if a.workers < 0:
        return f"--workers must be >= 0, got {a.workers}"
    if a.targets not in ("predicted", "label") and not a.targets.lstrip("-").isdigit():
        return f"--targets {a.targets!r}: use 'predicted', 'label' or a class index"
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        return f"--out {a.out}: exists and is not a folder"
    parent = next((q for q in [out, *out.parents] if q.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        return f"--out {a.out}: cannot write in {parent}"
    return None


def _device(a: argparse.Namespace) -> torch.device:
    if a.device:
        return torch.device(a.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _dataset(a: argparse.Namespace, model: torch.nn.Module):
    if a.data == "bundled":
        from . import zoo
        x, y = zoo.load_samples()
        if a.size not in (None, zoo.IMAGE_SIZE):
            x = torch.nn.functional.interpolate(x, size=(a.size, a.size), mode="bilinear", align_corners=False)
        return torch.utils.data.TensorDataset(x, y)
    if a.model in ("vgg", "resnet", "vit"):
        from . import zoo
        return ImageFolder(a.data, a.size or zoo.IMAGE_SIZE, zoo.MEAN, zoo.STD)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return ImageFolder(a.data, a.size or 224, cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD))


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``lrpgraph dataset`` (``argv`` without the subcommand). Returns the exit status."""
    a = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    problem = _validate(a)
    if problem:
        return _fail(problem)
    from .cli import _load_model
    from .dataset import DatasetError, explain_dataset

    try:
        model, _, _ = _load_model(a.model, a.size or 224)
        data = _dataset(a, model)
    except SystemExit as exc:          # _load_model's message for a missing timm
        return _fail(str(exc))
    except (ValueError, OSError) as exc:
        return _fail(str(exc))
    if a.n is not None and a.n > len(data):
        return _fail(f"--n {a.n}: --data {a.data} has {len(data)} samples")
    device = _device(a)
    model = model.to(device, torch.float64 if a.double else torch.float32)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = torch.distributed
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    targets = a.targets if a.targets in ("predicted", "label") else int(a.targets)
    try:
        m = explain_dataset(model, data, rules=a.rules, out=a.out, batch_size=a.batch_size, targets=targets,
                            n=a.n, shard_size=a.shard_size, relevance_dtype=a.dtype,
                            contrastive=not a.no_contrastive, conservation=not a.no_conservation,
                            num_workers=a.workers, name=a.model, data=a.data, progress=not a.quiet)
    except (DatasetError, ValueError) as exc:     # ValueError: the Explainer's, naming the node
        return _fail(str(exc).splitlines()[0])
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        s = m.get("summary") or {}
        worst = s.get("worst_rel_error")
        print(f"{a.out}: {m['config']['n']} samples in {len(m['shards'])} shard(s), preset {m['config']['preset']}"
              + (f"; worst relative conservation error {worst:.2e}" if worst is not None else "")
              + f"; manifest {Path(a.out) / 'manifest.json'}")
    return 0
