"""Segmentation heads: the pixel MLP equals ddpm-segmentation's per-pixel classifier, heads overfit a tiny set,
variant amalgamation and majority vote behave as defined."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from downstream.seg.data import FeatureSpec
from downstream.seg.model import HeadConfig, PixelMLPEnsemble, SegModel, VariantSum


def test_pixel_mlp_is_ddpm_segmentations_classifier_applied_per_pixel():
    torch.manual_seed(0)
    head = PixelMLPEnsemble([(6, 4, 4), (2, 2, 2)], num_classes=5, members=2).eval()
    a, b = torch.randn(3, 6, 4, 4), torch.randn(3, 2, 2, 2)
    out = head([a, b])
    assert len(out) == 2 and out[0].shape == (3, 5, 4, 4)
    # The same member as ddpm-segmentation writes it: Linear/ReLU/BatchNorm1d on a [pixels, D] matrix.
    conv = head.members[1]
    mlp = nn.Sequential(nn.Linear(8, 128), nn.ReLU(), nn.BatchNorm1d(128), nn.Linear(128, 32), nn.ReLU(),
                        nn.BatchNorm1d(32), nn.Linear(32, 5)).eval()
    for lin, c in zip([mlp[0], mlp[3], mlp[6]], [conv[0], conv[3], conv[6]]):
        lin.weight.data, lin.bias.data = c.weight.data[:, :, 0, 0], c.bias.data
    for bn, c in zip([mlp[2], mlp[5]], [conv[2], conv[5]]):
        bn.load_state_dict(c.state_dict())
    x = torch.cat([a, F.interpolate(b, size=(4, 4), mode="bilinear", align_corners=False)], 1)
    pixels = x.permute(0, 2, 3, 1).reshape(-1, 8)
    expected = mlp(pixels).reshape(3, 4, 4, 5).permute(0, 3, 1, 2)
    assert torch.allclose(out[1], expected, atol=1e-5)
    assert PixelMLPEnsemble([(4, 2, 2)], num_classes=30, members=1).members[0][0].out_channels == 256


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_head_trains_to_near_zero_loss_on_a_tiny_set(kind):
    torch.manual_seed(0)
    feats = [torch.randn(4, 8, 8, 8), torch.randn(4, 4, 4, 4)]
    # Labels a (hidden) function of the finest map, so that the task is learnable pixel by pixel.
    labels = torch.einsum("bchw,kc->bkhw", feats[0], torch.randn(3, 8)).argmax(1)
    specs = [FeatureSpec(0, "a", (8, 8, 8)), FeatureSpec(0, "b", (4, 4, 4))]
    model = SegModel(specs, 3, HeadConfig(kind=kind, ensemble=2, hidden=32, dropout=0.0))
    model.norm.fit([[f[i] for f in feats] for i in range(4)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = sum(F.cross_entropy(z, labels) for z in model(feats))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    final = max(F.cross_entropy(z, labels).item() for z in model(feats))
    assert final < 0.05
    assert (model.predict(feats, (8, 8)) == labels).float().mean() > 0.99


def test_variant_sum_starts_as_the_mean_and_learns_per_channel_weights():
    specs = [FeatureSpec(0, "x", (3, 4, 4)), FeatureSpec(1, "x", (3, 4, 4)), FeatureSpec(2, "x", (3, 4, 4))]
    mix = VariantSum(specs)
    maps = [torch.randn(2, 3, 4, 4) for _ in range(3)]
    assert torch.allclose(mix(maps)[0], sum(maps) / 3, atol=1e-6)
    with torch.no_grad():
        mix.logits[0][1, 0] = 50.0  # channel 0 all from variant 1
    out = mix(maps)[0]
    assert torch.allclose(out[:, 0], maps[1][:, 0], atol=1e-5)
    assert torch.allclose(out[:, 1:], sum(m[:, 1:] for m in maps) / 3, atol=1e-6)
    assert torch.allclose(mix.weights()[0].sum(0), torch.ones(3))
    with pytest.raises(ValueError, match="same layers with the same channels"):
        VariantSum([FeatureSpec(0, "x", (3, 4, 4)), FeatureSpec(1, "x", (5, 4, 4))])
    model = SegModel(specs, 4, HeadConfig(kind="conv", variants="weighted", hidden=8))
    assert model.amalgamate is not None and model(maps)[0].shape == (2, 4, 4, 4)


def test_ensemble_prediction_is_the_majority_vote():
    model = SegModel([FeatureSpec(0, "x", (1, 1, 2))], 3, HeadConfig(kind="mlp", ensemble=3, normalize=False))
    votes = [torch.tensor([0, 2]), torch.tensor([1, 2]), torch.tensor([1, 0])]  # pixel 0 → 1, pixel 1 → 2
    model.head.forward = lambda feats: [F.one_hot(v, 3).T.float().view(1, 3, 1, 2) for v in votes]
    assert model.predict([torch.zeros(1, 1, 1, 2)], (1, 2)).tolist() == [[[1, 2]]]
