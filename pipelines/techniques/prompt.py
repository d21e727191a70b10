"""Prompt techniques: quality-tag templates (the paper's fine-grained prompts), captions, labels, fixed text.

`prompt:TEMPLATE` rewrites each image's prompt. TEMPLATE is a preset name (`PRESETS`) or literal text in
which `{prompt}` (the prompt so far: the run's prompt, or the previous prompt technique's output),
`{caption}` (the image's own caption: sidecar `.txt` or metadata column), `{label}` (its label) and
`{other_caption}` (another image's caption: the next image's in key order, a deliberately wrong prompt for
checking that GATE catches harmful techniques) are filled in; other braces stay as they are. Several prompt
techniques chain in the order given.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pipelines.base import MissingInput, Technique, register_technique

# research/content_shift_gate.md §1 and §3.4: quality words that match the images reduce content shift.
PRESETS = {
    "fine": "{prompt}, high quality, best quality, highly realistic, masterpiece",
    "low": "{prompt}, low quality, low resolution, blurry, draft, grainy",
    "caption": "{caption}",
    "label": "a photo of a {label}",
    "empty": "",
    "other-caption": "{other_caption}",
}
FIELDS = ("prompt", "caption", "label", "other_caption")


class MissingPromptField(MissingInput):
    """An image lacks a field its prompt template needs (e.g. no caption); its run skips the image."""


@register_technique
@dataclass
class PromptTemplate(Technique):
    """Rewrite each image's prompt with a template (preset name or literal text)."""

    name = "prompt"
    free_text = ("template",)
    positional = "template"

    template: str = "fine"

    @property
    def text(self) -> str:
        return PRESETS.get(self.template, self.template)

    def needs(self) -> list[str]:
        return [f for f in FIELDS if "{" + f + "}" in self.text]

    def prepare_prompt(self, prompt: str, fields: Mapping[str, str | None], key: str = "") -> str:
        text = self.text
        values = {"prompt": prompt, **fields}
        for name in self.needs():
            value = values.get(name)
            if value is None:
                raise MissingPromptField(f"{key or 'image'}: no {name} for prompt template {self.template!r}")
            # str.replace, not str.format: other braces in a template are plain text.
            text = text.replace("{" + name + "}", str(value))
        return text.removeprefix(", ")  # "{prompt}, tags" with an empty prompt
