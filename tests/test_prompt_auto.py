"""`prompt:auto`: captions from an image-to-text model, once per image, recorded in the store, used as the prompt.

The captioner is a tiny random-weight BLIP built here (the default model's architecture; no download): its
captions are nonsense, but they are deterministic, differ between images, and go through the same code path.
"""

import json
import shutil

import numpy as np
import pytest

from difffeat.cli import main
from difffeat.store.feature_store import FeatureStore

MODEL = "mini"
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "green", "circle", "square", "triangle",
         "star", "on", "the", "small", "big", "background", "."]


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    """A tiny random BLIP captioner saved with its processor (BERT word-piece tokenizer, 32×32 images)."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    root = tmp_path_factory.mktemp("captioner")
    (root / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                              tokenizer=BertTokenizer(str(root / "vocab.txt")))
    # Weights drawn wider than BLIP's default (0.02) so that a random model's captions depend on the image.
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 initializer_range=0.5)
    config = BlipConfig(vision_config=dict(small, image_size=32, patch_size=8),
                        text_config=dict(small, vocab_size=len(WORDS), max_position_embeddings=64,
                                         encoder_hidden_size=32, pad_token_id=0, bos_token_id=2, sep_token_id=3,
                                         eos_token_id=3),
                        projection_dim=32, initializer_range=0.5)
    torch.manual_seed(0)
    folder = root / "tiny-blip"
    BlipForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "shapes"
    assert main(["--quiet", "data", "synth", str(root), "--n", "8"]) == 0
    return root / "train" / "images"  # 6 images


def _extract(images, out, *extra):
    return main(["--quiet", "extract", str(images), "--out", str(out), "--model", MODEL, "--layer", "up_blocks.1",
                 "--batch-size", "4", *extra])


def test_spec_parses_lists_and_keeps_templates_apart(capsys):
    from pipelines.base import parse_technique
    from pipelines.techniques.auto_caption import DEFAULT_MODEL, AutoCaption
    from pipelines.techniques.prompt import PromptTemplate

    auto = parse_technique("prompt:auto,model=some/captioner,max_tokens=12")
    assert isinstance(auto, AutoCaption) and (auto.model, auto.max_tokens) == ("some/captioner", 12)
    assert auto.spec == "prompt:auto,model=some/captioner,max_tokens=12" and parse_technique(auto.spec) == auto
    assert parse_technique("prompt:auto") == AutoCaption(DEFAULT_MODEL, 30)
    # A template that merely starts with the word is still a template.
    assert isinstance(parse_technique("prompt:auto, high quality"), PromptTemplate)
    assert main(["techniques"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("prompt:auto")]
    assert listed and f"model={DEFAULT_MODEL},max_tokens=30" in listed[0]
    from difffeat.errors import UserError

    with pytest.raises(UserError, match="max_tokens must be in"):
        parse_technique("prompt:auto,max_tokens=0")


def test_captions_recorded_deterministic_used_and_not_recomputed_on_resume(captioner, images, tmp_path, monkeypatch,
                                                                           mini_pipe, capsys):
    """One run over six images; another over four of them, continued with --resume once the other two arrive: the
    captions are recorded per image, the same in both (deterministic), only the two new images are captioned by
    the resumed run, and each image's features are those of its caption given as the prompt."""
    from difffeat.data.images import load_image
    from difffeat.extraction.extract import FeatureExtractor
    from pipelines.techniques.auto_caption import Captioner

    spec = f"prompt:auto,model={captioner},max_tokens=8"
    full, part, src = tmp_path / "full", tmp_path / "part", tmp_path / "images"
    src.mkdir()
    for p in sorted(images.glob("*.png"))[:4]:
        shutil.copy(p, src / p.name)
    assert _extract(images, full, "--technique", spec) == 0
    assert _extract(src, part, "--technique", spec) == 0
    for p in sorted(images.glob("*.png"))[4:]:
        shutil.copy(p, src / p.name)
    used = []  # the captioners of the resumed run
    caption = Captioner.caption
    monkeypatch.setattr(Captioner, "caption", lambda self, *a: used.append(self) or caption(self, *a))
    assert _extract(src, part, "--technique", spec, "--resume") == 0
    assert len({id(c) for c in used}) == 1 and len(used[0].captions) == 2  # the four finished ones: not again
    report = json.loads((part / "report.json").read_text())
    assert report["already_done"] == 4 and report["captioned"] == 2

    sf, sp = FeatureStore(full), FeatureStore(part)
    keys = sf.keys()
    assert len(keys) == 6 and sp.keys() == keys and sf.manifest["techniques"] == [spec]
    captions = {k: sf.captions(k)[spec] for k in keys}
    assert all(isinstance(c, str) and c for c in captions.values())
    assert len(set(captions.values())) > 1  # per image, not one caption for all
    assert sf.entry(keys[0])["captions"] == {spec: captions[keys[0]]}
    assert json.loads((full / "report.json").read_text())["captioned"] == 6
    capsys.readouterr()
    assert main(["inspect", str(full)]) == 0
    assert f"captions:   {spec}, e.g. {keys[0]}: {json.dumps(captions[keys[0]])}" in capsys.readouterr().out
    assert {k: sp.captions(k)[spec] for k in keys} == captions
    for k in keys:
        np.testing.assert_array_equal(sf[k]["up_blocks.1"], sp[k]["up_blocks.1"])
    # Used as the prompt: the features are those of the caption given as the prompt, not of the empty prompt.
    fe = FeatureExtractor(mini_pipe, ["up_blocks.1"])
    pixels = [load_image(images / k) for k in keys]
    ref = fe.extract(pixels, prompts=[captions[k] for k in keys], keys=keys)["up_blocks.1"]
    empty = fe.extract(pixels, keys=keys)["up_blocks.1"]
    for i, k in enumerate(keys):
        np.testing.assert_allclose(sf[k]["up_blocks.1"], ref[i].numpy(), rtol=1e-5, atol=1e-5)
        assert not np.allclose(sf[k]["up_blocks.1"], empty[i].numpy(), atol=1e-4)


def test_captions_from_a_stack_and_its_prompts(captioner, images, mini_pipe):
    """The library path: `prompts` with the images captions them (once: a second call only looks them up), a
    caption chains with a template, and a caller without the images (GATE's report) gets the same prompt."""
    import torch

    from difffeat.data.images import load_image, to_tensor
    from pipelines import TechniqueStack
    from pipelines.techniques.auto_caption import Captioner

    x = to_tensor([load_image(p) for p in sorted(images.glob("*.png"))[:3]])
    keys = ["a", "b", "c"]
    spec = f"prompt:auto,model={captioner}"
    stack = TechniqueStack(mini_pipe, [spec, "prompt:fine"])
    assert stack.missing("a", {}) is None
    first = stack.prompts(["", "", ""], [{}, {}, {}], keys, x)
    assert all(p.endswith(", high quality, best quality, highly realistic, masterpiece") for p in first)
    loaded = stack.loaded[0]
    assert isinstance(loaded, Captioner) and len(loaded.captions) == 3
    again = TechniqueStack(mini_pipe, [spec]).prompts(["x"] * 3, [{}] * 3, keys, x)
    assert len(loaded.captions) == 3  # the same model on the same pipeline: looked up, not computed again
    assert first == [f"{c}, high quality, best quality, highly realistic, masterpiece" for c in again]
    assert [stack.prompt("", {}, k) for k in keys] == first
    assert stack.image_fields(torch.flip(x, [0]), keys)[0][spec] == again[2]  # by pixels, not by key


def test_a_model_that_cannot_be_loaded_is_one_line_naming_it(images, tmp_path, capsys, monkeypatch):
    from difffeat.errors import UserError
    from pipelines.techniques.auto_caption import Captioner

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, out = "difffeat-tests/no-such-captioner", tmp_path / "store"
    assert _extract(images, out, "--technique", f"prompt:auto,model={model}") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"difffeat: error: prompt:auto: captioning model '{model}' could not be loaded: offline")
    assert not (out / "manifest.json").exists()  # refused before the store was made
    for where, why in [(tmp_path / "nowhere", "no such folder"), (images, "no config.json"),
                       (images / "000000.png", "a file, not a model folder")]:
        with pytest.raises(UserError, match=why) as e:
            Captioner(str(where), "cpu")
        assert str(where) in str(e.value) and "\n" not in str(e.value)


def test_store_keeps_captions_beside_features_and_through_a_discard(tmp_path):
    from difffeat.store.feature_store import FeatureStoreWriter

    config = {"model": "x"}
    with FeatureStoreWriter(tmp_path / "s", config, shard_size=8) as w:
        w.add("a", {"f": np.zeros((1, 2, 2))}, captions={"prompt:auto": "one"})
        w.add("b", {"f": np.ones((1, 2, 2))})
        w.add("c", {"f": np.ones((1, 2, 2))}, captions={"prompt:auto": "three"})
    w = FeatureStoreWriter(tmp_path / "s", config, shard_size=8, resume=True)
    w.discard(["a"])  # the shard is written again without it
    w.close()
    store = FeatureStore(tmp_path / "s")
    assert store.keys() == ["b", "c"] and store.verify() == []
    assert store.captions("b") == {} and store.captions("c") == {"prompt:auto": "three"}
    with FeatureStoreWriter(tmp_path / "plain", config) as w:
        w.add("a", {"f": np.zeros((1, 2, 2))})
    from safetensors import safe_open

    (shard,) = (tmp_path / "plain" / "shards").iterdir()
    with safe_open(str(shard), framework="np") as f:
        assert "captions" not in f.metadata()  # stores without captions are written as before
