"""Train the lrpgraph zoo models (SmallVGG, SmallResNet, SmallViT) on Fashion-MNIST, on CPU.

Reads the IDX files installed by the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist/``), trains each chosen model with a fixed seed, prints
its accuracy on the 10,000 test images, and writes

* ``lrpgraph/data/fmnist_<name>.pt``: the model's ``state_dict`` (float32);
* ``lrpgraph/data/fmnist_samples.pt``: the first 512 test images (``uint8`` (512, 28, 28)) and
  their labels, which ``lrpgraph.zoo.load_samples`` returns.

Usage::

    python benchmarks/train_fmnist.py [--models vgg resnet vit] [--epochs N] [--data DIR]

Needs torch only (no torchvision). Each model takes a few minutes on two CPU cores.
"""
from __future__ import annotations

import argparse
import gzip
import struct
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from lrpgraph import zoo  # noqa: E402

DEFAULT_DATA = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
N_SAMPLES = 512

#: Per-model training recipe: epochs, peak learning rate, weight decay, batch size.
RECIPES: Dict[str, Dict[str, float]] = {
    "vgg": dict(epochs=3, lr=2e-3, wd=5e-4, batch=128),
    "resnet": dict(epochs=2, lr=3e-3, wd=5e-4, batch=128),
    "vit": dict(epochs=3, lr=1e-3, wd=0.05, batch=128),
}


def read_idx(path: Path) -> Tensor:
    """Read a (gzipped) IDX file of unsigned bytes into a ``uint8`` tensor."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    body = bytearray(data[4 + 4 * ndim:])
    t = torch.frombuffer(body, dtype=torch.uint8)
    if t.numel() != int(torch.tensor(dims).prod()):
        raise ValueError(f"{path}: header says {dims}, body has {t.numel()} bytes")
    return t.reshape(dims).clone()


def load_fmnist(root: Path) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(train_images, train_labels, test_images, test_labels)`` as ``uint8``/``int64`` tensors."""
    missing = [name for name in FILES.values() if not (root / name).is_file()]
    if missing:
        raise SystemExit(
            f"error: Fashion-MNIST not found in {root} (missing: {', '.join(missing)}).\n"
            "  fix: install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), "
            "or pass --data DIR with the four IDX files")
    t = {k: read_idx(root / v) for k, v in FILES.items()}
    return (t["train_images"], t["train_labels"].long(), t["test_images"], t["test_labels"].long())


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, labels: Tensor, batch: int = 1000) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on ``uint8`` images."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        x = zoo.preprocess(images[i:i + batch])
        correct += (model(x).argmax(1) == labels[i:i + batch]).sum().item()
    return correct / len(images)


def train(name: str, data: Tuple[Tensor, Tensor, Tensor, Tensor], epochs: Optional[int],
          seed: int) -> Tuple[nn.Module, float, float]:
    """Train zoo model ``name``; returns ``(model, test accuracy, seconds)``."""
    recipe = RECIPES[name]
    epochs = int(recipe["epochs"] if epochs is None else epochs)
    batch = int(recipe["batch"])
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = zoo.build(name)
    decay = [p for n, p in model.named_parameters() if p.dim() > 1 and "embed" not in n and "token" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() > 1 and "embed" not in n and "token" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe["wd"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe["lr"])
    steps_per_epoch = len(xtr) // batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe["lr"], total_steps=epochs * steps_per_epoch,
                                                pct_start=0.15)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[{name}] {type(model).__name__}: {n_params:,} parameters, {epochs} epochs x "
          f"{steps_per_epoch} steps, batch {batch}, AdamW lr {recipe['lr']}", flush=True)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        running, seen = 0.0, 0
        for s in range(steps_per_epoch):
            idx = perm[s * batch:(s + 1) * batch]
            x = zoo.preprocess(xtr[idx])
            flip = torch.rand(len(idx), generator=gen) < 0.5   # horizontal flips
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            loss = F.cross_entropy(model(x), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item() * len(idx)
            seen += len(idx)
            if (s + 1) % 100 == 0:
                print(f"[{name}] epoch {epoch + 1} step {s + 1}/{steps_per_epoch} "
                      f"loss {running / seen:.4f} ({time.time() - t0:.0f}s)", flush=True)
        acc = evaluate(model, xte, yte)
        print(f"[{name}] epoch {epoch + 1}/{epochs}: train loss {running / seen:.4f}, "
              f"test acc {acc:.4f} ({time.time() - t0:.0f}s)", flush=True)
    seconds = time.time() - t0
    model.eval()
    return model, evaluate(model, xte, yte), seconds


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(zoo.MODELS), choices=list(zoo.MODELS))
    p.add_argument("--epochs", type=int, default=None, help="override every model's default epochs")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="directory with the IDX files")
    p.add_argument("--out", type=Path, default=zoo.DATA_DIR, help="where to write weights and samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    data = load_fmnist(args.data)
    args.out.mkdir(parents=True, exist_ok=True)

    samples = args.out / zoo.SAMPLES_FILE
    torch.save({"images": data[2][:N_SAMPLES].clone(), "labels": data[3][:N_SAMPLES].clone()}, samples)
    print(f"wrote {samples} ({samples.stat().st_size / 1e3:.0f} kB)", flush=True)

    results = []
    for name in args.models:
        model, acc, seconds = train(name, data, args.epochs, args.seed)
        state = {k: v.detach().float().contiguous() if v.is_floating_point() else v
                 for k, v in model.state_dict().items()}
        path = args.out / f"fmnist_{name}.pt"
        torch.save(state, path)
        results.append((name, acc, seconds, path.stat().st_size))
        print(f"[{name}] test accuracy {acc:.4f} in {seconds:.0f}s; wrote {path} "
              f"({path.stat().st_size / 1e6:.2f} MB)", flush=True)

    print("\n| model | test accuracy (10k) | train time (s) | weights (MB) |")
    print("|---|---|---|---|")
    for name, acc, seconds, size in results:
        print(f"| {name} | {acc * 100:.2f}% | {seconds:.0f} | {size / 1e6:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
