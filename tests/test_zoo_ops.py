"""Small timm models that exercised the op-family rules and the crash fixes: explaining twice or
with two presets, the model and a user's GraphModule never modified, LSTM outputs in the report's
batch-axis probe, the squeeze-excitation / hard activation / functional BatchNorm models conserved.
"""
from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import lrpgraph

DT = torch.float64


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name,size", [("levit_128s", 64)])
def test_explain_twice_and_with_two_presets(timm, name: str, size: int) -> None:
    """A second Explainer on the same model used to fail (LeViT and EfficientFormer cache their
    attention biases on the module in eval mode: tracing cached an fx proxy there)."""
    model = timm.create_model(name, pretrained=False, img_size=size, num_classes=4).eval().to(DT)
    x = torch.randn(2, 3, size, size, dtype=DT)
    with torch.no_grad():
        before = model(x)
    state = _state(model)
    maps = []
    for preset in ("abslrp", "lrp-epsilon", "abslrp"):
        maps.append(lrpgraph.Explainer(model, rules=preset)(x).relevance)
    assert torch.equal(maps[0], maps[2])  # the same preset twice: the same map
    assert not torch.equal(maps[0], maps[1])
    with torch.no_grad():
        assert torch.equal(model(x), before)  # the model still runs, unchanged
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_graph_module_passed_in_is_not_modified() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    gm = fx.symbolic_trace(model.eval().to(DT))
    code = gm.code
    x = torch.randn(2, 3, 6, 6, dtype=DT)
    for preset in ("abslrp", "lrp-epsilon"):
        lrpgraph.Explainer(gm, rules=preset)(x)
    assert gm.code == code


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 5, batch_first=True)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        out, (h, c) = self.lstm(x)
        return self.fc(out[:, -1])


def test_lstm_nested_tuple_output_gives_a_clear_error() -> None:
    """The report's batch-axis probe read the LSTM's (out, (h, c)) shapes; now the missing rule is
    reported by name (no LSTM rule yet)."""
    ex = lrpgraph.Explainer(Recurrent().eval().to(DT))
    with pytest.raises(lrpgraph.NoRuleError, match="LSTM"):
        ex(torch.randn(2, 6, 4, dtype=DT))


def test_batch_axes_of_nested_tuples() -> None:
    from lrpgraph.record import batch_axes, record
    ex = lrpgraph.Explainer(Recurrent().eval().to(DT))
    x = torch.randn(2, 6, 4, dtype=DT)
    rec = record(ex.plan, [x])
    axes = batch_axes(ex.plan, [x], rec)
    lstm = next(n for n in ex.plan.nodes if n.op == "call_module" and n.target == "lstm")
    assert axes[lstm] == (0, (1, 1))  # out is batch-first, h and c are (layers, B, H)


@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "legacy_seresnet18", "test_byobnet"])
def test_small_cnns_conserved_under_abslrp(timm, name: str) -> None:
    """Hardswish, hardsigmoid and sigmoid gates (squeeze-excitation), F.batch_norm (BatchNormAct2d)."""
    model = timm.create_model(name, pretrained=False, num_classes=5).eval().to(DT)
    e = lrpgraph.Explainer(model, rules="abslrp")(torch.randn(2, 3, 64, 64, dtype=DT))
    assert e.conservation().max_rel_error() < 1e-5
    for preset in ("abslrp-renorm", "lrp-epsilon"):
        assert torch.isfinite(lrpgraph.Explainer(model, rules=preset)(torch.randn(2, 3, 64, 64, dtype=DT)).relevance).all()


class WithConstant(nn.Module):
    """fx stores the tensor constant on the root module while tracing."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x * torch.tensor([1.0, 2.0, 3.0], dtype=DT))


def test_tracing_leaves_no_attribute_on_the_model() -> None:
    model = WithConstant().eval().to(DT)
    attrs = set(model.__dict__)
    e = lrpgraph.Explainer(model, rules="abslrp")(torch.randn(2, 3, dtype=DT))
    assert set(model.__dict__) == attrs
    assert torch.isfinite(e.relevance).all()


def _row(in_pos, in_neg, out_pos, out_neg):
    from lrpgraph.report import NodeBalance
    t = lambda v: torch.tensor([[float(v)]], dtype=DT)  # noqa: E731
    return NodeBalance("n", "op", "rule", t(in_pos + in_neg), t(in_pos), t(in_neg), t(out_pos + out_neg),
                       t(out_pos), t(out_neg), t(0))


def test_a_stream_without_carrier_is_a_named_loss_not_a_leak() -> None:
    from lrpgraph.report import ConservationReport
    lost = _row(0.3, -0.5, 0.0, -0.5)  # the positive stream found no carrier
    dropped = _row(0.3, -0.5, 0.0, 0.0)  # everything dropped: a leak
    kept = _row(0.3, -0.5, 0.3, -0.5)
    rep = ConservationReport([lost, dropped, kept], preset="abslrp", masses=True)
    assert rep.leaks() == [dropped] and rep.losses() == [lost]
    assert lost.worst(True) == 0.0 and abs(lost.lost_share() - 0.3 / 0.8) < 1e-12
    assert "LOSS" in rep.table() and "1 node(s) lose a sign stream" in rep.table()
    # the classic presets judge the signed total only: the same row is a leak there
    assert ConservationReport([lost], preset="lrp-0", masses=False).leaks() == [lost]


def test_rounding_residue_is_judged_against_the_output_mass() -> None:
    """A node that receives 1e-16 of residue (after cancellation) and drops it is not a leak; a
    node that drops a real share is."""
    from lrpgraph.report import ConservationReport
    head = _row(1.0, -1.0, 1.0, -1.0)
    residue = _row(1e-16, -1e-16, 0.0, 0.0)
    real = _row(1e-3, -1e-3, 0.0, 0.0)
    rep = ConservationReport([head, residue, real], preset="abslrp", masses=True)
    assert rep.leaks() == [real]
