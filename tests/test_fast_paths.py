"""The fast paths of `difffeat extract` (issue 17): each changes speed, never the store.

Decoding workers, background writes, batch padding, `torch.compile` (with its one-line fallback), attention
backend (xformers → SDPA with the reason), `--batch-size auto` (with a fake memory limit) and the refusal of
a batch that cannot fit — all run here on the CPU with the random-weight mini model; the CUDA-only parts
(pinned memory, the CUDA allocator's numbers, out-of-memory errors) run through the same code with the
device-specific call faked or off.
"""

import json
import re
import shutil
import threading
import time

import numpy as np
import pytest
import torch
import torch._dynamo.exc

from difffeat.cli import main
from difffeat.data.shapes_lt import synthesize
from difffeat.errors import UserError
from difffeat.store.feature_store import FeatureStore

MODEL = "mini-random"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """16 Shapes-LT train images with caption sidecars."""
    return synthesize(tmp_path_factory.mktemp("fast") / "shapes", n=20, seed=5) / "train" / "images"


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFFEAT_CACHE", str(tmp_path / "cache"))  # batch-size choices stay in the test


def _extract(images, out, *extra):
    return main(["--quiet", "extract", str(images), "--out", str(out), "--model", MODEL, "--layer", "up_blocks.1",
                 "--layer", "down_blocks.1", *extra])


def _same_store(a, b, atol=0.0):
    a, b = FeatureStore(a), FeatureStore(b)
    assert a.keys() == b.keys() and a.layers == b.layers
    for key in a.keys():
        for layer, array in a[key].items():
            if atol:
                np.testing.assert_allclose(array, b[key][layer], rtol=0, atol=atol)
            else:
                assert np.array_equal(array, b[key][layer]), f"{key} {layer}"


# ------------------------------------------------------------------------------------------- write-behind
class Recorder:
    def __init__(self, delay=0.0, fail_at=None):
        self.calls, self.delay, self.fail_at = [], delay, fail_at

    def add(self, key, features, stamp=None):
        time.sleep(self.delay)
        if key == self.fail_at:
            raise UserError("store: cannot write feature shard (No space left on device)")
        self.calls.append(("add", key, float(features["f"].sum()), stamp))

    def fail(self, key, reason):
        self.calls.append(("fail", key, reason))

    def flush(self):
        self.calls.append(("flush",))


def test_write_behind_keeps_order_and_bounds_what_waits():
    from difffeat.extraction.write_behind import WriteBehind

    def jobs(wb):
        for b in range(6):
            keys = [f"{b}-{i}" for i in range(3)]
            wb.add(keys, {"f": torch.arange(3.0)[:, None] + b}, [(b, i) for i in range(3)])
            if b == 2:
                wb.fail("bad.png", "not an image")

    plain, threaded = Recorder(), Recorder(delay=0.01)
    with WriteBehind(plain, threaded=False) as wb:
        jobs(wb)
    pending = []
    wb = WriteBehind(threaded, max_pending=1)
    for b in range(6):
        wb.add([f"{b}-{i}" for i in range(3)], {"f": torch.arange(3.0)[:, None] + b}, [(b, i) for i in range(3)])
        pending.append(3 * (b + 1) - sum(1 for c in threaded.calls if c[0] == "add"))
        if b == 2:
            wb.fail("bad.png", "not an image")
    wb.close()
    assert threaded.calls == plain.calls, "the thread writes exactly what the loop would, in order"
    assert plain.calls[-1] == ("flush",), "the last partial shard is written by the writer's side too"
    assert max(pending) <= 2 * 3, "at most the batch being written and the one queued (memory stays flat)"


def test_write_behind_raises_the_threads_error_once_and_writes_nothing_after():
    from difffeat.extraction.write_behind import WriteBehind

    rec = Recorder(fail_at="1-0")
    wb = WriteBehind(rec, max_pending=4)
    with pytest.raises(UserError, match="No space left") as err:
        for b in range(5):
            wb.add([f"{b}-0", f"{b}-1"], {"f": torch.ones(2, 1)})
            time.sleep(0.05)
        wb.close()
    assert "Traceback" not in str(err.value)
    assert [c[1] for c in rec.calls] == ["0-0", "0-1"], "nothing written after the failure"
    wb.close()  # already raised: closing again is quiet
    assert not any(t.name == "difffeat-store-writer" and t.is_alive() for t in threading.enumerate())


def test_a_failing_background_write_ends_the_run_with_one_line(images, tmp_path, monkeypatch, capsys):
    from difffeat.store.feature_store import FeatureStoreWriter

    def full(self, final, images):
        raise UserError(f"{final.parent}: cannot write feature shard {final.name} (No space left on device)")

    monkeypatch.setattr(FeatureStoreWriter, "_write_shard", full)
    assert _extract(images, tmp_path / "store", "--shard-size", "4") == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("difffeat: error")]) == 1


# ------------------------------------------------------------------------------------- decoding workers
def _loader(images, workers, prompt_source="sidecar", thread=False):
    from difffeat.data.sources import ImageSource
    from difffeat.extraction.runner import ExtractRunConfig, PromptSource
    from difffeat.models.loading import BatchLoader

    source = ImageSource(str(images))
    prompts = PromptSource(ExtractRunConfig(images=str(images), out="", prompt_source=prompt_source), source)
    chunks = [source.items[s : s + 5] for s in range(0, len(source.items), 5)]
    return BatchLoader(source, prompts, chunks, (64, 64), "center-crop", workers=workers, thread=thread)


def test_worker_processes_decode_the_same_batches(images, tmp_path):
    src = tmp_path / "imgs"
    shutil.copytree(images, src)
    (src / "broken.png").write_text("not an image")
    plain, forked, threaded = list(_loader(src, 0)), list(_loader(src, 2)), list(_loader(src, 0, thread=True))
    assert len(plain) == len(forked) == len(threaded) == 4
    for a, b in [*zip(plain, forked), *zip(plain, threaded)]:
        assert [i.key for i in a.items] == [i.key for i in b.items]
        assert torch.equal(a.pixels, b.pixels) and a.pixels.dtype == torch.float32
        assert a.texts == b.texts and a.fields == b.fields and a.stamps == b.stamps
        assert [(i.key, r) for i, r in a.failed] == [(i.key, r) for i, r in b.failed]
    assert any(i.key == "broken.png" for b in forked for i, _ in b.failed)


def test_a_decoding_thread_stops_with_its_consumer_and_passes_on_its_errors(images, monkeypatch):
    import difffeat.models.loading as loading

    batches = iter(_loader(images, 0, thread=True))
    next(batches)
    batches.close()  # the run ended early: the thread must not linger
    assert not any(t.name == "difffeat-decode" and t.is_alive() for t in threading.enumerate())

    def broken(*a, **k):
        raise MemoryError("decoding ran out of memory")

    monkeypatch.setattr(loading, "decode_chunk", broken)
    with pytest.raises(MemoryError, match="decoding ran out"):
        list(_loader(images, 0, thread=True))


def test_a_run_stopping_mistake_in_a_worker_is_one_line(images, tmp_path, capsys):
    batches = list(_loader(images, 2, prompt_source="label"))  # a plain folder has no label column
    assert batches[0].error and "label" in batches[0].error
    assert _extract(images, tmp_path / "store", "--workers", "2", "--prompt-from", "label") == 2
    err = capsys.readouterr().err
    assert "label" in err and "Traceback" not in err and "worker" not in err


def test_fast_paths_write_the_same_store(images, tmp_path):
    """Workers + background writes (and padding's effect) against the plain loop, byte for byte."""
    assert _extract(images, tmp_path / "plain", "--batch-size", "5", "--no-background-write", "--workers", "0",
                    "--no-background-decode") == 0
    assert _extract(images, tmp_path / "fast", "--batch-size", "5", "--workers", "2") == 0
    _same_store(tmp_path / "plain", tmp_path / "fast")
    assert _extract(images, tmp_path / "thread", "--batch-size", "5") == 0  # decoding on a thread (the CPU default)
    _same_store(tmp_path / "plain", tmp_path / "thread")
    speed = json.loads((tmp_path / "thread" / "report.json").read_text())["processes"][0]["speed"]
    assert speed["workers"] == 0 and speed["background_decode"] is True
    report = json.loads((tmp_path / "fast" / "report.json").read_text())
    speed = report["processes"][0]["speed"]
    assert speed["workers"] == 2 and speed["background_write"] is True and speed["attention"] == "sdpa"
    # Padding the last batch (16 = 5 + 5 + 5 + 1) changes only float rounding, and only there.
    assert _extract(images, tmp_path / "padded", "--batch-size", "5", "--pad-batches") == 0
    _same_store(tmp_path / "plain", tmp_path / "padded", atol=1e-4)


def test_report_and_inspect_show_speed_and_memory(images, tmp_path, capsys):
    assert _extract(images, tmp_path / "store") == 0
    out = capsys.readouterr().out
    assert re.search(r"extracted 16 images .*img/s per process, batch 8, peak memory [\d.]+ [MG]iB", out), out
    report = json.loads((tmp_path / "store" / "report.json").read_text())
    assert report["peak_memory_bytes"] > 100 * 2**20 and report["images_per_second"] > 0
    assert report["peak_device_memory_bytes"] is None  # no GPU here
    assert main(["inspect", str(tmp_path / "store")]) == 0
    assert re.search(r"last run: +[\d.]+ images/s, peak memory [\d.]+ [MG]iB, batch 8", capsys.readouterr().out)


# ---------------------------------------------------------------------------------- attention backends
def test_xformers_that_cannot_run_says_why_then_uses_sdpa(images, tmp_path, capsys):
    from difffeat import load_pipeline
    from difffeat.extraction.fastpath import use_attention

    said = []
    assert use_attention(load_pipeline(MODEL), "xformers", "cpu", warn=said.append) == "sdpa"
    assert len(said) == 1 and "needs a CUDA device" in said[0] and "SDPA" in said[0]
    assert _extract(images, tmp_path / "store", "--attention-backend", "xformers") == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "xformers" in line]
    assert err == ["difffeat: warning: xformers requested but not usable: xformers needs a CUDA device and this "
                   "run is on cpu; using torch SDPA"]


# ---------------------------------------------------------------------------------------------- compile
class Broken(torch._dynamo.exc.TorchDynamoException):
    pass


def test_compile_failing_at_the_first_call_falls_back_with_one_line(monkeypatch):
    from difffeat.extraction.fastpath import Compiled

    def compile_that_fails_later(fn, **kwargs):
        def call(*a, **k):
            raise Broken("InductorError: CppCompileError: C++ compile error (no cc)")
        return call

    monkeypatch.setattr(torch, "compile", compile_that_fails_later)
    layer, x, said = torch.nn.Linear(3, 2), torch.randn(4, 3), []
    ref = layer(x)
    with Compiled(layer, warn=said.append) as c:
        assert torch.equal(layer(x), ref) and torch.equal(layer(x), ref)
    assert len(said) == 1 and "cannot compile the Linear" in said[0] and "no cc" in said[0]
    assert c.failed and layer._compiled_call_impl is None
    monkeypatch.undo()
    with Compiled(layer, backend="no-such-backend", warn=said.append) as c:  # refused when wrapping
        assert torch.equal(layer(x), ref)
    assert len(said) == 2 and "InvalidBackend" in said[1]


def test_compile_that_torch_cannot_do_falls_back_in_the_cli(images, tmp_path, capsys):
    assert _extract(images, tmp_path / "plain", "--batch-size", "5", "--pad-batches") == 0
    assert _extract(images, tmp_path / "compiled", "--batch-size", "5", "--compile", "--compile-backend", "nope") == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("difffeat: warning: torch.compile cannot compile the "
                                               "UNet2DConditionModel here (InvalidBackend")
    _same_store(tmp_path / "plain", tmp_path / "compiled")  # eager, with the compiled path's one batch shape
    report = json.loads((tmp_path / "compiled" / "report.json").read_text())
    assert report["processes"][0]["speed"]["compile"]["failed"].startswith("InvalidBackend")


@pytest.mark.slow
def test_compiled_unet_gives_the_eager_features(images, tmp_path):
    """Through dynamo (the eager backend: no C compiler needed, about a minute of tracing on this machine): the
    capture hooks and their early exit work inside the compiled UNet, and the padded batches keep one shape."""
    from torch._dynamo.utils import counters

    assert _extract(images, tmp_path / "plain", "--batch-size", "5", "--pad-batches") == 0
    assert _extract(images, tmp_path / "compiled", "--batch-size", "5", "--compile", "--compile-backend", "eager") == 0
    graphs = counters["stats"]["unique_graphs"]
    _same_store(tmp_path / "plain", tmp_path / "compiled", atol=1e-5)
    assert json.loads((tmp_path / "compiled" / "report.json").read_text())["processes"][0]["speed"]["compile"][
        "failed"] is None
    assert _extract(images, tmp_path / "again", "--batch-size", "5", "--compile", "--compile-backend", "eager") == 0
    assert counters["stats"]["unique_graphs"] == graphs, "a second run reuses the compiled graphs"


# ---------------------------------------------------------------------------------------- batch sizes
def _fake_memory(probe, per_image):
    """The real probe's time, and a memory need of `per_image` bytes per image (the fake limit's other half)."""
    def fake(b):
        seconds, _ = probe(b)
        return seconds, b * per_image
    return fake


def test_auto_batch_size_probes_within_the_limit_and_is_cached(images, tmp_path, monkeypatch):
    """Fake memory: 100 MiB per image under an 850 MiB limit, so batches above 8 do not fit: the probe stays under
    it and the next run takes the cached choice. (Whether the choice runs within 10 % of the best fixed batch is a
    timing, measured by benchmarks/auto_batch.py, not asserted here.)"""
    from difffeat.extraction import autobatch
    from difffeat.extraction.runner import ExtractRunConfig, run_extraction

    real = autobatch.extraction_probe
    monkeypatch.setattr(autobatch, "extraction_probe",
                        lambda ext, dev, measure_memory=True: _fake_memory(real(ext, dev, False), 100 * 2**20))
    monkeypatch.setattr(autobatch, "memory_limit", lambda device, max_memory=None: 850 * 2**20)
    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(3):  # 48 images
        for p in images.glob("*.png"):
            shutil.copy(p, src / f"{i}-{p.name}")

    def run(batch, name):
        cfg = ExtractRunConfig(images=str(src), out=str(tmp_path / name), model=MODEL, layers=["dift"],
                               batch_size=batch)
        return run_extraction(cfg, overwrite=True, progress=False)

    auto = run("auto", "auto")
    chosen = auto["batch_size"]
    sizing = auto["batch_sizing"]
    assert sizing["source"] == "probe" and chosen <= 8
    assert set(sizing["tried"]) <= {"1", "2", "4", "8"}, "16 would need 1.6 GiB: not even tried"
    assert "over the limit" in sizing["stopped"] or "not 3 % faster" in sizing["stopped"]
    assert auto["extracted"] == 48 and auto["images_per_second"] > 0
    again = run("auto", "auto2")
    assert again["batch_sizing"]["source"] == "cache" and again["batch_size"] == chosen


def test_a_batch_that_cannot_fit_gives_the_numbers_and_the_batch_that_would():
    from difffeat.extraction import autobatch

    def probe(b):  # 50 MiB fixed, 100 MiB per image
        return 0.01 * b, 50 * 2**20 + b * 100 * 2**20

    with pytest.raises(UserError) as e:
        autobatch.check_fits(probe, 8, "cpu", 500 * 2**20)
    assert re.fullmatch(r"batch 8 does not fit on cpu: it needs about 850\.0 MiB \(100\.0 MiB per image\), and "
                        r"500\.0 MiB is available of [\d.]+ GiB; batch 4 would fit: --batch-size 4 or "
                        r"--batch-size auto", str(e.value)), str(e.value)
    assert autobatch.check_fits(probe, 2, "cpu", 500 * 2**20)["limit_bytes"] == 500 * 2**20
    choice = autobatch.choose_batch_size(probe, 500 * 2**20)
    assert choice["batch_size"] == 4 and "8" not in choice["tried"], "8 is predicted not to fit, so not tried"


def test_a_batch_too_big_for_the_memory_is_refused_before_it_runs(images, tmp_path, capsys):
    """Real RSS: at 256² a mini-random image needs tens of MiB (about 70 measured); 200 MiB cannot hold 8."""
    assert _extract(images, tmp_path / "store", "--size", "256", "256", "--max-memory", "0.2") == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"difffeat: error: batch 8 does not fit on cpu: it needs about [\d.]+ [MG]iB "
                        r"\([\d.]+ MiB per image\), and 204\.8 MiB is available of [\d.]+ GiB; "
                        r"batch [1-7] would fit: --batch-size [1-7] or --batch-size auto", err), err
    assert not list((tmp_path / "store").glob("shards/*.safetensors")), "nothing extracted"


def test_running_out_of_device_memory_names_the_batch_that_would_fit(images, tmp_path, monkeypatch, capsys):
    """What a CUDA out-of-memory error becomes (raised here by hand: there is no GPU)."""
    import difffeat.extraction.runner as runner

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(runner, "_features", oom)
    assert _extract(images, tmp_path / "store", "--batch-size", "8") == 2
    err = capsys.readouterr().err
    assert re.search(r"batch 8 ran out of memory on cpu: about [\d.]+ [KMG]iB per image, [\d.]+ [KMG]iB available "
                     r"of [\d.]+ GiB; batch 4 would fit: --batch-size 4 or --batch-size auto", err), err
    assert "Traceback" not in err
