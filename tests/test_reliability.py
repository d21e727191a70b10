"""The bad-input corpus of issue #13: each case runs the `difffeat` command line as a clumsy or hostile user
would, and checks the exit status, that the error is one line naming the file or flag and the reason (no
traceback), and that nothing outside the command's own output changed (a snapshot of the surrounding folder
— names, sizes, modification times — before and after).

Cases are tiny (a few 64×64 images, `mini-random`, or no model at all: most refusals happen before a model
loads). docs/reliability.md lists which promise each case checks.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difffeat.cli import main
from difffeat.store.feature_store import FeatureStore, FeatureStoreWriter

PWNED = "pwned"  # the file a crafted pickle would create if it were ever unpickled


# ---------------------------------------------------------------------------------------------- helpers
def snapshot(root: Path, owned: tuple[str, ...] = ()) -> dict[str, tuple]:
    """Every path under `root` (symbolic links not followed) with its kind, size and modification time;
    paths under `owned` (the command's own output) are left out."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            rel = path.relative_to(root).as_posix()
            if any(rel == o or rel.startswith(o + "/") for o in owned):
                continue
            st = os.lstat(path)
            kind = "link" if path.is_symlink() else "dir" if path.is_dir() else "file"
            out[rel] = (kind, st.st_size if kind == "file" else 0, st.st_mtime_ns)
    return out


def images(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return folder


def payload_pickle(path: Path, marker: Path) -> None:
    """A checkpoint-looking pickle whose loading would create `marker` (a stand-in for any code)."""

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"model": Payload(), "step": 1}))


def small_store(path: Path, n: int = 4) -> Path:
    with FeatureStoreWriter(path, {"model": "synthetic"}, shard_size=2) as w:
        for i in range(n):
            w.add(f"{i}.png", {"layer": np.full((2, 3, 3), i, np.float32)})
    return path


def damage(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-64:] = bytes(255 - b for b in data[-64:])  # 64 bytes overwritten inside the tensor data
    file.write_bytes(bytes(data))


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["--quiet", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line(err: str, words: tuple[str, ...]) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("difffeat: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])


# ------------------------------------------------------------------------------------------------ table
@dataclass
class Case:
    name: str
    setup: Callable[[Path], list[str]]  # makes the inputs under the folder; returns the command's arguments
    code: int
    words: tuple[str, ...] = ()  # what the one-line message names (file or flag, and the reason)
    owned: tuple[str, ...] = ()  # the command's own output, which it may change
    check: Callable[[Path], None] | None = None


def synth_foreign(tmp: Path, *extra: str) -> list[str]:
    (tmp / "proj").mkdir()
    (tmp / "proj" / "main.py").write_text("print('mine')\n")
    return ["data", "synth", str(tmp / "proj"), "--n", "3", *extra]


def synth_link(tmp: Path) -> list[str]:
    (tmp / "real").mkdir()
    (tmp / "link").symlink_to(tmp / "real", target_is_directory=True)
    return ["data", "synth", str(tmp / "link"), "--n", "3"]


def check_synth_link(tmp: Path) -> None:
    assert (tmp / "link").is_symlink() and (tmp / "real" / "classes.json").is_file()
    assert not [p for p in (tmp / "real").iterdir() if p.name.startswith(".")]


def sample_foreign(tmp: Path) -> list[str]:
    (tmp / "myphotos").mkdir()
    (tmp / "myphotos" / "0000.png").write_bytes(b"my holiday")
    (tmp / "myphotos" / "grid.png").write_bytes(b"my collage")
    return ["sample", "a red circle", "--out", str(tmp / "myphotos"), "--model", "mini-random", "--steps", "1",
            "--overwrite"]


def gate_args(tmp: Path, out: Path, *extra: str) -> list[str]:
    images(tmp / "imgs")
    (tmp / "cands.yaml").write_text("fine: [prompt:fine]\n")
    return ["gate", str(tmp / "imgs"), "--candidates", str(tmp / "cands.yaml"), "--out", str(out), "--n", "2",
            "--steps", "2", "--boot", "100", "--model", "mini-random", *extra]


def gate_foreign_out(tmp: Path) -> list[str]:
    (tmp / "site").mkdir()
    (tmp / "site" / "index.html").write_text("<html>mine</html>")
    return gate_args(tmp, tmp / "site")


def gate_emit_exists(tmp: Path) -> list[str]:
    (tmp / "variants.yaml").write_text("variants: {mine: []}\n")
    return gate_args(tmp, tmp / "report", "--emit", str(tmp / "variants.yaml"))


def lora_foreign_out(tmp: Path) -> list[str]:
    images(tmp / "imgs")
    (tmp / "lora").mkdir()
    (tmp / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"someone's LoRA")
    return ["lora", "train", str(tmp / "imgs"), "--out", str(tmp / "lora"), "--model", "mini-random", "--steps", "1"]


def controlnet_pickle(tmp: Path) -> list[str]:
    payload_pickle(tmp / "run" / "controlnet.pt", tmp / PWNED)
    return ["controlnet", "train", str(tmp / "run"), "--model", "mini-random", "--steps", "1", "--n-train", "2"]


def mini_pickle(tmp: Path) -> list[str]:
    payload_pickle(tmp / "run" / "vae.pt", tmp / PWNED)
    return ["zoo", "train-mini", str(tmp / "run"), "--n-train", "2", "--vae-steps", "1", "--unet-steps", "1"]


def no_pwned(tmp: Path) -> None:
    assert not (tmp / PWNED).exists()


def damaged_store(tmp: Path) -> list[str]:
    small_store(tmp / "feats")
    damage(tmp / "feats" / "shards" / "shard-r000-000001.safetensors")
    return ["inspect", str(tmp / "feats"), "--verify"]


def edited_manifest(tmp: Path) -> list[str]:
    small_store(tmp / "feats")
    manifest = json.loads((tmp / "feats" / "manifest.json").read_text())
    manifest["config"]["model"] = "sd15"  # the features were not made by sd15
    (tmp / "feats" / "manifest.json").write_text(json.dumps(manifest))
    return ["inspect", str(tmp / "feats")]


CASES = [
    # item 1: never delete what difffeat did not write
    Case("synth-into-a-project-folder", synth_foreign, 2, ("proj", "not a difffeat shapes-lt run")),
    Case("synth-overwrite-into-a-project-folder", lambda t: synth_foreign(t, "--overwrite"), 2,
         ("proj", "not a difffeat shapes-lt run")),
    # item 11: synth onto a symbolic link leaves no temporary folder
    Case("synth-onto-a-link", synth_link, 0, owned=("real",), check=check_synth_link),
    # item 2: nothing silently replaced
    Case("sample-over-photos", sample_foreign, 2, ("myphotos", "not a difffeat sample run")),
    Case("gate-out-foreign-folder", gate_foreign_out, 2, ("site", "not a difffeat gate run")),
    Case("gate-emit-existing-file", gate_emit_exists, 2, ("variants.yaml", "exists", "--overwrite")),
    Case("lora-out-someone-elses-lora", lora_foreign_out, 2, ("lora", "not a difffeat lora run")),
    # item 3: no pickle runs
    Case("controlnet-crafted-pickle", controlnet_pickle, 2, ("controlnet.pt", "pickled", "not loaded"),
         check=no_pwned),
    Case("train-mini-crafted-pickle", mini_pickle, 2, ("vae.pt", "pickled", "not loaded"), check=no_pwned),
    # item 13: integrity
    Case("inspect-verify-damaged-shard", damaged_store, 2, ("shard-r000-000001.safetensors", "checksum mismatch")),
    Case("inspect-edited-manifest", edited_manifest, 2, ("manifest.json", "does not match its config_hash")),
]


# item 12: bad arguments are one line naming the flag (or file) and the reason
def extract_with(*extra: str) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        images(tmp / "imgs", 2)
        return ["extract", str(tmp / "imgs"), "--out", str(tmp / "feats"), "--model", "mini-random", "--layer",
                "mid_block", "--batch-size", "1", *extra]

    return setup


def with_store(*argv: str) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        small_store(tmp / "feats", 2)
        return [a.replace("STORE", str(tmp / "feats")).replace("TMP", str(tmp)) for a in argv]

    return setup


def empty_store(tmp: Path) -> list[str]:
    FeatureStoreWriter(tmp / "feats", {"model": "synthetic"}).close()
    return ["viz", str(tmp / "feats"), "--out", str(tmp / "pca.png")]


def trainer_lr_nan(command: str) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        small_store(tmp / "feats", 2)
        labels = ["--masks", str(tmp)] if command == "train-seg" else ["--labels", str(tmp / "labels.csv")]
        return [command, "--features", str(tmp / "feats"), *labels, "--out", str(tmp / "run"), "--lr", "nan"]

    return setup


def manifest_bad_resolution(tmp: Path) -> list[str]:
    images(tmp / "imgs", 2)
    (tmp / "manifest.json").write_text(json.dumps({"config": {"images": str(tmp / "imgs"), "model": "mini-random",
                                                              "layers": ["mid_block"], "resolution": [0, 64]}}))
    return ["extract", "--config", str(tmp / "manifest.json"), "--out", str(tmp / "feats")]


def resume_without_state(tmp: Path) -> list[str]:
    """A mini-model run whose VAE checkpoint folder lost its state.json."""
    from difffeat.spine.run import RunFolder
    from difffeat.zoo.recipe_config import MiniTrainConfig

    cfg = MiniTrainConfig(n_train=2, vae_steps=1, unet_steps=1)
    RunFolder(tmp / "run", "mini", cfg, resume=True, ignore=("threads",)).create()
    step = tmp / "run" / "checkpoints" / "vae" / "step-0000001"
    step.mkdir(parents=True)
    (step.parent / "latest.json").write_text(json.dumps({"step": 1, "dir": "step-0000001"}))
    return ["zoo", "train-mini", str(tmp / "run"), "--n-train", "2", "--vae-steps", "1", "--unet-steps", "1"]


FLAG_CASES = [
    Case("extract-shard-size-0", extract_with("--shard-size", "0"), 2, ("--shard-size", "must be ≥ 1")),
    Case("extract-size-0", extract_with("--size", "0", "0"), 2, ("--size", "must be ≥ 1")),
    Case("extract-size-negative", extract_with("--size", "-64", "64"), 2, ("--size", "must be ≥ 1, got -64")),
    Case("extract-size-not-a-multiple", extract_with("--size", "7", "7"), 2, ("--size", "multiples of 4", "64 64")),
    Case("extract-concat-size-0", extract_with("--concat", "--concat-size", "0", "0"), 2,
         ("--concat-size", "must be ≥ 1")),
    Case("technique-cfg-nan", extract_with("--technique", "cfg:nan"), 2, ("--technique", "cfg:nan", "finite")),
    Case("technique-cfg-negative", extract_with("--technique", "cfg:-5"), 2, ("--technique", "cfg:-5", "≥ 0")),
    Case("technique-controlnet-empty", extract_with("--technique", "controlnet:"), 2,
         ("--technique", "controlnet:", "nothing after ':'")),
    Case("technique-canny-low-above-high", extract_with("--technique", "controlnet:canny,low=300,high=100"), 2,
         ("--technique", "low ≤ high")),
    Case("technique-given-twice", extract_with("--technique", "prompt:fine", "--technique", "prompt:fine"), 2,
         ("--technique", "prompt:fine", "given twice")),
    Case("layers-size-0", lambda t: ["layers", "--model", "mini-random", "--size", "0", "0"], 2,
         ("--size", "multiples of 4")),
    Case("synth-imbalance-nan", lambda t: ["data", "synth", str(t / "set"), "--n", "3", "--imbalance", "nan"], 2,
         ("--imbalance", "nan")),
    Case("train-seg-lr-nan", trainer_lr_nan("train-seg"), 2, ("--lr", "finite")),
    Case("train-cls-lr-nan", trainer_lr_nan("train-cls"), 2, ("--lr", "finite")),
    Case("viz-n-0", with_store("viz", "STORE", "--n", "0", "--out", "TMP/pca.png"), 2, ("--n", "must be ≥ 1")),
    Case("viz-scale-0", with_store("viz", "STORE", "--scale", "0", "--out", "TMP/pca.png"), 2,
         ("--scale", "must be ≥ 1")),
    Case("viz-empty-store", empty_store, 2, ("feats", "no images")),
    Case("sample-steps-0", lambda t: ["sample", "a", "--out", str(t / "s"), "--model", "mini-random", "--steps", "0"],
         2, ("--steps", "must be ≥ 1")),
    Case("sample-steps-negative",
         lambda t: ["sample", "a", "--out", str(t / "s"), "--model", "mini-random", "--steps", "-1"], 2,
         ("--steps", "must be ≥ 1")),
    Case("sample-guidance-nan",
         lambda t: ["sample", "a", "--out", str(t / "s"), "--model", "mini-random", "--guidance", "nan"], 2,
         ("--guidance", "finite")),
    Case("extract-config-bad-resolution", manifest_bad_resolution, 2, ("manifest.json", "resolution", "≥ 1")),
    Case("resume-without-state-json", resume_without_state, 2, ("state.json", "no such checkpoint state"),
         owned=("run",)),
]


# item 10: every input bad is a failure (and leaves no store); one unreadable caption skips only its image
def every_input_bad(tmp: Path) -> list[str]:
    (tmp / "imgs").mkdir()
    for name in ("a.png", "b.png"):
        (tmp / "imgs" / name).write_text("not a picture")
    return ["extract", str(tmp / "imgs"), "--out", str(tmp / "feats"), "--model", "mini-random", "--layer", "mid_block"]


def no_store(tmp: Path) -> None:
    assert not (tmp / "feats").exists()


def one_caption_not_utf8(tmp: Path) -> list[str]:
    argv = extract_with("--prompt-from", "sidecar")(tmp)
    (tmp / "imgs" / "0.txt").write_bytes(b"\xff\xfe not text")
    (tmp / "imgs" / "1.txt").write_text("a red circle")
    return argv


def only_that_image_skipped(tmp: Path) -> None:
    report = json.loads((tmp / "feats" / "report.json").read_text())
    assert report["failed"] == [{"key": "0.png", "reason": "its caption file 0.txt is not UTF-8 text"}]
    assert FeatureStore(tmp / "feats").keys() == ["1.png"]


CASES += FLAG_CASES + [
    Case("extract-every-input-bad", every_input_bad, 2, ("imgs", "none of the 2 input files", "no store was written"),
         owned=("feats",), check=no_store),
    Case("extract-one-caption-not-utf8", one_caption_not_utf8, 0, owned=("feats",), check=only_that_image_skipped),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, tmp_path, capsys):
    argv = case.setup(tmp_path)
    before = snapshot(tmp_path, case.owned)
    code, out, err = run_cli(argv, capsys)
    assert code == case.code, (out, err)
    if case.code:
        assert_one_line(err, case.words)
    assert snapshot(tmp_path, case.owned) == before, "the command changed something outside its own output"
    if case.check:
        case.check(tmp_path)


# ------------------------------------------------------------------------------------ multi-step cases
# One image per batch: CPU kernels may round differently for other batch sizes, and these tests compare bits.
EXTRACT = ["--model", "mini-random", "--layer", "mid_block", "--batch-size", "1"]


def test_a_store_inside_its_input_folder_never_takes_its_own_outputs(tmp_path, capsys):
    """Item 8: `extract nest --out nest/feats`, `viz … --out nest/feats/pca.png`, then `--resume`."""
    nest = images(tmp_path / "nest")
    assert run_cli(["extract", str(nest), "--out", str(nest / "feats"), *EXTRACT], capsys)[0] == 0
    assert run_cli(["viz", str(nest / "feats"), "--out", str(nest / "feats" / "pca.png")], capsys)[0] == 0
    assert (nest / "feats" / "pca.png").is_file()
    code, _, err = run_cli(["extract", str(nest), "--out", str(nest / "feats"), *EXTRACT, "--resume"], capsys)
    assert code == 0, err
    assert FeatureStore(nest / "feats").keys() == ["0.png", "1.png", "2.png"]
    assert json.loads((nest / "feats" / "report.json").read_text())["images_found"] == 3


def test_resume_after_inputs_changed_or_went_away(tmp_path, capsys):
    """Item 15: a changed image is extracted again, a deleted one dropped, both noted in the report."""
    src = images(tmp_path / "imgs")
    store = tmp_path / "feats"
    assert run_cli(["extract", str(src), "--out", str(store), *EXTRACT], capsys)[0] == 0
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(src / "1.png")  # edited since
    os.utime(src / "1.png", ns=(1, 1))  # an mtime the first run cannot have seen
    (src / "2.png").unlink()
    code, out, err = run_cli(["extract", str(src), "--out", str(store), *EXTRACT, "--resume"], capsys)
    assert code == 0, err
    notes = {n["key"]: n["reason"] for n in json.loads((store / "report.json").read_text())["notes"]}
    assert notes == {"1.png": "its input changed since it was extracted; its features were dropped",
                     "2.png": "its input is gone; its features were dropped"}
    assert FeatureStore(store).keys() == ["0.png", "1.png"]
    fresh = tmp_path / "fresh"
    assert run_cli(["extract", str(src), "--out", str(fresh), *EXTRACT], capsys)[0] == 0
    for key in ("0.png", "1.png"):  # the resumed store equals a fresh run on the inputs as they are now
        a, b = FeatureStore(store)[key], FeatureStore(fresh)[key]
        assert all(np.array_equal(a[layer], b[layer]) for layer in a)
    assert FeatureStore(store).verify() == []


def test_two_runs_on_one_store_at_once(tmp_path, capsys):
    """Item 14: while one run writes a store, a second `--resume` fails naming the lock and the process."""
    src = images(tmp_path / "imgs")
    store = tmp_path / "feats"
    assert run_cli(["extract", str(src), "--out", str(store), *EXTRACT], capsys)[0] == 0
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from difffeat.store.feature_store import FeatureStore, FeatureStoreWriter
            w = FeatureStoreWriter({str(store)!r}, FeatureStore({str(store)!r}).manifest["config"], resume=True)
            print("holding", flush=True)
            sys.stdin.read()  # until the test lets go
            w.close()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        before = snapshot(tmp_path)
        code, _, err = run_cli(["extract", str(src), "--out", str(store), *EXTRACT, "--resume"], capsys)
        assert code == 2
        assert_one_line(err, (".lock-r000", f"process {holder.pid}"))
        assert snapshot(tmp_path) == before
    finally:
        holder.communicate("", timeout=60)
    assert run_cli(["extract", str(src), "--out", str(store), *EXTRACT, "--resume"], capsys)[0] == 0


def test_disk_full_during_extraction_is_one_line(tmp_path, capsys, monkeypatch):
    """Item 11: the shard write fails once, the run ends with one line, no temporary file, no second try."""
    from safetensors import SafetensorError

    src = images(tmp_path / "imgs")
    calls = []

    def full(tensors, filename, metadata=None):
        calls.append(filename)
        Path(filename).write_bytes(b"half a shard")
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    monkeypatch.setattr("safetensors.numpy.save_file", full)
    code, _, err = run_cli(["extract", str(src), "--out", str(tmp_path / "feats"), *EXTRACT], capsys)
    assert code == 2 and len(calls) == 1
    assert_one_line(err, ("feats/shards", "shard-r000-000000.safetensors", "No space left on device"))
    # No partial shard, no temporary file: the store this run began got nothing, so it is taken away whole (a retry
    # with other settings finds no store; test_reliability_weak.py)
    assert not (tmp_path / "feats").exists()


# ------------------------------------------------------------------------------------------- trainers
def test_lora_run_folder_rules(tmp_path):
    """A LoRA run resumes or is done under the same config, is replaced only with overwrite, and a pickle put
    where a checkpoint belongs is refused without being unpickled."""
    import torch

    from difffeat.errors import UserError
    from difffeat.spine.run import Checkpoints
    from pipelines.lora_train import LoraTrainConfig, train_lora

    src = images(tmp_path / "imgs", 2)
    cfg = LoraTrainConfig(images=str(src), out=str(tmp_path / "lora"), model="mini-random", rank=2, alpha=2,
                          steps=3, checkpoint_every=1, batch_size=2, text_lr=0)
    out = train_lora(cfg, progress=False)
    weights = (out / "pytorch_lora_weights.safetensors").read_bytes()
    saved = json.loads((out / "config.json").read_text())
    assert saved["kind"] == "lora" and not (out / "checkpoints").exists()
    mode = lambda name: (out / name).stat().st_mode & 0o777  # noqa: E731
    assert mode("pytorch_lora_weights.safetensors") == mode("config.json")
    before = snapshot(tmp_path)
    assert train_lora(cfg, progress=False) == out and snapshot(tmp_path) == before  # done: nothing redone
    other = LoraTrainConfig(**{**cfg.to_dict(), "seed": 1})
    with pytest.raises(UserError, match=r"lora: holds a lora run of another config \(differs in: seed\)"):
        train_lora(other, progress=False)
    (out / "notes.txt").write_text("mine")
    train_lora(other, progress=False, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "pytorch_lora_weights.safetensors").read_bytes() != weights
    # An interrupted run (a checkpoint at step 1) whose checkpoint was swapped for a pickle.
    Checkpoints(out / "checkpoints").save(1, params={"0": torch.zeros(1)})
    step = Checkpoints(out / "checkpoints").latest().path
    payload_pickle(step / "params.safetensors", tmp_path / PWNED)
    with pytest.raises(UserError, match=r"params.safetensors: unreadable"):
        train_lora(other, progress=False)
    assert not (tmp_path / PWNED).exists()


def test_controlnet_checkpoint_is_safetensors_and_a_pickle_in_its_place_runs_no_code(tmp_path):
    from difffeat.errors import UserError
    from difffeat.spine.run import Checkpoints
    from pipelines.train_controlnet import ControlNetTrainConfig, train_controlnet

    cfg = ControlNetTrainConfig(model="mini-random", n_train=2, steps=1, batch_size=2)
    run = tmp_path / "run"
    export = train_controlnet(run, cfg=cfg, log_every=1)
    assert (export / "config.json").is_file() and json.loads((run / "config.json").read_text())["kind"] == "controlnet"
    step = Checkpoints(run / "checkpoints").latest()
    assert step.step == 1 and {p.name for p in step.path.iterdir()} == {"model.safetensors", "optimizer.safetensors",
                                                                         "state.json"}
    payload_pickle(step.path / "optimizer.safetensors", tmp_path / PWNED)
    with pytest.raises(UserError, match=r"optimizer.safetensors: unreadable"):
        train_controlnet(run, cfg=cfg)
    assert not (tmp_path / PWNED).exists()


def test_a_checkpoint_pointer_cannot_lead_out_of_its_run(tmp_path):
    """Item 4 (the spine's half): `checkpoints/latest.json` naming another run's checkpoint is refused."""
    import torch

    from difffeat.errors import UserError
    from difffeat.spine.run import Checkpoints

    other = Checkpoints(tmp_path / "other-run" / "checkpoints")
    other.save(5, model={"w": torch.ones(2)})
    mine = Checkpoints(tmp_path / "run" / "checkpoints")
    mine.save(1, model={"w": torch.zeros(2)})
    for pointer in ("../../other-run/checkpoints/step-0000005", "/etc", "step-0000005"):
        (tmp_path / "run" / "checkpoints" / "latest.json").write_text(json.dumps({"step": 5, "dir": pointer}))
        with pytest.raises(UserError, match=r"latest.json: (names|checkpoint)"):
            mine.latest()


def test_a_diverging_lora_stops_with_one_line(tmp_path):
    """NaN stops training: a learning rate far too high ends the LoRA run at the first non-finite loss."""
    from difffeat.errors import UserError
    from pipelines.lora_train import LoraTrainConfig, train_lora

    cfg = LoraTrainConfig(images=str(images(tmp_path / "imgs", 2)), out=str(tmp_path / "lora"), model="mini-random",
                          rank=2, alpha=2, steps=6, batch_size=2, text_lr=0, unet_lr=1e30)
    with pytest.raises(UserError, match=r"the LoRA training loss became (nan|inf) at step \d; lower the learning"):
        train_lora(cfg, progress=False)
    assert not (tmp_path / "lora" / "pytorch_lora_weights.safetensors").exists()


def test_inspect_into_a_closed_pipe_exits_quietly(tmp_path):
    """`difffeat inspect STORE | head -1`: the reader stops early; no BrokenPipeError traceback, status 0."""
    small_store(tmp_path / "feats", 2)
    proc = subprocess.run(f"{sys.executable} -m difffeat inspect {tmp_path / 'feats'} | head -c 1; "
                          "exit ${PIPESTATUS[0]}", shell=True, executable="/bin/bash", capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and "Broken pipe" not in proc.stderr, proc.stderr


# item 9: a batch far too big for the memory there is is refused before any forward pass at that size, from the
# layer shapes alone (the limit comes from the environment, so nothing big is ever allocated)
@pytest.mark.parametrize("size, batch, words", [
    ("1024", "8", ("batch 8 does not fit", "per image", "4.0 GiB is available", "batch 3 would fit",
                   "--batch-size 3")),
    ("4096", "1", ("batch 1 does not fit", "4.0 GiB is available", "not even a batch of 1 fits", "--size")),
    ("4096", "auto", ("batch 1 does not fit", "not even a batch of 1 fits")),
])
def test_a_batch_that_cannot_fit_is_refused_from_shapes(size, batch, words, tmp_path, capsys, monkeypatch):
    import resource

    from difffeat.extraction.autobatch import MEMORY_LIMIT_ENV

    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(4 * 2**30))
    images(tmp_path / "imgs", 2)
    before = snapshot(tmp_path, ("feats",))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code, out, err = run_cli(["extract", str(tmp_path / "imgs"), "--out", str(tmp_path / "feats"), "--model",
                              "mini-random", "--size", size, size, "--batch-size", batch], capsys)
    assert code == 2, (out, err)
    assert_one_line(err, words)
    assert snapshot(tmp_path, ("feats",)) == before
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) * 1024
    assert grown < 2**30, f"the refusal itself took {grown} bytes"  # the estimate ran nothing at that size
