"""What `pipelines` gives the core: the `difffeat.extraction.conditioning.TechniqueProvider` behind the entry point
``difffeat.techniques: pipelines = "pipelines.provider:technique_provider"``.

Light at import (the core loads it while building a parser or an extractor); each method imports what it uses.
"""

from __future__ import annotations

from collections.abc import Sequence

from difffeat.extraction.conditioning import TechniqueProvider


class Provider(TechniqueProvider):
    """Technique stacks, spec strings and variants of the `pipelines` techniques."""

    def stack(self, pipe, techniques: Sequence):
        from pipelines.stack import TechniqueStack

        return TechniqueStack(pipe, techniques)

    def canonical_spec(self, spec: str) -> str:
        from pipelines.base import parse_technique

        return parse_technique(spec).spec

    def parse_variants(self, args: Sequence[str]) -> dict[str, list[str]]:
        from pipelines.variants import parse_variant_args

        return parse_variant_args(list(args))

    def read_variants(self, path: str) -> dict[str, list[str]]:
        from pipelines.variants import read_variants_file

        return read_variants_file(path)


def technique_provider() -> Provider:
    """The entry point's object: called once by the core when it first needs techniques."""
    return Provider()
