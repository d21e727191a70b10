"""A feature store in the report: what it holds (images, layers, variants and their techniques, model,
timesteps, size, failures) and the comparison grid of `difffeat viz` (input | one PCA column per variant)."""

from __future__ import annotations

import json
from pathlib import Path

from difffeat.errors import UserError
from difffeat.report.page import Section, esc, img, note, table

STORE_FORMAT = "difffeat-store/1"


def is_store(path: Path) -> bool:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == STORE_FORMAT


def render_store(path: Path, anchor: str, shown_as: str, n_images: int = 8) -> Section:
    """The section of one feature store: a summary table and the comparison grid of `n_images` images."""
    from difffeat.report.viz import comparison_grid, render_grid
    from difffeat.store.feature_store import FeatureStore
    from difffeat.utils.progress import human_bytes

    store = FeatureStore(path)
    m = store.manifest
    config = m.get("config") or {}
    shapes, dtypes = store.shapes, store.dtypes
    variants = config.get("variants") or {}
    facts = [("images", f"{len(store)}"),
             ("model", f"<code>{esc(m.get('model', '?'))}</code>"),
             ("input", f"<code>{esc(config.get('images', '?'))}</code>"),
             ("timesteps", esc(", ".join(map(str, m.get("timesteps") or []))) + ("" if config.get("noise", True)
                                                                                else " (clean: no noise)")),
             ("resolution", esc("×".join(map(str, m.get("resolution") or [])) or "?")),
             ("prompts", esc(config.get("prompt_source", "?"))),
             ("ensemble", esc(config.get("ensemble", "?"))),
             ("size on disk", human_bytes(store.size_on_disk())),
             ("created", esc(m.get("created", "?")))]
    if m.get("techniques"):
        facts.append(("techniques (all variants)", f"<code>{esc(' + '.join(m['techniques']))}</code>"))
    failures = store.failures
    facts.append(("failures", f"{len(failures)}" + (": " + esc("; ".join(f"{f['key']}: {f.get('reason', '')}"
                                                                         for f in failures[:3])) if failures else "")))
    parts = ["<div class='row'><div>" + table(None, [[k, v] for k, v in facts], left=2) + "</div><div>"]
    layer_rows = [[f"<code>{esc(layer)}</code>", esc("×".join(map(str, shape))), esc(dtypes.get(layer, ""))]
                  for layer, shape in shapes.items()]
    parts.append(table(["stored map", "C×h×w", "dtype"], layer_rows))
    if variants:
        parts.append(table(["variant", "techniques"],
                           [[f"<b>{esc(name)}</b>", f"<code>{esc(' + '.join(specs) or '(none: plain)')}</code>"]
                            for name, specs in variants.items()]))
    parts.append("</div></div>")
    if len(store):
        try:
            grid = comparison_grid(store, n=n_images)
            parts.append("<h3>Inputs and features</h3>" + note(
                "Each row an image: the input as the extraction saw it, then one PCA picture per variant, layer and "
                "timestep. One PCA basis per layer over all of them, so colours compare: a variant whose tiles follow "
                "the input's shapes more closely has less content shift."))
            parts.append(img(render_grid(grid), "inputs beside the PCA of their features", cls="fig"))
        except UserError as e:
            parts.append(note(f"No comparison grid: {e}", "warn"))
    else:
        parts.append(note("The store holds no images yet.", "warn"))
    overview = (f"{len(store)} images; {len(shapes)} stored maps"
                + (f"; variants {', '.join(variants)}" if variants else ""))
    return Section("store", f"Feature store · {shown_as}", anchor, "\n".join(parts), overview)
