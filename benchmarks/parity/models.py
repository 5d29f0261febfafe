"""Small deterministic-weight models for the absLRP parity harness.

The same recipe builds each model under timm 0.4.12 (the paper-era reference), timm 1.0.11
(the current reference) and the timm of this repository, so that all three see identical
weights: every floating-point entry of the state dict is drawn from its own generator, seeded
from the fixture seed and the entry's name. The DistilBERT classifier is built the same way with
transformers 4.26.1 (paper-era reference) and this repository's transformers: their state dicts
have the same names. Nothing here depends on lrpgraph.
"""
from __future__ import annotations

import math
import zlib
from typing import Dict, Tuple

import torch
from torch import nn

#: name -> (kind, constructor keyword arguments); image inputs are (3, 32, 32), 10 classes
SPECS: Dict[str, dict] = {
    "vit": dict(kind="vit", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0),
    "deit": dict(kind="vit", img_size=32, patch_size=16, embed_dim=48, depth=2, num_heads=3, mlp_ratio=4.0),
    "resnet_basic": dict(kind="resnet", block="basic", layers=[1, 1]),
    "resnet_bottleneck": dict(kind="resnet", block="bottleneck", layers=[2, 1]),
    "vgg": dict(kind="vgg", channels=[8, "M", 16, "M"]),
    "distilbert": dict(kind="distilbert", vocab_size=100, dim=32, n_heads=2, hidden_dim=64, n_layers=2,
                       max_position_embeddings=32, num_labels=3),
}
NUM_CLASSES = 10
#: models with a reference in one era only (the current code has no DistilBERT rule set)
ERAS = {"distilbert": ("paper",)}


def build(name: str, timm, seed: int = 0) -> nn.Module:
    """The model ``name`` of :data:`SPECS` built with the given ``timm`` module, weights from
    :func:`init_weights`, in eval mode and float64. DistilBERT comes from transformers (import
    timm first where torchvision needs the CPU shim: transformers imports it too)."""
    spec = dict(SPECS[name])
    kind = spec.pop("kind")
    if kind == "distilbert":
        from transformers import DistilBertConfig, DistilBertForSequenceClassification
        model = DistilBertForSequenceClassification(DistilBertConfig(**spec))
    elif kind == "vit":
        from timm.models.vision_transformer import VisionTransformer
        model = VisionTransformer(num_classes=NUM_CLASSES, qkv_bias=True, **spec)
    elif kind == "resnet":
        from timm.models.resnet import BasicBlock, Bottleneck, ResNet
        block = BasicBlock if spec["block"] == "basic" else Bottleneck
        model = ResNet(block=block, layers=list(spec["layers"]) + [1, 1], num_classes=NUM_CLASSES)
        # two stages only (timm's forward calls layer1..layer4: the last two become identities)
        model.layer3, model.layer4 = nn.Identity(), nn.Identity()
        model.fc = nn.Linear(128 * block.expansion, NUM_CLASSES)
    else:
        model = VGGStyle(spec["channels"])
    init_weights(model, seed)
    return model.double().eval()


class VGGStyle(nn.Module):
    """A VGG-style CNN: convs, ReLUs and max-pools, a conv MLP head, global average pool, linear.
    Its attribute layout (``features``, ``pre_logits.fc1/act1/fc2/act2``, ``head.global_pool/fc``)
    is what the paper-era reference's VGG wrapper expects; ``forward`` is a plain chain."""

    def __init__(self, channels, hidden: int = 16):
        super().__init__()
        layers, c = [], 3
        for v in channels:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        self.pre_logits = nn.Module()
        self.pre_logits.fc1 = nn.Conv2d(c, hidden, 3)
        self.pre_logits.act1 = nn.ReLU()
        self.pre_logits.fc2 = nn.Conv2d(hidden, hidden, 1)
        self.pre_logits.act2 = nn.ReLU()
        self.head = nn.Module()
        try:  # the same class in timm 0.4 (timm.models.layers) and 1.x (timm.layers)
            from timm.layers import SelectAdaptivePool2d
        except ImportError:
            from timm.models.layers import SelectAdaptivePool2d
        self.head.global_pool = SelectAdaptivePool2d(pool_type="avg", flatten=True)
        self.head.fc = nn.Linear(hidden, NUM_CLASSES)
        self.drop_rate = 0.0

    def forward(self, x):
        p, h = self.pre_logits, self.head
        x = p.act2(p.fc2(p.act1(p.fc1(self.features(x)))))
        return h.fc(h.global_pool(x))


def init_weights(model: nn.Module, seed: int) -> None:
    """Fill every floating-point state entry deterministically (per name, version-independent)."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            g = torch.Generator().manual_seed(seed * 1000003 + zlib.crc32(name.encode()))
            z = torch.randn(t.shape, generator=g, dtype=torch.float64)
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "running_var":
                v = torch.rand(t.shape, generator=g, dtype=torch.float64) + 0.5
            elif leaf == "running_mean" or leaf == "bias":
                v = 0.1 * z
            elif t.dim() == 1 and leaf == "weight":  # norms
                v = 1.0 + 0.2 * z
            elif leaf in ("cls_token", "pos_embed"):
                v = 0.2 * z
            else:
                v = z / math.sqrt(t[0].numel())
            t.copy_(v.to(t.dtype))


def inputs(seed: int, n: int = 2) -> torch.Tensor:
    """``n`` deterministic float64 images ``(n, 3, 32, 32)``."""
    g = torch.Generator().manual_seed(seed + 12345)
    return torch.randn((n, 3, 32, 32), generator=g, dtype=torch.float64)


def token_inputs(seed: int, n: int = 3, length: int = 8) -> Tuple[torch.Tensor, torch.Tensor]:
    """``n`` deterministic token sequences: ids ``(n, length)`` (1..vocab-1, padding id 0) and
    their attention mask; the second sequence ends in 3 padding tokens (mask 0)."""
    g = torch.Generator().manual_seed(seed + 54321)
    ids = torch.randint(1, SPECS["distilbert"]["vocab_size"], (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[1, length - 3:] = 0
    return ids * mask, mask
