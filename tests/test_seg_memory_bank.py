"""T-Memory Bank: pastes only object pixels, respects capacity, replaces at random, never contaminates
what it stored; the feature-space form pastes whole cells with their labels and resumes exactly."""

import pytest
import torch

from downstream.seg.memory_bank import FeatureMemoryBank, ImageMemoryBank


def sample(seed, objects=(), size=16, channels=3):
    """An image and a label of class 0, with square objects (class, y, x, side) drawn in."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(channels, size, size, generator=g)
    label = torch.zeros(size, size, dtype=torch.long)
    for c, y, x, s in objects:
        label[y:y + s, x:x + s] = c
    return image, label


def test_image_bank_pastes_only_the_objects_pixels_at_its_place():
    bank = ImageMemoryBank([5], capacity=5, sample_ratio=1.0, seed=0)
    src_img, src_lab = sample(0, [(5, 3, 4, 5)])
    src_lab[5, 6] = 0  # a hole in the object: not an object pixel
    bank(src_img, src_lab)
    img, lab = sample(1, [(2, 0, 0, 4)])
    out_img, out_lab = bank(img, lab)
    obj = src_lab == 5
    assert torch.equal(out_lab == 5, obj)  # same-size canvas: the object lands where it was
    assert torch.equal(out_img[:, obj], src_img[:, obj])
    assert torch.equal(out_img[:, ~obj], img[:, ~obj]) and torch.equal(out_lab[~obj], lab[~obj])
    assert torch.equal(img, sample(1, [(2, 0, 0, 4)])[0])  # the input is not written


def test_image_bank_stores_copies_uncontaminated_by_later_pastes():
    bank = ImageMemoryBank([4, 5], capacity=5, sample_ratio=1.0, seed=0)
    bank(*sample(0, [(5, 0, 0, 6)]))
    img, lab = sample(1, [(4, 8, 8, 6)])
    canvas_before = img.clone()
    bank(img, lab)  # stores class 4 of this sample, then pastes class 5 into its output
    stored_canvas, stored_mask = bank.slots[4][0]
    assert torch.equal(stored_canvas, canvas_before) and stored_mask.sum() == 36


def test_image_bank_resize_and_sample_ratio():
    bank = ImageMemoryBank([3, 4, 5, 6], capacity=2, sample_ratio=0.5, resize_ratio=0.5, seed=1)
    for c in (3, 4, 5, 6):
        bank.store(*sample(c, [(c, 0, 0, 8)]))
    img, lab = sample(9)
    out_img, out_lab = bank.paste(img, lab)
    pasted = sorted(set(out_lab.unique().tolist()) - {0})
    assert len(pasted) == 2  # ceil(0.5 · 4 missing tail classes)
    changed = (out_img != img).any(0)
    assert torch.equal(changed, out_lab != 0)  # only object pixels change
    assert all((out_lab == c).sum() == 16 for c in pasted)  # 8×8 object at half size


def test_capacity_and_random_replacement():
    bank = ImageMemoryBank([7], capacity=3, seed=0)
    for i in range(20):
        bank.store(torch.full((1, 4, 4), float(i)), torch.full((4, 4), 7))
    assert bank.sizes() == {7: 3}
    # Once full, the new object takes a uniformly random slot: over many seeds each slot about equally,
    # and old objects survive (not FIFO).
    hits, oldest_kept = torch.zeros(3), 0
    for seed in range(300):
        bank = ImageMemoryBank([7], capacity=3, seed=seed)
        for i in range(4):
            bank.store(torch.full((1, 2, 2), float(i)), torch.full((2, 2), 7))
        tags = [int(canvas[0, 0, 0]) for canvas, _ in bank.slots[7]]
        hits[tags.index(3)] += 1
        oldest_kept += 0 in tags
    assert (hits / 300 - 1 / 3).abs().max() < 0.08
    assert abs(oldest_kept / 300 - 2 / 3) < 0.08  # FIFO would always drop it


def test_feature_bank_pastes_cells_and_labels_of_the_object_only():
    bank = FeatureMemoryBank([5], capacity=5, sample_ratio=1.0, seed=0)
    src_lab = torch.zeros(16, 16, dtype=torch.long)
    src_lab[4:8, 8:14] = 5  # 4×6 pixels: cells (scale 4) (1, 2) fully, (1, 3) half covered
    src_feats = [torch.randn(3, 4, 4), torch.randn(2, 8, 8)]
    bank(src_feats, src_lab)
    entry_mask, crops = bank.slots[5][0]
    assert entry_mask.shape == (4, 8) and [c.shape for c in crops] == [(3, 1, 2), (2, 2, 4)]
    feats, lab = [torch.randn(3, 4, 4), torch.randn(2, 8, 8)], torch.zeros(16, 16, dtype=torch.long)
    out_feats, out_lab = bank(feats, lab)
    ys, xs = (out_lab == 5).nonzero(as_tuple=True)
    oy, ox = int(ys.min()), int(xs.min())  # the crop starts at the object's top-left corner (both on the grid)
    assert len(ys) == 24 and oy % 4 == 0 and ox % 4 == 0  # offsets are whole cells of every layer
    changed = (out_feats[0] != feats[0]).any(0)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[oy // 4, ox // 4] = expected[oy // 4, ox // 4 + 1] = True  # the full and the half-covered cell
    assert torch.equal(changed, expected)
    assert torch.equal(out_feats[0][:, oy // 4, ox // 4: ox // 4 + 2], src_feats[0][:, 1, 2:4])
    fine = (out_feats[1] != feats[1]).any(0)
    assert int(fine.sum()) == 6  # 2×3 cells of scale 2 covered by the 4×6 object
    assert torch.equal(out_lab[out_lab != 5], lab[out_lab != 5])


def test_feature_bank_state_round_trip_continues_identically():
    def feed(bank, n, start=0):
        outs = []
        for i in range(start, start + n):
            feats = [torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(i))]
            lab = torch.zeros(8, 8, dtype=torch.long)
            c = 3 + i % 3
            lab[2 * (i % 3): 2 * (i % 3) + 3, 1:5] = c
            outs.append(bank(feats, lab))
        return outs

    a = FeatureMemoryBank([3, 4, 5], capacity=2, sample_ratio=0.5, seed=4)
    feed(a, 9)
    tensors, meta = a.state_dict()
    b = FeatureMemoryBank([3, 4, 5], capacity=2, sample_ratio=0.5, seed=99)
    b.load_state_dict(tensors, meta)
    for (fa, la), (fb, lb) in zip(feed(a, 6, 9), feed(b, 6, 9)):
        assert torch.equal(la, lb) and all(torch.equal(x, y) for x, y in zip(fa, fb))


def test_feature_bank_refuses_grids_that_do_not_divide_the_mask():
    bank = FeatureMemoryBank([1])
    with pytest.raises(ValueError, match="does not divide"):
        bank([torch.zeros(1, 3, 3)], torch.ones(8, 8, dtype=torch.long))
