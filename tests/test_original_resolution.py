"""Scoring at the original resolution resizes only the classes that can win (`labels_at_original`): the same ids as
argmax over the full resize, bit for bit, on every placement, and far fewer channels resized on real-looking logits.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from difffeat.data.geometry import placement, to_original
from difffeat.data.original_labels import candidate_classes, labels_at_original


def _regions(k: int, h: int, w: int, seed: int, present: int = 5) -> torch.Tensor:
    """Logits of a head that has learned something: a background class, a few classes owning blobs, the rest well
    below, plus noise."""
    g = torch.Generator().manual_seed(seed)
    logits = 0.5 * torch.randn(1, k, h, w, generator=g) - 4.0
    logits[0, 0] += 6.0
    owners = torch.randint(0, k, (present,), generator=g)
    centres = torch.rand(present, 2, generator=g) * torch.tensor([h, w])
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    for c, (cy, cx) in zip(owners.tolist(), centres.tolist()):
        logits[0, c] += 8.0 * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (0.05 * h * w))
    return logits


def _full(logits, frame, place):
    at_frame = F.interpolate(logits, size=frame, mode="bilinear", align_corners=False)
    at_size, covered = to_original(at_frame, place)
    return at_size.argmax(1)[0], covered


CASES = [  # (classes, grid, frame, image size, resize mode)
    (150, (64, 64), (512, 512), (512, 683), "stretch"),
    (150, (32, 48), (256, 384), (683, 512), "pad"),
    (13, (16, 16), (128, 128), (375, 500), "center-crop"),
    (13, (64, 64), (64, 64), (480, 640), "pad"),
    (21, (33, 17), (100, 70), (90, 130), "stretch"),  # an image smaller than the frame: the second resize shrinks
    (19, (40, 40), (24, 24), (300, 200), "center-crop"),  # a frame coarser than the grid: wider windows
    (7, (8, 8), (8, 8), (8, 8), "stretch"),  # the identity placement
]


@pytest.mark.parametrize("k, grid, frame, size, mode", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_pruned_labels_equal_argmax_over_the_full_resize(k, grid, frame, size, mode, seed):
    logits = _regions(k, *grid, seed)
    place = placement(size, frame, mode)
    want, want_covered = _full(logits, frame, place)
    got, covered = labels_at_original(logits, frame, place)
    assert got.shape == size and torch.equal(got, want)
    assert (covered is None) == (want_covered is None)
    if covered is not None:
        assert torch.equal(covered, want_covered)


def test_pure_noise_and_exact_ties_keep_the_first_maximum():
    """No structure at all (every class can win somewhere) and two classes tied everywhere: ids as argmax's."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 30, 24, 24, generator=g)
    logits[0, 11] = logits[0, 4] = logits[0].max(0).values + 1.0  # 4 and 11 tie on top everywhere: 4 wins
    place = placement((200, 150), (96, 96), "pad")
    want, _ = _full(logits, (96, 96), place)
    got, _ = labels_at_original(logits, (96, 96), place)
    assert torch.equal(got, want) and set(got.unique().tolist()) == {4}
    assert 11 in candidate_classes(logits[0], (96, 96)).tolist()  # a tied class is kept: the bound is ≥, not >


def test_close_runners_up_are_candidates_and_far_ones_are_not():
    logits = torch.full((1, 6, 10, 10), -10.0)
    logits[0, 2] = 5.0  # the winner everywhere
    logits[0, 5] = 5.0 - 1e-6  # within float rounding of it: must stay a candidate
    logits[0, 1, 4, 4] = 6.0  # wins in one grid cell's neighbourhood only
    kept = candidate_classes(logits[0], (40, 40)).tolist()
    assert kept == [1, 2, 5]


def test_pruning_resizes_few_channels_on_head_like_logits():
    """On ADE-like logits (150 classes, 5 of them present) the candidates are a handful, not 150."""
    kept = [len(candidate_classes(_regions(150, 64, 64, seed)[0], (512, 512))) for seed in range(5)]
    assert max(kept) <= 20, kept


def test_cells_and_exact_ties_give_the_full_resize_ids():
    """The cell path on head-like logits, and on a tie everywhere (decided by F.interpolate's own values, first
    maximum): both exact."""
    from difffeat.data.original_labels import _resize_labels

    frame = F.interpolate(_regions(13, 16, 16, 0), size=(64, 64), mode="bilinear", align_corners=False)[0]
    got = _resize_labels(frame, (375, 500))
    want = F.interpolate(frame[None], size=(375, 500), mode="bilinear", align_corners=False).argmax(1)[0]
    assert torch.equal(got, want)
    tied = frame.clone()
    tied[5] = tied[0]  # class 5 equals the background everywhere: every background pixel is a tie
    want = F.interpolate(tied[None], size=(375, 500), mode="bilinear", align_corners=False).argmax(1)[0]
    assert torch.equal(_resize_labels(tied, (375, 500)), want)
    place = placement((375, 500), (64, 64), "stretch")
    logits = torch.zeros(1, 13, 64, 64)  # a frame equal to the grid: the frame resize is the identity
    logits[0] = tied
    ids, _ = labels_at_original(logits, (64, 64), place)
    assert torch.equal(ids, F.interpolate(tied[None], size=(375, 500), mode="bilinear",
                                          align_corners=False).argmax(1)[0])
    assert 5 not in ids.unique().tolist()


@pytest.mark.parametrize("noise", [0.05, 0.5, 2.0])
def test_random_placements_and_noise_levels_agree_with_the_full_resize(noise):
    g = torch.Generator().manual_seed(int(noise * 100))
    for _ in range(12):
        k = int(torch.randint(2, 40, (1,), generator=g))
        h, w = (int(v) for v in torch.randint(4, 40, (2,), generator=g))
        fh, fw = (int(v) for v in torch.randint(8, 200, (2,), generator=g))
        size = tuple(int(v) for v in torch.randint(20, 400, (2,), generator=g))
        mode = ("stretch", "pad", "center-crop")[int(torch.randint(0, 3, (1,), generator=g))]
        logits = _regions(k, h, w, int(torch.randint(0, 1000, (1,), generator=g)))
        logits = logits + noise * torch.randn(logits.shape, generator=g)
        place = placement(size, (fh, fw), mode)
        want, _ = _full(logits, (fh, fw), place)
        got, _ = labels_at_original(logits, (fh, fw), place)
        assert torch.equal(got, want), (k, h, w, fh, fw, size, mode)
