"""train-seg's class-aware batch sampler and its data-set profiles (issue #16): every class of the training masks in
each batch, a pure function of (seed, iteration), exact resume; AUCSeg's released settings by `--profile`, given
flags winning; the listed-tail mIoU."""

import doctest
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import downstream.seg.profile as seg_profile_module
import downstream.seg.sampler as sampler_module
from difffeat.cli import build_parser, main
from downstream.engine import BatchStream
from downstream.seg.config import SegTrainConfig
from downstream.seg.profile import config_from_profile, listed_tail_scores
from downstream.seg.sampler import ClassAwareBatches
from downstream.seg.train import train_seg


def random_presence(n_images=40, n_classes=12, seed=0):
    """Per image a few classes, long-tailed: class c is in an image with probability ~ 0.9·0.7^c (at least once)."""
    rng = np.random.default_rng(seed)
    p = 0.9 * 0.7 ** np.arange(n_classes)
    images = [sorted(np.flatnonzero(rng.random(n_classes) < p).tolist()) for _ in range(n_images)]
    for c in range(n_classes):  # every class somewhere
        if not any(c in ids for ids in images):
            images[int(rng.integers(n_images))].append(c)
    return images


def test_every_class_is_in_every_batch_and_batches_are_pure_functions():
    images = random_presence()
    everything = set().union(*map(set, images))
    batches = ClassAwareBatches(images, batch_size=8, seed=3)
    drawn = [batches(it) for it in range(200)]
    for batch in drawn:
        assert len(batch) == 8 == len(set(batch)) and all(0 <= i < 40 for i in batch)
        assert batches.classes_in(batch) == everything
    again = ClassAwareBatches(images, batch_size=8, seed=3)
    assert [again(it) for it in (199, 0, 57)] == [drawn[199], drawn[0], drawn[57]]  # any order: pure
    assert len({tuple(sorted(b)) for b in drawn}) > 150  # and not one fixed batch
    assert ClassAwareBatches(images, batch_size=8, seed=4)(0) != drawn[0]
    # every image is drawn: the fill is uniform over the rest
    assert len({i for b in drawn for i in b}) == 40
    # a random batch of 8 misses some class most of the time: the sampler is what brings them
    rng = np.random.default_rng(0)
    random_batches = [rng.choice(40, 8, replace=False) for _ in range(200)]
    assert np.mean([batches.classes_in(b) != everything for b in random_batches]) > 0.5
    # BatchStream takes it as its `indices`: process r of 2 gets global batches 2·it + r
    stream = BatchStream(40, 8, 3, start=5, stop=8, rank=1, world=2, indices=batches)
    assert list(stream) == [drawn[11], drawn[13], drawn[15]]


def test_too_small_a_batch_covers_the_rarest_classes_and_warns():
    images = [[c] for c in range(6)] + [[0, 1]] * 10  # classes 2–5 live in one image each
    batches = ClassAwareBatches(images, batch_size=3, seed=0)
    with pytest.warns(UserWarning, match="cannot hold every class"):
        batch = batches(0)
    assert {2, 3, 4} <= batches.classes_in(batch)  # the rarest first
    assert sorted(ClassAwareBatches(images[:4], batch_size=10)(5)) == [0, 1, 2, 3]  # fewer images than the batch


def test_docstring_examples():
    for module in (sampler_module, seg_profile_module):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, (module.__name__, result)  # none may vanish


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """30 Shapes-LT scenes (24 train, 3 val, 3 test) and their mini-random `dift` features."""
    from difffeat.data.shapes_lt import synthesize
    from difffeat.extraction.runner import ExtractRunConfig, run_extraction

    root = tmp_path_factory.mktemp("seg-sampler")
    data = synthesize(root / "shapes", n=30, seed=5)
    run_extraction(ExtractRunConfig(images=str(data), out=str(root / "feat"), model="mini-random", layers=["dift"]),
                   progress=False)
    return root, data


def test_class_aware_training_resumes_exactly_and_sees_every_class(world):
    root, data = world
    common = dict(features=[str(root / "feat")], masks=str(data), split="train", sampler="class-aware", hidden=16,
                  iterations=6, batch_size=6, checkpoint_every=3, loss="aucseg")
    full = train_seg(SegTrainConfig.from_dict(dict(**common, out=str(root / "full"))), progress=False)
    train_seg(SegTrainConfig.from_dict(dict(**common, out=str(root / "part"))), progress=False, stop_after=3)
    part = train_seg(SegTrainConfig.from_dict(dict(**common, out=str(root / "part"))), progress=False, resume=True)
    a, b = load_file(full / "model.safetensors"), load_file(part / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the batches the run drew hold every class of the training masks
    from downstream.seg.sampler import batch_indices_for, image_classes
    from downstream.seg.train import load_data

    cfg = SegTrainConfig.from_dict(dict(**common, out=str(root / "full")))
    train, _ = load_data(cfg)
    per_image = image_classes(train)
    everything = set().union(*(set(ids.tolist()) for ids in per_image))
    batches = batch_indices_for(cfg, train)
    assert len(everything) > 4 and all(batches.classes_in(batches(it)) == everything for it in range(6))
    assert batch_indices_for(SegTrainConfig.from_dict(dict(**{**common, "sampler": "random"}, out="x")), train) is None


def _seg_args(*extra):
    return build_parser().parse_args(["train-seg", "--features", "f", "--masks", "m", "--out", "o", *extra])


def test_seg_profile_sets_aucseg_settings_and_given_flags_win():
    cfg = config_from_profile(_seg_args("--profile", "ade20k", "--bank-sample-ratio", "0.5"))
    assert (cfg.auc_weight, cfg.margin, cfg.ce_average, cfg.bank_capacity) == (2.0, 1.0, "all", 5)
    assert cfg.bank_sample_ratio == 0.5 and len(cfg.tail_classes) == 124 and cfg.extra == {"profile": "ade20k"}
    cfg = config_from_profile(_seg_args("--profile", "cityscapes", "--auc-weight", "0.5", "--tail-class", "3",
                                        "--tail-class", "5", "--ce-average", "valid"))
    assert (cfg.auc_weight, cfg.tail_classes, cfg.ce_average, cfg.bank_sample_ratio) == (0.5, [3, 5], "valid", 1.0)
    plain = SegTrainConfig.from_dict({"features": ["f"], "masks": "m", "out": "o"})
    assert (plain.ce_average, plain.sampler, plain.tail_classes) == ("valid", "random", None)


def test_seg_profile_end_to_end_reports_the_listed_tail_and_refuses_foreign_ids(world, tmp_path, capsys):
    root, data = world
    base = ["--quiet", "train-seg", "--features", str(root / "feat"), "--masks", str(data), "--split", "train",
            "--val-split", "val", "--loss", "aucseg", "--memory-bank", "--hidden", "16", "--iterations", "3",
            "--batch-size", "6", "--profile", "cityscapes"]
    # Cityscapes' released tail ids (6, 12, 14 … 18) are not Shapes-LT's 13 classes: one clear line
    assert main([*base, "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--tail-class" in err and "not among the 13 classes" in err and err.count("\n") == 0, err
    assert not (tmp_path / "bad").exists()
    run = tmp_path / "ok"
    assert main([*base, "--tail-class", "9", "--tail-class", "12", "--sampler", "class-aware", "--out", str(run)]) == 0
    saved = json.loads((run / "config.json").read_text())["config"]
    assert (saved["auc_weight"], saved["ce_average"], saved["tail_classes"]) == (0.5, "all", [9, 12])
    assert saved["extra"] == {"profile": "cityscapes"} and saved["sampler"] == "class-aware"
    metrics = json.loads((run / "metrics.json").read_text())
    names = [metrics["per_class_iou"][n] for n in list(metrics["per_class_iou"])]
    listed = [names[9], names[12]]
    expected = [v for v in listed if v is not None]
    assert metrics["tail_list"]["source"] == "profile cityscapes"
    assert metrics["tail_list"]["miou"] == (pytest.approx(np.mean(expected)) if expected else None)
    capsys.readouterr()
    assert main(["--quiet", "eval-seg", "--run", str(run), "--features", str(root / "feat"), "--masks", str(data),
                 "--split", "test"]) == 0
    again = json.loads((run / "eval-test" / "metrics.json").read_text())
    assert again["tail_list"]["classes"] == metrics["tail_list"]["classes"]


def test_listed_tail_scores_by_hand():
    scores = {"per_class_iou": {"a": 0.5, "b": None, "c": 0.25, "d": 1.0}}
    assert listed_tail_scores(scores, ["a", "b", "c", "d"], [1, 2, 0], "ade20k") == {
        "tail_list": {"source": "profile ade20k", "classes": ["b", "c", "a"], "miou": 0.375}}
    assert listed_tail_scores(scores, ["a", "b", "c", "d"], None) == {}
