"""GATE end to end on the shipped mini model: paired dropping, the CLI with its report and --emit, the probe,
and the acceptance check on held-out Shapes-LT images (tiny image counts and few img2img steps: seconds)."""

import json
import shutil

import pytest
import torch

from difffeat.errors import UserError

FAST = {"steps": 4, "n_boot": 200}  # int(4 · 0.7) = 2 denoising steps


@pytest.fixture(scope="module")
def captioned(shapes_dir, tmp_path_factory):
    """A plain folder of 5 Shapes-LT images with sidecar captions; one corrupt, one without a caption."""
    root = tmp_path_factory.mktemp("gate-images")
    for src in sorted((shapes_dir / "test" / "images").glob("*.png"))[:5]:
        shutil.copy(src, root / src.name)
        shutil.copy(src.with_suffix(".txt"), root / f"{src.stem}.txt")
    names = sorted(p.name for p in root.glob("*.png"))
    (root / names[1]).write_bytes(b"not a png at all")
    (root / names[3]).with_suffix(".txt").unlink()
    return root, names


def test_bad_images_are_dropped_from_every_candidate(mini_pipe, captioned):
    from gate.ranking import rank

    root, names = captioned
    result = rank(mini_pipe, str(root), {"caption": ["prompt:caption"], "fine": ["prompt:fine"]}, n=None, **FAST)
    dropped = {d["key"]: d["reason"] for d in result.dropped}
    assert set(dropped) == {names[1], names[3]}
    assert "caption" in dropped[names[3]] and "'caption'" in dropped[names[3]]  # names the candidate needing it
    assert result.keys == [names[0], names[2], names[4]]
    for name, ev in result.evaluations.items():
        assert ev.recon.shape == (3, 3, 64, 64)
        assert all(len(v) == 3 for v in ev.per_image.values()), name
    # Every score is the statistic of the same 3 images; the anchor's feature Score is 0 by definition.
    assert result.scores["reference"]["feature_score"].value == 0.0
    for m in ("psnr", "ssim", "edge_f1"):
        per_image = result.evaluations["caption"].per_image[m]
        assert result.scores["caption"][m].value == pytest.approx(float(per_image.mean()))


def test_fewer_than_two_usable_images_stop_with_a_clear_message(mini_pipe):
    from gate.ranking import rank

    with pytest.raises(UserError, match="1 usable image.*at least 2"):
        rank(mini_pipe, torch.rand(1, 3, 64, 64), {"fine": ["prompt:fine"]}, **FAST)
    with pytest.raises(UserError, match="0 usable image.*2 dropped.*no caption"):
        rank(mini_pipe, torch.rand(2, 3, 64, 64), {"caption": ["prompt:caption"]}, **FAST)


def test_same_noise_for_every_candidate(mini_pipe):
    """Two candidates with the same techniques reconstruct identically: noise and latents are shared by key."""
    from gate.ranking import rank

    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    result = rank(mini_pipe, x, {"a": ["prompt:fine"], "b": ["prompt:fine"]}, **FAST)
    assert torch.equal(result.evaluations["a"].recon, result.evaluations["b"].recon)
    assert result.scores["a"] == result.scores["b"] and result.improvement["a"] == result.improvement["b"]


def test_cli_report_config_and_emit_round_trip(mini_pipe, shapes_dir, tmp_path):
    from difffeat.cli import main
    from pipelines.variants import read_variants_file

    cands = tmp_path / "cands.yaml"
    cands.write_text("caption: [prompt:caption]\nfine: [prompt:fine]\n")
    out, emit = tmp_path / "gate", tmp_path / "variants.yaml"
    rc = main(["--quiet", "gate", str(shapes_dir / "test"), "--candidates", str(cands), "--n", "4", "--steps", "4",
               "--boot", "200", "--out", str(out), "--emit", str(emit)])
    assert rc == 0
    ranking = json.loads((out / "ranking.json").read_text())
    assert [r["candidate"] for r in ranking["ranking"]][0] in ("reference", "caption", "fine")
    assert {r["candidate"] for r in ranking["ranking"]} == {"reference", "caption", "fine"}
    expected = {r["candidate"]: r["techniques"].split(" + ") for r in ranking["ranking"] if r["accepted"]} \
        or {"reference": []}
    assert read_variants_file(emit) == expected
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["candidates"]["caption"] == ["prompt:caption"] and "torch" in config["versions"]
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 4 * 4 and "Ranking" in page
    header = (out / "ranking.csv").read_text().splitlines()[0]
    assert header.startswith("rank,candidate,techniques,psnr,psnr_low,psnr_high")
    assert (out / "scores.png").stat().st_size > 0 and (out / "pca.png").stat().st_size > 0
    # the reconstructions as files, listed for `difffeat report` (which never reads report.html)
    listing = json.loads((out / "reconstructions.json").read_text())
    assert listing["primary"] == "psnr" and listing["columns"][0] == json.loads(
        (out / "ranking.json").read_text())["ranking"][0]["candidate"]
    for row in listing["images"]:
        for name in [row["input"]] + [c[k] for c in row["cells"] for k in ("file", "difference")]:
            assert (out / name).read_bytes().startswith(b"\x89PNG"), name


def test_emit_of_accepted_and_greedy_variants(tmp_path):
    from gate.ranking import GateConfig, GateResult
    from gate.stats import Interval
    from pipelines.variants import read_variants_file, write_variants_file

    iv = Interval(1.0, 0.5, 1.5)
    result = GateResult(GateConfig(), {"reference": [], "canny": ["controlnet:canny"], "cap": ["prompt:caption"]},
                        ["a", "b"], [], ["psnr"], {}, {n: {"psnr": iv} for n in ("reference", "canny", "cap")},
                        {"canny": iv, "cap": iv}, ["canny", "cap"], {}, torch.zeros(0), torch.zeros(0))
    write_variants_file(tmp_path / "v.yaml", result.accepted_variants())
    assert read_variants_file(tmp_path / "v.yaml") == {"canny": ["controlnet:canny"], "cap": ["prompt:caption"]}
    result.greedy = {"selected": ["canny", "cap"], "specs": ["controlnet:canny", "prompt:caption"], "name": "greedy"}
    write_variants_file(tmp_path / "g.yaml", result.accepted_variants())
    assert read_variants_file(tmp_path / "g.yaml") == {"greedy": ["controlnet:canny", "prompt:caption"]}


def test_probe_mode_end_to_end(mini_pipe, shapes_dir):
    import math

    from gate.ranking import rank

    cands = {"caption": ["prompt:caption"], "other": ["prompt:other-caption"]}
    result = rank(mini_pipe, str(shapes_dir / "test"), cands, n=4, probe=str(shapes_dir / "train"), probe_n=8, **FAST)
    p = result.probe
    assert p["task"] == "seg" and p["metric"] == "miou" and p["train"] == 4 and p["test"] == 4
    assert set(p["quality"]) == {"reference", "caption", "other"}
    assert all(0 <= q <= 1 for q in p["quality"].values())
    assert set(p["spearman"]) == set(result.metrics)
    assert math.isnan(p["primary_spearman"]) or -1 <= p["primary_spearman"] <= 1
    cls = rank(mini_pipe, str(shapes_dir / "test"), {"fine": ["prompt:fine"]}, n=2, probe=str(shapes_dir / "train"),
               probe_n=8, probe_task="cls", **FAST).probe
    assert cls["metric"] == "accuracy" and 0 <= cls["quality"]["fine"] <= 1


@pytest.mark.slow
def test_acceptance_on_held_out_shapes(mini_pipe, tmp_path_factory):
    """canny ControlNet and the own caption beat reference on PSNR (significantly); another image's caption
    does worse. 16 held-out test scenes (a seed the mini model never saw), strength 0.7, 10 DDIM steps."""
    from difffeat.data.shapes_lt import synthesize
    from gate.ranking import rank
    from pipelines.techniques.controlnet import mini_canny_dir

    if not (mini_canny_dir() / "config.json").exists():
        pytest.skip("the mini canny ControlNet weights are not shipped yet")
    root = synthesize(tmp_path_factory.mktemp("held-out") / "shapes", n=160, seed=11)
    result = rank(mini_pipe, str(root / "test"), {"canny": ["controlnet:canny"], "caption": ["prompt:caption"],
                                                  "other": ["prompt:other-caption"]}, n=None, steps=10, seed=0)
    assert len(result.keys) == 16
    ref = result.scores["reference"]["psnr"].value
    assert result.scores["canny"]["psnr"].value > ref and result.scores["caption"]["psnr"].value > ref
    assert result.scores["other"]["psnr"].value < ref
    assert set(result.accepted) == {"canny", "caption"}
    assert result.improvement["other"].high < 0


def test_gate_rank_stays_the_function_after_its_module_is_imported():
    """`gate.rank(...)` is the public API; importing the module behind it must not replace it on the package."""
    import gate
    from gate.ranking import GateConfig  # noqa: F401  (what gate.cli does)

    assert callable(gate.rank) and gate.rank.__name__ == "rank"
    import pipelines
    from pipelines.generate import img2img  # noqa: F401

    assert callable(pipelines.img2img) and pipelines.img2img.__name__ == "img2img"


def test_report_folder_is_a_gate_run_folder(tmp_path):
    """Issue #13 item 2: an earlier report is replaced only with overwrite, and only its own files."""
    from gate.ranking import GateConfig
    from gate.report import report_folder

    cfg = GateConfig(images="imgs", candidates={"reference": [], "fine": ["prompt:fine"]})
    out = tmp_path / "report"
    folder = report_folder(out, cfg).create()
    folder.write_json("ranking.json", {"ranking": []})
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"report: holds a gate run; replace it \(overwrite, --overwrite\)"):
        report_folder(out, cfg)
    with pytest.raises(UserError, match=r"another config \(differs in: seed\)"):
        report_folder(out, GateConfig(**{**cfg.to_dict(), "seed": 1}))
    report_folder(out, cfg, overwrite=True).create()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "notes.txt"]
    assert json.loads((out / "config.json").read_text())["config"]["candidates"]["fine"] == ["prompt:fine"]


@pytest.mark.parametrize("field, value, words", [
    ("strength", 0.0, "must be > 0"),
    ("strength", 1.5, "must be ≤ 1"),
    ("steps", 1, "run no denoising step"),
    ("primary", "psnrr", "must be one of"),
    ("n_boot", 10, "must be ≥ 100"),
    ("level", 1.0, "must be < 1"),
    ("feature_reference", "none", "must be one of"),
    ("probe_task", "det", "must be one of"),
    ("strength", float("nan"), "finite"),
])
def test_gate_config_names_the_field(field, value, words):
    from difffeat.spine.run import ConfigError
    from gate.ranking import GateConfig

    with pytest.raises(ConfigError) as e:
        GateConfig.from_dict({field: value})
    assert e.value.field == field and words in str(e.value)
