"""`prompt:auto`: each image's prompt is a caption written by a transformers image-to-text model.

`prompt:auto[,model=ID_OR_FOLDER][,max_tokens=N]`: MODEL is a Hub id (default `DEFAULT_MODEL`, BLIP base: small,
unconditional, good on photographs) or a local folder saved with `save_pretrained` (model and processor), of any
architecture transformers' `AutoModelForImageTextToText` loads that captions without a text prompt (BLIP, GIT,
ViT-GPT2 `VisionEncoderDecoderModel` …). Captions are decoded greedily (no sampling, one beam, at most
`max_tokens` new tokens), so a caption is a function of the model and the image alone.

The captioner sees the image as the diffusion model does (resized to the run's size, `[0, 1]` → 8-bit RGB).
Each image is captioned once: captions are kept by the image's pixels (a digest of the 8-bit image), with the
loaded model, on the pipeline (`difffeat.extraction.conditioning.pipe_cache`), so variants, GATE candidates and repeated
calls reuse them. The caption replaces the prompt; a later prompt technique builds on it (`prompt:auto` then
`prompt:fine` gives "CAPTION, high quality, …"). `difffeat extract` records each image's caption in the store
(`FeatureStore.captions(key)`, beside its features in the shard), so a resumed run never recomputes those of
finished images.

Offline (HF_HUB_OFFLINE set) a Hub id is read from the local cache only; a model that cannot be loaded is one
UserError naming it, raised when the technique is bound, before any image is read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from difffeat.errors import UserError
from difffeat.extraction.conditioning import pipe_cache
from difffeat.zoo.registry import offline, quiet_local_loading
from pipelines.base import Technique, register_technique

DEFAULT_MODEL = "Salesforce/blip-image-captioning-base"
# Captions kept per loaded model: the oldest go first beyond this, so a run over millions of images stays small
# (an extraction needs each caption only while its batch runs; GATE's image sets are far smaller).
KEEP_CAPTIONS = 100_000


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def _cannot_load(model: str, why: str) -> UserError:
    return UserError(f"prompt:auto: captioning model {model!r} could not be loaded: {why}")


def _load(source: str, local_only: bool):
    """(model, images → inputs, ids → texts) of an image-to-text model. A folder with a processor (BLIP, GIT) gives
    both ends at once; one with an image processor and a tokenizer apart (ViT-GPT2) gives each on its own."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    net = AutoModelForImageTextToText.from_pretrained(source, local_files_only=local_only, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(source, local_files_only=local_only)
    if hasattr(processor, "image_processor") and hasattr(processor, "batch_decode"):
        return net, processor, processor.batch_decode
    images = AutoImageProcessor.from_pretrained(source, local_files_only=local_only)
    return net, images, AutoTokenizer.from_pretrained(source, local_files_only=local_only).batch_decode


class Captioner:
    """A loaded image-to-text model and its processor, with the captions it has written (by image digest)."""

    def __init__(self, model: str, device):
        path = Path(model).expanduser()
        if path.exists() and not path.is_dir():
            raise _cannot_load(model, "a file, not a model folder")
        if not path.exists() and (model.startswith((".", "/", "~")) or model.count("/") != 1):
            raise _cannot_load(model, "no such folder, and not a Hub id (owner/name)")
        if path.is_dir() and not (path / "config.json").is_file():
            raise _cannot_load(model, f"{path} is not a transformers model folder: no config.json")
        local = path.is_dir()
        try:
            with quiet_local_loading():
                net, self.encode, self.decode = _load(str(path) if local else model, local or offline())
        except Exception as e:
            why = _first_line(e) if local else "offline (HF_HUB_OFFLINE is set) and not in the local cache; " \
                "fetch it once online, or give model=FOLDER" if offline() else \
                f"not fetched from the Hugging Face Hub ({_first_line(e)})"
            raise _cannot_load(model, why) from None
        self.model = net.to(device).eval().requires_grad_(False)
        self.captions: dict[tuple[str, int], str] = {}  # (image digest, max_tokens) → caption

    def caption(self, pixels: list, digests: list[str], max_tokens: int) -> list[str]:
        """Captions of 8-bit RGB images ([H, W, 3] uint8 arrays), computing only those not yet written."""
        import torch
        from PIL import Image

        todo = {d: p for p, d in zip(pixels, digests) if (d, max_tokens) not in self.captions}
        if todo:
            inputs = self.encode(images=[Image.fromarray(p) for p in todo.values()], return_tensors="pt")
            inputs = {k: v.to(self.model.device) if hasattr(v, "to") else v for k, v in inputs.items()}
            with torch.no_grad():
                ids = self.model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, num_beams=1)
            for d, text in zip(todo, self.decode(ids, skip_special_tokens=True)):
                self.captions[d, max_tokens] = " ".join(text.split())
        out = [self.captions[d, max_tokens] for d in digests]
        while len(self.captions) > KEEP_CAPTIONS:
            self.captions.pop(next(iter(self.captions)))
        return out


def image_digest(pixels) -> str:
    """sha256 of an 8-bit image array with its shape: the same pixels, the same caption."""
    return hashlib.sha256(repr(pixels.shape).encode() + pixels.tobytes()).hexdigest()


@register_technique
@dataclass
class AutoCaption(Technique):
    """The prompt is a caption of the image by an image-to-text model (Hub id or folder), greedy, once per image."""

    name = "prompt:auto"

    model: str = DEFAULT_MODEL
    max_tokens: int = 30

    def __post_init__(self):
        if not self.model.strip():
            raise ValueError("model must be a Hub id or a folder")
        if not 1 <= self.max_tokens <= 512:
            raise ValueError(f"max_tokens must be in [1, 512], got {self.max_tokens}")

    def bind(self, pipe) -> Captioner:
        """The captioner for `pipe`'s device, loaded once per pipeline and model."""
        from difffeat.models import dit

        device = dit.denoiser(pipe).device
        loaded = pipe_cache(pipe, "captioners")
        key = (self.model, str(device))
        if key not in loaded:
            loaded[key] = Captioner(self.model, device)
        return loaded[key]

    def image_fields(self, loaded: Captioner, images, keys: list[str]) -> list[dict[str, str]]:
        """{spec: caption} per image of images [B, 3, H, W] in [0, 1]."""
        eight_bit = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).contiguous()
        pixels = [p.numpy() for p in eight_bit.cpu()]
        captions = loaded.caption(pixels, [image_digest(p) for p in pixels], self.max_tokens)
        return [{self.spec: c} for c in captions]

    def prepare_prompt(self, prompt: str, fields: Mapping[str, str | None], key: str = "") -> str:
        caption = fields.get(self.spec)
        if caption is None:  # a caller that prompted without the images: a bug of that caller, said plainly
            raise UserError(f"{key or 'image'}: {self.spec} has no caption for it; captions come from the images "
                            "(ConditioningStack.prompts with images=…)")
        return caption
