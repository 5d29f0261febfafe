"""The Fashion-MNIST model zoo: bundled weights load, are the trained ones, and explain."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lrpgraph
from lrpgraph import zoo

NAMES = ["vgg", "resnet", "vit"]
#: Minimum accuracy on the 512 bundled test images. The bundled weights get 93.8% / 92.6% / 84.4%
#: there (93.0% / 90.6% / 83.0% on the full test set); an untrained model gets about 10%.
MIN_ACC = {"vgg": 0.85, "resnet": 0.85, "vit": 0.80}


@pytest.fixture(scope="module")
def samples():
    return zoo.load_samples()


@pytest.fixture(scope="module", params=NAMES)
def model(request):
    return request.param, zoo.load(request.param)


def test_samples_bundle():
    x, y = zoo.load_samples()
    assert x.shape == (512, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (512,) and y.dtype == torch.long
    assert int(y.min()) >= 0 and int(y.max()) < len(zoo.CLASSES)
    assert len(torch.unique(y)) == 10
    x8, y8 = zoo.load_samples(8)
    assert torch.equal(x8, x[:8]) and torch.equal(y8, y[:8])


def test_preprocess_and_unnormalise():
    img = torch.zeros(28, 28, dtype=torch.uint8)
    img[10:20, 5:15] = 255
    x = zoo.preprocess(img)
    assert x.shape == (1, 3, 32, 32)
    assert torch.equal(x[0, 0], x[0, 1]) and torch.equal(x[0, 0], x[0, 2])
    back = zoo.unnormalise(x)
    assert back.min() >= 0 and back.max() <= 1
    expect = torch.nn.functional.pad(img.float() / 255, (2, 2, 2, 2))
    torch.testing.assert_close(back[0, 0], expect, atol=1e-6, rtol=0)
    assert zoo.unnormalise(x[0]).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="28, 28"):
        zoo.preprocess(torch.zeros(2, 32, 32, dtype=torch.uint8))


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown zoo model"):
        zoo.load("alexnet")


def test_loads_in_eval_mode(model):
    name, m = model
    assert isinstance(m, nn.Module)
    assert not any(mod.training for mod in m.modules())
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert type(m) is zoo.MODELS[name]


def test_traces_with_fx(model):
    name, m = model
    gm = torch.fx.symbolic_trace(m)
    x, _ = zoo.load_samples(4)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), m(x))


def test_accuracy_on_bundled_samples(model, samples):
    name, m = model
    x, y = samples
    with torch.no_grad():
        acc = (m(x).argmax(1) == y).float().mean().item()
    assert acc >= MIN_ACC[name], f"{name}: accuracy {acc:.3f} on the bundled samples"


def _explain(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> lrpgraph.Explanation:
    return lrpgraph.Explainer(m, rules="abslrp")(x, target=y)


def _check_explanation(e: lrpgraph.Explanation, x: torch.Tensor) -> None:
    assert e.relevance.shape == x.shape
    assert torch.isfinite(e.relevance).all()
    assert (e.relevance.flatten(1).abs().sum(1) > 0).all()
    rep = e.conservation()  # absLRP conserves at every node of the trained models
    assert rep.max_rel_error() < 1e-4, rep.table()


@pytest.mark.parametrize("name", ["vgg", "resnet"])
def test_cnn_explains_with_abslrp(name):
    m = zoo.load(name)
    x, y = zoo.load_samples(8)
    e = _explain(m, x, y)
    _check_explanation(e, x)
    assert torch.equal(e.target, y)


def test_vit_explains_with_abslrp():
    m = zoo.load("vit")
    x, y = zoo.load_samples(8)
    e = _explain(m, x, y)  # a missing rule is a failure here, never a skip
    _check_explanation(e, x)
