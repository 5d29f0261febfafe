"""GAE must not depend on how it was batched (batch_size, explain_batch_size).

A model's output for one sample can differ in its last bits between batch sizes (BLAS and GPU
kernels pick other blockings); one flipped near-tie in a masking trajectory changes the rest of
it. ``BatchRounding`` makes that explicit on a bundled model: it scales the input by
``1 + 1e-6 * u_B``, a fixed pattern per batch size B (a few float32 ulps, below the 1e-4 relative
gradient differences seen between batch 1 and 4 on a GPU). Before the trajectories had their own
fixed batch, every VGG trajectory here differed between batch 4 and 16.
"""
import torch
from torch import nn

from lrpgraph import zoo
from lrpgraph.evaluate import GAE, get_method

FIELDS = ["gae", "faithfulness", "robustness", "local_consistency", "contrastiveness"]


class BatchRounding(nn.Module):
    def __init__(self, model: nn.Module, eps: float = 1e-6):
        super().__init__()
        self.model, self.eps = model, eps

    def forward(self, x):
        g = torch.Generator().manual_seed(x.shape[0])
        u = torch.rand(x.shape[1:], generator=g, dtype=x.dtype) * 2 - 1
        return self.model(x * (1 + self.eps * u))


def per_sample(fn):
    """The method run one input at a time: its maps cannot depend on the batch."""
    def explain(model, x, t):
        return torch.cat([fn(model, x[i:i + 1], t[i:i + 1]) for i in range(x.shape[0])])
    return explain


def test_batch_sizes_1_4_16_give_identical_gae():
    model = BatchRounding(zoo.load("vgg").eval())
    x, y = zoo.load_samples(16)                            # 4 mosaics
    explain = per_sample(get_method("gradient-x-input"))
    runs = {}
    for bs, ebs in [(4, 1), (4, 4), (16, 16)]:
        gae = GAE(num_masking_steps=5, batch_size=bs, explain_batch_size=ebs, progress=False)
        plan = gae.prepare(model, x, y)
        runs[bs, ebs] = (plan, gae.evaluate(model, x, y, {"m": explain}, plan=plan)["m"])
    p0, r0 = runs[16, 16]
    for key, (p, r) in runs.items():
        assert torch.equal(p.positive, p0.positive), key
        assert torch.equal(p.morf_inputs, p0.morf_inputs) and torch.equal(p.lerf_inputs, p0.lerf_inputs), key
        assert torch.equal(p.cim, p0.cim), key
        for f in FIELDS:
            assert torch.equal(getattr(r, f), getattr(r0, f)), (key, f)


def test_batched_method_changes_scores_only_by_rounding():
    """With the method itself batched (its maps differ in the last bits), the trajectories stay
    identical and the scores move by float rounding only."""
    model = zoo.load("resnet").eval()
    x, y = zoo.load_samples(16)
    res = [GAE(num_masking_steps=5, batch_size=bs, explain_batch_size=ebs, progress=False)(
        model, x, y, explain=get_method("gradient-x-input")) for bs, ebs in [(4, 1), (16, 16)]]
    for f in FIELDS:
        torch.testing.assert_close(getattr(res[0], f), getattr(res[1], f), rtol=0, atol=1e-5)
