"""Generation techniques (pipelines/): specs, composition, each technique against a direct computation, variants,
and bad input. The effect of the trained mini ControlNet and of prompts is in test_technique_effects.py."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from difffeat.errors import UserError
from pipelines import TechniqueStack, parse_technique
from pipelines.base import ordered


@pytest.fixture(scope="module")
def images():
    from difffeat.data.shapes_lt import iter_scenes

    scenes = list(iter_scenes("test", 3, seed=5))
    x = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 255
    return x, [s.fine_caption for s in scenes]


def random_controlnet(pipe, seed: int):
    """A ControlNet copied from the mini UNet whose zero convolutions are made non-zero, so it has an effect."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 32, 96))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "zero_conv" in name or "controlnet_down_blocks" in name or "controlnet_mid_block" in name \
                    or "conv_out" in name:
                p.normal_(0, 0.05)
    return net


@pytest.fixture(scope="module")
def controlnet_dirs(mini_pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnets")
    paths = []
    for seed in (1, 2):
        random_controlnet(mini_pipe, seed).save_pretrained(root / f"cn{seed}")
        paths.append(str(root / f"cn{seed}"))
    return paths


# ---------------------------------------------------------------------------------------------- specs
@pytest.mark.parametrize("spec, canonical", [
    ("controlnet:canny", "controlnet:canny"),
    ("controlnet:canny,scale=0.5,low=50", "controlnet:canny,scale=0.5,low=50"),
    ("controlnet,scale=1.0", "controlnet:canny"),
    ("lora:/some/dir,scale=0.8", "lora:/some/dir,scale=0.8"),
    ("prompt:fine", "prompt:fine"),
    ("prompt:{caption}, high quality, best quality", "prompt:{caption}, high quality, best quality"),
    ("denoise-from:60", "denoise-from:60"),
    ("denoise-from:60,steps=5", "denoise-from:60,steps=5"),
    ("cfg:7.5", "cfg:7.5"),
    ("cfg:3,negative=blurry, dark", "cfg:3.0,negative=blurry, dark"),
])
def test_specs_round_trip(spec, canonical):
    t = parse_technique(spec)
    assert t.spec == canonical
    assert parse_technique(t.spec) == t


def test_bad_specs_list_the_valid_ones():
    with pytest.raises(UserError, match=r"unknown technique 'contrlnet'.*controlnet:MODEL.*lora:PATH"):
        parse_technique("contrlnet:canny")
    with pytest.raises(UserError, match=r"unknown parameter 'strength'.*controlnet:MODEL,scale=1.0"):
        parse_technique("controlnet:canny,strength=2")
    with pytest.raises(UserError, match="scale must be float"):
        parse_technique("cfg:lots")
    with pytest.raises(UserError, match="lora needs a path"):
        parse_technique("lora")


def test_techniques_compose_in_hook_order():
    specs = ["denoise-from:60", "controlnet:canny", "prompt:caption", "cfg:2", "prompt:fine", "lora:x"]
    assert [t.spec for t in ordered(specs)] == [
        "lora:x", "prompt:caption", "prompt:fine", "cfg:2.0", "controlnet:canny", "denoise-from:60"]


def test_prompt_techniques_chain_like_applying_one_after_another(mini_pipe):
    fields = {"caption": "a red circle", "label": "circle"}
    stack = TechniqueStack(mini_pipe, ["prompt:caption", "prompt:fine"])
    one_by_one = parse_technique("prompt:fine").prepare_prompt(
        parse_technique("prompt:caption").prepare_prompt("x", fields), fields)
    assert stack.prompt("x", fields) == one_by_one == "a red circle, high quality, best quality, highly realistic, " \
                                                      "masterpiece"
    assert TechniqueStack(mini_pipe, ["prompt:fine"]).prompt("") == \
        "high quality, best quality, highly realistic, masterpiece"
    assert TechniqueStack(mini_pipe, ["prompt:label"]).prompt("", fields) == "a photo of a circle"
    assert TechniqueStack(mini_pipe, ["prompt:{label} {x}"]).prompt("", fields) == "circle {x}"
    assert stack.missing("k", {"label": "circle"}) == "no caption for prompt template 'caption'"


# ---------------------------------------------------------------------------------------------- long prompts
def test_long_prompts_are_chunked_not_cut(mini_pipe):
    from difffeat.models.prompts import PromptEncoder, prompt_token_count

    words = "a large red circle at the top left a small blue square in the center".split()
    prompt = " ".join((words * 12)[:100])
    assert prompt_token_count(mini_pipe, prompt) == 100  # the mini tokenizer has one token per word
    embeds, _ = PromptEncoder(mini_pipe)([prompt, "a red circle"])
    assert embeds.shape[1] == 2 * 77
    first = mini_pipe.encode_prompt([" ".join(prompt.split()[:75])], "cpu", 1, False)[0][0]
    second = mini_pipe.encode_prompt([" ".join(prompt.split()[75:])], "cpu", 1, False)[0][0]
    empty = mini_pipe.encode_prompt([""], "cpu", 1, False)[0][0]
    torch.testing.assert_close(embeds[0, :77], first)
    torch.testing.assert_close(embeds[0, 77:], second)
    torch.testing.assert_close(embeds[1, 77:], empty)  # the short prompt is padded with the empty prompt


# ---------------------------------------------------------------------------------------------- techniques
def hooked(pipe, layer, z, t, emb, **kwargs):
    """A plain forward hook on the UNet: the independent reference for captured features."""
    out = {}
    handle = dict(pipe.unet.named_modules())[layer].register_forward_hook(lambda m, a, o: out.setdefault("f", o))
    try:
        with torch.no_grad():
            pipe.unet(z, t, emb, **kwargs)
    finally:
        handle.remove()
    return out["f"]


def noised(pipe, ex, x, keys, t):
    from difffeat.extraction.extract import item_seed, seeded_normal

    z0 = ex.encode_latents(x, keys)
    eps = torch.stack([seeded_normal(z0.shape[1:], item_seed(ex.seed, k, t, 0)) for k in keys])
    a = pipe.scheduler.alphas_cumprod[t]
    return z0, eps, a.sqrt() * z0 + (1 - a).sqrt() * eps


def test_controlnets_add_their_scaled_residuals(mini_pipe, images, controlnet_dirs):
    from difffeat import FeatureExtractor
    from pipelines.canny import canny_tensor

    x, caps = images
    keys = ["a", "b", "c"]
    specs = [f"controlnet:{controlnet_dirs[0]},scale=0.7", f"controlnet:{controlnet_dirs[1]},scale=1.3"]
    ex = FeatureExtractor(mini_pipe, ["up_blocks.1"], timesteps=(300,), techniques=specs)
    got = ex.extract(x, prompts=caps, keys=keys)["up_blocks.1"]
    _, _, zt = noised(mini_pipe, ex, x, keys, 300)
    emb = mini_pipe.encode_prompt(caps, "cpu", 1, False)[0]
    t = torch.full((3,), 300)
    control = canny_tensor(x)
    down = mid = None
    for tech, net in ex.stack.residuals:  # the bound nets, run one after another by hand
        d, m = net(zt, t, emb, controlnet_cond=control, conditioning_scale=tech.scale, return_dict=False)
        down = d if down is None else [a + b for a, b in zip(down, d)]
        mid = m if mid is None else mid + m
    want = hooked(mini_pipe, "up_blocks.1", zt, t, emb, down_block_additional_residuals=down,
                  mid_block_additional_residual=mid)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    plain = FeatureExtractor(mini_pipe, ["up_blocks.1"], timesteps=(300,)).extract(x, prompts=caps, keys=keys)
    assert (plain["up_blocks.1"] - got).abs().mean() > 1e-3  # the residuals did something


def test_cfg_combines_branches(mini_pipe, images):
    from difffeat import FeatureExtractor

    x, caps = images
    run = lambda techniques, prompts: FeatureExtractor(mini_pipe, ["up_blocks.1"], timesteps=(200,),
                                                      techniques=techniques).extract(x, prompts=prompts)["up_blocks.1"]
    cond, uncond = run([], caps), run([], [""] * 3)
    torch.testing.assert_close(run(["cfg:1"], caps), cond, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(run(["cfg:0"], caps), uncond, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(run(["cfg:3"], caps), uncond + 3 * (cond - uncond), rtol=1e-4, atol=1e-4)


def test_denoise_from_runs_ddim_steps_before_the_feature_pass(mini_pipe, images):
    from difffeat import FeatureExtractor

    x, caps = images
    keys = ["a", "b", "c"]
    ex = FeatureExtractor(mini_pipe, ["up_blocks.1"], timesteps=(50,), techniques=["denoise-from:70,steps=2"])
    got = ex.extract(x, prompts=caps, keys=keys)["up_blocks.1"]
    z0, eps, _ = noised(mini_pipe, ex, x, keys, 50)
    alphas = mini_pipe.scheduler.alphas_cumprod
    emb = mini_pipe.encode_prompt(caps, "cpu", 1, False)[0]
    z = alphas[70].sqrt() * z0 + (1 - alphas[70]).sqrt() * eps  # the same draw, noised at the start
    for s, s_next in ((70, 60), (60, 50)):
        with torch.no_grad():
            e = mini_pipe.unet(z, torch.full((3,), s), emb).sample
        x0 = (z - (1 - alphas[s]).sqrt() * e) / alphas[s].sqrt()
        z = alphas[s_next].sqrt() * x0 + (1 - alphas[s_next]).sqrt() * e
    torch.testing.assert_close(got, hooked(mini_pipe, "up_blocks.1", z, torch.full((3,), 50), emb),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match="must start above the feature timestep 300"):
        FeatureExtractor(mini_pipe, ["dift"], timesteps=(50, 300), techniques=["denoise-from:60"])
    with pytest.raises(UserError, match="clean mode"):
        FeatureExtractor(mini_pipe, ["dift"], noise=False, techniques=["denoise-from:60"])


def test_img2img_matches_diffusers_semantics(mini_pipe, images):
    """Without techniques, our img2img equals diffusers' StableDiffusionImg2ImgPipeline with DDIM and the
    same noise (which we feed it through a generator-free path: its `latents` are drawn inside, so compare
    against a hand-written DDIM loop on diffusers' scheduler instead)."""
    from diffusers import DDIMScheduler

    from difffeat.extraction.extract import encode_latents, item_seed, seeded_normal
    from pipelines import img2img

    x, caps = images
    got = img2img(mini_pipe, x, prompts=caps, keys=["a", "b", "c"], strength=0.5, steps=10, seed=3)
    sched = DDIMScheduler.from_config(mini_pipe.scheduler.config)
    sched.set_timesteps(10)
    ts = sched.timesteps[5:]
    z0 = encode_latents(mini_pipe, x)
    noise = torch.stack([seeded_normal(z0.shape[1:], item_seed(3, k, "img2img")) for k in "abc"])
    z = sched.add_noise(z0, noise, ts[:1].repeat(3))
    emb = mini_pipe.encode_prompt(caps, "cpu", 1, False)[0]
    with torch.no_grad():
        for t in ts:
            z = sched.step(mini_pipe.unet(z, t, emb).sample, t, z).prev_sample
        want = ((mini_pipe.vae.decode(z / mini_pipe.vae.config.scaling_factor).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- variants
def _run(shapes_dir, out, **kw):
    from difffeat.extraction.runner import ExtractRunConfig, run_extraction

    cfg = ExtractRunConfig(images=str(shapes_dir / "test"), out=str(out), layers=["dift"], timesteps=[50],
                           prompt_source="csv", **kw)  # an imagefolder: captions from its metadata.csv rows
    return run_extraction(cfg, overwrite=True, progress=False)


def test_variants_equal_separate_runs(shapes_dir, tmp_path, mini_pipe):
    from difffeat import FeatureStore

    _run(shapes_dir, tmp_path / "both", variants={"plain": [], "fine": ["prompt:fine", "cfg:2"]})
    _run(shapes_dir, tmp_path / "plain")
    _run(shapes_dir, tmp_path / "fine", techniques=["cfg:2.0", "prompt:fine"])
    both, plain, fine = (FeatureStore(tmp_path / n) for n in ("both", "plain", "fine"))
    assert sorted(both.keys()) == sorted(plain.keys()) and len(both) == 6
    for key in both.keys():
        got = both[key]
        assert set(got) == {"plain/up_blocks.1", "fine/up_blocks.1"}
        np.testing.assert_allclose(got["plain/up_blocks.1"], plain[key]["up_blocks.1"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["fine/up_blocks.1"], fine[key]["up_blocks.1"], rtol=1e-5, atol=1e-6)
    # Specs round-trip through the manifest, in canonical form.
    assert both.manifest["config"]["variants"] == {"plain": [], "fine": ["prompt:fine", "cfg:2.0"]}
    assert fine.manifest["config"]["techniques"] == ["cfg:2.0", "prompt:fine"]
    for specs in both.manifest["config"]["variants"].values():
        assert [parse_technique(s).spec for s in specs] == specs


def test_variant_arguments_and_files(tmp_path):
    from pipelines.variants import parse_variant_args, read_variants_file, split_specs, write_variants_file

    assert split_specs("controlnet:canny+prompt:{caption}+x+denoise-from:60") == [
        "controlnet:canny", "prompt:{caption}+x", "denoise-from:60"]
    variants = parse_variant_args(["plain=", "canny=controlnet:canny,scale=1+denoise-from:60"])
    assert variants == {"plain": [], "canny": ["controlnet:canny", "denoise-from:60"]}
    write_variants_file(tmp_path / "v.yaml", variants, comment="from a test")
    assert read_variants_file(tmp_path / "v.yaml") == variants
    (tmp_path / "bad.yaml").write_text("variants:\n  x:\n    - controlnet:canny,strenght=2\n")
    with pytest.raises(UserError, match=r"bad.yaml: variant 'x'.*unknown parameter 'strenght'"):
        read_variants_file(tmp_path / "bad.yaml")
    with pytest.raises(UserError, match="NAME=SPEC"):
        parse_variant_args(["controlnet:canny"])
    # a file and --variant flags together (extract --variants, sweep --techniques): one dict, a name in both refused
    from difffeat.extraction.conditioning import variants_given

    assert variants_given(None, []) == {}
    assert variants_given(str(tmp_path / "v.yaml"), ["cap=prompt:caption"]) == {**variants, "cap": ["prompt:caption"]}
    with pytest.raises(UserError, match=r"--variant 'canny' is also in .*v.yaml"):
        variants_given(str(tmp_path / "v.yaml"), ["canny=prompt:caption"])


def test_cli_extract_with_variants(shapes_dir, tmp_path):
    from difffeat import FeatureStore
    from difffeat.cli import main

    out = tmp_path / "cli"
    rc = main(["--quiet", "extract", str(shapes_dir / "val" / "images"), "--out", str(out), "--prompt", "shapes",
               "--variant", "plain=", "--variant", "fine=prompt:fine+cfg:1.5"])
    assert rc == 0
    store = FeatureStore(out)
    assert set(store[store.keys()[0]]) == {"plain/up_blocks.1", "fine/up_blocks.1"}
    assert main(["extract", str(shapes_dir / "val" / "images"), "--out", str(tmp_path / "x"),
                 "--technique", "controlnet:canny,strength=1"]) == 2


# ---------------------------------------------------------------------------------------------- bad input
def test_missing_control_maps_skip_the_image(shapes_dir, tmp_path, controlnet_dirs):
    from difffeat import FeatureStore

    maps = tmp_path / "maps"
    images = sorted((shapes_dir / "test" / "images").glob("*.png"))
    (maps / "images").mkdir(parents=True)
    for p in images[1:]:  # the first image has no map
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(maps / "images" / p.name)
    report = _run(shapes_dir, tmp_path / "store", techniques=[f"controlnet:{controlnet_dirs[0]},control={maps}"])
    assert [f["key"] for f in report["failed"]] == [f"images/{images[0].name}"]
    assert "no control map" in report["failed"][0]["reason"]
    assert len(FeatureStore(tmp_path / "store")) == len(images) - 1
    saved = json.loads((tmp_path / "store" / "report.json").read_text())
    assert saved["failed"][0]["key"] == f"images/{images[0].name}"


def test_controlnet_of_another_shape_is_refused(mini_pipe, tmp_path):
    from diffusers import ControlNetModel

    from difffeat.zoo.mini import UNET_CONFIG

    net = ControlNetModel(**{**{k: UNET_CONFIG[k] for k in ("in_channels", "layers_per_block", "cross_attention_dim",
                                                            "norm_num_groups", "attention_head_dim")},
                             "block_out_channels": (16, 32, 64), "down_block_types": UNET_CONFIG["down_block_types"],
                             "conditioning_embedding_out_channels": (16, 32, 64)})
    net.save_pretrained(tmp_path / "other")
    with pytest.raises(UserError, match=r"does not fit this model's UNet: block widths \(16, 32, 64\) vs the UNet's "
                                        r"\(32, 64, 128\)"):
        TechniqueStack(mini_pipe, [f"controlnet:{tmp_path / 'other'}"])


def test_lora_for_another_architecture_is_refused_naming_keys(tmp_path):
    from safetensors.torch import save_file

    from difffeat import load_pipeline

    pipe = load_pipeline("mini")  # a pipeline of its own: loading LoRAs changes its module tree
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{key}.lora_A.weight": torch.zeros(4, 320), f"{key}.lora_B.weight": torch.zeros(320, 4),
               "unet.no.such.module.lora_A.weight": torch.zeros(4, 8),
               "unet.no.such.module.lora_B.weight": torch.zeros(8, 4)},
              str(tmp_path / "pytorch_lora_weights.safetensors"))
    with pytest.raises(UserError, match=r"another architecture; 4 of 4 keys do not fit.*attn1.to_q.lora_A.weight "
                                        r"\(320 vs the model's 32\).*no such module"):
        TechniqueStack(pipe, [f"lora:{tmp_path}"])
    with pytest.raises(UserError, match="not found"):
        TechniqueStack(pipe, [f"lora:{tmp_path / 'missing'}"])


def test_kohya_lora_loads_like_its_diffusers_twin(tmp_path, images):
    """The same LoRA as a diffusers file, a kohya file (lora_unet_… keys, alpha = rank) and a peft adapter folder
    (alpha = 2r, B halved) gives the same features."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from difffeat import FeatureExtractor, load_pipeline

    pipe = load_pipeline("mini")
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # peft starts B at zero; make the LoRA do something
    layers = get_peft_model_state_dict(pipe.unet)
    type(pipe).save_lora_weights(tmp_path / "diffusers", unet_lora_layers=layers, safe_serialization=True)
    kohya = {}
    for key, value in layers.items():
        module, _, matrix = key.rpartition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        kohya[name + (".lora_down.weight" if matrix.startswith("A") else ".lora_up.weight")] = value
        kohya[name + ".alpha"] = torch.tensor(4.0)
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    (tmp_path / "peft").mkdir()
    save_file({f"base_model.model.{k}": v / 2 if ".lora_B" in k else v for k, v in layers.items()},
              str(tmp_path / "peft" / "adapter_model.safetensors"))  # alpha 8 / r 4 doubles B
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA"}))
    x, caps = images
    feats = {}
    for name, path in (("diffusers", tmp_path / "diffusers"), ("kohya", tmp_path / "kohya.safetensors"),
                       ("peft", tmp_path / "peft")):
        fresh = load_pipeline("mini")
        ex = FeatureExtractor(fresh, ["dift"], techniques=[f"lora:{path},scale=0.5"])
        feats[name] = ex.extract(x, prompts=caps)["up_blocks.1"]
    plain = FeatureExtractor(load_pipeline("mini"), ["dift"]).extract(x, prompts=caps)["up_blocks.1"]
    torch.testing.assert_close(feats["kohya"], feats["diffusers"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(feats["peft"], feats["diffusers"], rtol=1e-4, atol=1e-5)
    assert (feats["kohya"] - plain).abs().mean() > 1e-4
