"""Small classifiers trained on Fashion-MNIST, with bundled weights and test images.

Three models in plain torch (no timm, no torchvision), each traceable by ``torch.fx``, for
3-channel 32x32 inputs:

* :class:`SmallVGG`: Conv-BN-ReLU blocks with max pooling and a linear head.
* :class:`SmallResNet`: BasicBlock-style residual blocks, global average pooling, linear head.
* :class:`SmallViT`: a small vision transformer whose attention is written with explicit ops
  (``q @ k.transpose``, ``softmax``, ``attn @ v``), so that relevance rules for matmul,
  softmax and layer norm apply to it.

Inputs: a Fashion-MNIST image (28x28 grey, ``uint8``) is scaled to [0, 1], zero-padded by 2
pixels on each side to 32x32, repeated to 3 channels and normalised with :data:`MEAN` and
:data:`STD` (see :func:`preprocess`). The weights were produced by ``benchmarks/train_fmnist.py``;
``lrpgraph/data/README.md`` records their provenance and test accuracy.

Example::

    from lrpgraph import zoo, Explainer
    model = zoo.load("vgg")
    x, y = zoo.load_samples(8)
    e = Explainer(model, rules="abslrp")(x, target=y)
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = [
    "CLASSES", "MEAN", "STD", "IMAGE_SIZE", "MODELS", "DATA_DIR",
    "SmallVGG", "SmallResNet", "SmallViT", "BasicBlock", "Attention", "Block",
    "build", "load", "weights_path", "preprocess", "unnormalise", "load_samples",
]

#: Fashion-MNIST class names, in label order.
CLASSES: Tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

#: Per-channel normalisation constants (the Fashion-MNIST training-set mean and std of the
#: [0, 1] pixel values, the same for all three channels).
MEAN: Tuple[float, float, float] = (0.2860, 0.2860, 0.2860)
STD: Tuple[float, float, float] = (0.3530, 0.3530, 0.3530)

#: Side length of the model input.
IMAGE_SIZE: int = 32

#: Directory holding the bundled weights and samples.
DATA_DIR: Path = Path(__file__).resolve().parent / "data"

SAMPLES_FILE = "fmnist_samples.pt"


# ---------------------------------------------------------------------------------------------
# models


def _conv_bn_relu(cin: int, cout: int) -> List[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=False)]


class SmallVGG(nn.Module):
    """A VGG-style CNN: ``features`` (Conv-BN-ReLU x2, MaxPool) x3, then ``classifier``
    (Flatten, Linear, ReLU, Linear). Input ``(B, 3, 32, 32)``, output ``(B, num_classes)`` logits.

    Args:
        num_classes: number of output classes.
        widths: channels of the three stages.
        hidden: width of the hidden linear layer.
    """

    def __init__(self, num_classes: int = 10, widths: Tuple[int, int, int] = (32, 64, 128),
                 hidden: int = 128) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.features = nn.Sequential(
            *_conv_bn_relu(3, w1), *_conv_bn_relu(w1, w1), nn.MaxPool2d(2),   # 16x16
            *_conv_bn_relu(w1, w2), *_conv_bn_relu(w2, w2), nn.MaxPool2d(2),  # 8x8
            *_conv_bn_relu(w2, w3), nn.MaxPool2d(2),                          # 4x4
        )
        self.classifier = nn.Sequential(
            nn.Flatten(1),
            nn.Linear(w3 * 4 * 4, hidden),
            nn.ReLU(inplace=False),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    The shortcut is the identity, or a 1x1 convolution with batch norm where the stride or the
    number of channels changes.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=False)
        self.downsample: Optional[nn.Sequential] = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class SmallResNet(nn.Module):
    """A small ResNet: stem (Conv-BN-ReLU), three stages of two :class:`BasicBlock` each
    (the first block of stages 2 and 3 halves the resolution), AdaptiveAvgPool2d, Flatten, Linear.

    Args:
        num_classes: number of output classes.
        widths: channels of the three stages.
    """

    def __init__(self, num_classes: int = 10, widths: Tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.stem = nn.Sequential(*_conv_bn_relu(3, w1))
        self.layer1 = nn.Sequential(BasicBlock(w1, w1), BasicBlock(w1, w1))
        self.layer2 = nn.Sequential(BasicBlock(w1, w2, stride=2), BasicBlock(w2, w2))
        self.layer3 = nn.Sequential(BasicBlock(w2, w3, stride=2), BasicBlock(w3, w3))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(w3, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


class Attention(nn.Module):
    """Multi-head self-attention written with explicit tensor ops (no fused kernels)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                      # each (B, heads, N, head_dim)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)               # (B, heads, N, N)
        attn = attn.softmax(-1)
        x = attn @ v                                 # (B, heads, N, head_dim)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class SmallViT(nn.Module):
    """A small vision transformer: 4x4 patch embedding (Conv2d, stride 4), class token joined
    with ``torch.cat``, learned position embedding, ``depth`` pre-norm :class:`Block`\\ s, final
    LayerNorm, the class token's features ``x[:, 0]`` and a linear head.

    Args:
        num_classes: number of output classes.
        image_size: input side length.
        patch: patch side length.
        dim: token width.
        depth: number of transformer blocks.
        heads: attention heads.
        mlp_ratio: MLP hidden width relative to ``dim``.
    """

    def __init__(self, num_classes: int = 10, image_size: int = IMAGE_SIZE, patch: int = 4,
                 dim: int = 64, depth: int = 4, heads: int = 4, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        n = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)     # (B, N, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + self.pos_embed
        x = self.blocks(x)
        x = self.norm(x)
        return self.head(x[:, 0])


#: Zoo name -> constructor.
MODELS: Dict[str, Callable[[], nn.Module]] = {
    "vgg": SmallVGG,
    "resnet": SmallResNet,
    "vit": SmallViT,
}

_ALIASES = {"smallvgg": "vgg", "smallresnet": "resnet", "smallvit": "vit"}


def _canonical(name: str) -> str:
    key = name.lower().replace("-", "").replace("_", "")
    key = _ALIASES.get(key, key)
    if key not in MODELS:
        raise ValueError(f"unknown zoo model {name!r}; choose one of {sorted(MODELS)}")
    return key


def build(name: str) -> nn.Module:
    """A freshly initialised (untrained) model of the zoo architecture ``name``."""
    return MODELS[_canonical(name)]()


def weights_path(name: str) -> Path:
    """Path of the bundled weights of model ``name`` (``data/fmnist_<name>.pt``)."""
    return DATA_DIR / f"fmnist_{_canonical(name)}.pt"


def load(name: str, map_location: Union[str, torch.device] = "cpu") -> nn.Module:
    """The zoo model ``name`` (``"vgg"``, ``"resnet"`` or ``"vit"``) with its bundled trained
    weights, in eval mode.

    Raises:
        ValueError: unknown name.
        FileNotFoundError: the weights file is missing (run ``benchmarks/train_fmnist.py``).
    """
    model = build(name)
    path = weights_path(name)
    if not path.is_file():
        raise FileNotFoundError(
            f"no bundled weights for zoo model {name!r} at {path}; produce them with "
            f"`python benchmarks/train_fmnist.py --models {_canonical(name)}`")
    state = torch.load(path, map_location=map_location, weights_only=True)
    model.load_state_dict(state)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# data


def _stats(t: Tensor) -> Tuple[Tensor, Tensor]:
    mean = torch.tensor(MEAN, dtype=t.dtype, device=t.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=t.dtype, device=t.device).view(1, 3, 1, 1)
    return mean, std


def preprocess(images: Tensor) -> Tensor:
    """Turn Fashion-MNIST images into model inputs.

    Args:
        images: ``uint8`` images ``(B, 28, 28)`` or a single ``(28, 28)`` image, values 0..255
            (a float tensor is taken to be in [0, 1] already).

    Returns:
        ``float32`` tensor ``(B, 3, 32, 32)``: zero-padded by 2 pixels per side, repeated to
        three channels, normalised with :data:`MEAN` / :data:`STD`.
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a tensor, got {type(images).__name__}")
    if images.dim() == 2:
        images = images.unsqueeze(0)
    if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28):
        raise ValueError(f"expected images of shape (B, 28, 28) or (28, 28), got {tuple(images.shape)}")
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    pad = (IMAGE_SIZE - 28) // 2
    x = torch.nn.functional.pad(x, (pad, pad, pad, pad))            # (B, 32, 32), zero = black
    x = x.unsqueeze(1).expand(-1, 3, -1, -1)
    mean, std = _stats(x)
    return ((x - mean) / std).contiguous()


def unnormalise(x: Tensor) -> Tensor:
    """Undo the normalisation of :func:`preprocess`: ``(B, 3, H, W)`` (or ``(3, H, W)``) model
    inputs back to [0, 1] pixel values, clamped, for display."""
    single = x.dim() == 3
    if single:
        x = x.unsqueeze(0)
    mean, std = _stats(x)
    out = (x * std + mean).clamp(0.0, 1.0)
    return out[0] if single else out


def load_samples(n: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """The bundled Fashion-MNIST test images (the first 512 of the test set), preprocessed.

    Args:
        n: how many to return (the first ``n``); ``None`` for all 512.

    Returns:
        ``(images, labels)``: ``float32`` ``(B, 3, 32, 32)`` and ``int64`` ``(B,)``.
    """
    path = DATA_DIR / SAMPLES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"bundled samples missing at {path}; produce them with "
                                "`python benchmarks/train_fmnist.py`")
    data = torch.load(path, map_location="cpu", weights_only=True)
    images, labels = data["images"], data["labels"]
    if n is not None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        images, labels = images[:n], labels[:n]
    return preprocess(images), labels.long()
