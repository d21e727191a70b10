import os
import shutil
import subprocess
import sys

import pytest
import torch

from difffeat import load_pipeline
from difffeat.data.shapes_lt import caption_vocabulary
from difffeat.errors import UserError
from difffeat.zoo import MODELS, mini
from difffeat.zoo.presets import build_unet


def test_tokenizer_gives_every_caption_word_its_own_id():
    tok = mini.build_tokenizer()
    words = [*caption_vocabulary(), ","]
    ids = [tok(w, add_special_tokens=False).input_ids for w in words]
    assert all(len(i) == 1 for i in ids), [w for w, i in zip(words, ids) if len(i) != 1]
    flat = [i[0] for i in ids]
    assert len(set(flat)) == len(words), "two words share an id"
    assert tok.unk_token_id not in flat
    caption = "a large red circle in the center, gray stripes at the top"
    enc = tok(caption).input_ids
    assert enc[0] == tok.bos_token_id and enc[-1] == tok.eos_token_id and len(enc) == 2 + 13
    assert tok.decode(enc, skip_special_tokens=True).replace(" ,", ",") == caption
    assert tok.model_max_length == 77


def test_word_bpe_learner_reproduces_whole_words():
    vocab, merges = mini.learn_word_bpe(["ab", "abc", "b", "cab"])
    assert {"ab</w>", "abc</w>", "b</w>", "cab</w>"} <= set(vocab)
    assert len(merges) == len(set(merges))


@pytest.mark.parametrize("preset, params", [
    ("sd15-random", 859_520_964),  # the published SD-1.5 UNet's parameter count
    ("sd21-random", 865_910_724),
    ("sdxl-random", 2_567_463_684),
])
def test_presets_have_the_real_architectures(preset, params):
    with torch.device("meta"):
        unet = build_unet(preset)
    assert sum(p.numel() for p in unet.parameters()) == params
    assert preset in MODELS


def test_random_mini_pipeline_runs_one_step():
    pipe = load_pipeline("mini-random")
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size * 4 == 64
    ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        emb = pipe.text_encoder(ids).last_hidden_state
        out = pipe.unet(torch.randn(1, 4, 16, 16), torch.tensor([10]), emb).sample
    assert out.shape == (1, 4, 16, 16) and torch.isfinite(out).all()


@pytest.fixture(scope="module")
def saved_random(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe") / "mini-random"
    load_pipeline("mini-random").save_pretrained(path, safe_serialization=True)
    return path


def test_loads_local_folder_with_dtype(saved_random):
    pipe = load_pipeline(saved_random, dtype="bf16")
    assert pipe.unet.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    ref = load_pipeline(saved_random)
    assert torch.equal(ref.unet.conv_in.weight, load_pipeline("mini-random").unet.conv_in.weight)


def test_incomplete_folder_names_what_is_missing(saved_random, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(saved_random, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(UserError) as e:
        load_pipeline(broken)
    assert "unet/ weights" in str(e.value) and "text_encoder/" in str(e.value) and str(broken) in str(e.value)
    (broken / "model_index.json").unlink()
    with pytest.raises(UserError, match="model_index.json"):
        load_pipeline(broken)


def test_missing_path_hub_id_offline_and_bad_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="no such model folder"):
        load_pipeline(str(tmp_path / "nope" / "deeper" / "model"))
    with pytest.raises(UserError, match="someone/no-such-model.*offline"):
        load_pipeline("someone/no-such-model")
    bad = tmp_path / "weights.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="single-file"):
        load_pipeline(bad)
    txt = tmp_path / "notes.txt"
    txt.write_text("x")
    with pytest.raises(UserError, match="not a checkpoint file"):
        load_pipeline(txt)
    with pytest.raises(UserError, match="unknown dtype"):
        load_pipeline("mini-random", dtype="fp8")


def test_cli_model_error_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "difffeat", "sample", "a red circle", "--out", str(tmp_path),
                           "--model", str(tmp_path / "missing")], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "missing" in proc.stderr


def test_sample_cli_writes_images_grid_and_config(tmp_path):
    import json

    from PIL import Image

    from difffeat.cli import main
    from difffeat.data.shapes_lt import synthesize

    data = synthesize(tmp_path / "d", n=10, seed=0)
    out = tmp_path / "s"
    rc = main(["--quiet", "sample", "a red circle", "--captions", str(data / "test" / "metadata.csv"), "--n", "1",
               "--out", str(out), "--model", "mini-random", "--steps", "2"])
    assert rc == 0
    saved = json.loads((out / "config.json").read_text())
    cfg = saved["config"]
    assert cfg["prompts"][0] == "a red circle" and len(cfg["prompts"]) == 2 and cfg["steps"] == 2
    assert saved["kind"] == "sample" and "torch" in saved["versions"]
    assert Image.open(out / "0001.png").size == (64, 64) and (out / "grid.png").exists()
    assert main(["sample", "--captions", str(data / "test" / "metadata.csv"), "--column", "nope",
                 "--out", str(out)]) == 2


def test_sample_never_replaces_what_it_did_not_write(tmp_path, capsys):
    """Issue #13 item 2: a folder of the user's photos is refused even with --overwrite; an earlier sample run
    is replaced only with --overwrite, and then only its own pictures."""
    from difffeat.cli import main

    photos = tmp_path / "myphotos"
    photos.mkdir()
    (photos / "0000.png").write_bytes(b"my photo")
    for extra in ([], ["--overwrite"]):
        assert main(["--quiet", "sample", "a red circle", "--out", str(photos), "--model", "mini-random",
                     "--steps", "1", *extra]) == 2
        assert "not a difffeat sample run" in capsys.readouterr().err
        assert (photos / "0000.png").read_bytes() == b"my photo" and sorted(os.listdir(photos)) == ["0000.png"]
    out = tmp_path / "s"
    args = ["--quiet", "sample", "a red circle", "--out", str(out), "--model", "mini-random", "--steps", "1"]
    assert main(args) == 0
    first = (out / "0000.png").read_bytes()
    (out / "notes.txt").write_text("mine")
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert (out / "0000.png").read_bytes() == first and (out / "notes.txt").read_text() == "mine"


def test_public_api_contract_names():
    import difffeat
    import downstream.losses

    for name in ("load_pipeline", "list_layers", "FeatureExtractor", "FeatureStore"):
        assert callable(getattr(difffeat, name)), name
    assert callable(downstream.losses.pixel_auc_loss) and callable(downstream.losses.logit_adjusted_loss)
