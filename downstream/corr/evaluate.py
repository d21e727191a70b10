"""`difffeat eval-corr`: PCK of stored features on keypoint pairs (SPair-71k's layout), DIFT's protocol by default.

For each pair, every scored source keypoint is carried into the extraction frame through the store's placement of
the source image (`downstream.corr.points`), its descriptor read there, and matched in the target (hard argmax, or
window soft-argmax) on a lattice: each target image's own pixels (DIFT: features resized to the image, bilinear), or
a working grid over the frame (``working_size``); the match is carried back to the target's own pixels and scored
by `downstream.corr.pck` (per point and per image, bbox and image normalisation, per category and overall, 95%
bootstrap intervals over pairs).

Points are left out, and counted, when the annotation marks them invalid (`invalid`), when they lie outside their
image (`outside_image`), or when a centre crop hid the source point from the model (`outside_frame`). A store whose
image is a resized copy of the pair's (another size) is read through the scale between the two, with a note. Pairs
are matched `batch_size` at a time (at the images' own size, those whose targets share a size and placement
together), so memory does not grow with the split.

Writes into its own folder: ``config.json``, ``results.json`` (scores, counts, notes), ``per_pair.csv`` (per pair its
points and correct counts: paired comparisons between runs), ``examples.png`` (example pairs, correct green / wrong
red at the middle α, bbox) and ``report.html`` (the scores and the examples on one page).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from difffeat.data.geometry import Placement
from difffeat.errors import UserError
from difffeat.spine.run import RunFolder
from downstream.corr import points as P
from downstream.corr.config import CorrEvalConfig
from downstream.corr.features import PairFeatures
from downstream.corr.match import match_points
from downstream.corr.pck import NORMALISATIONS, correct_points, pck_table, reference_length

EVAL_FILES = ("results.json", "per_pair.csv", "examples.png", "report.html")
EXCLUSIONS = ("invalid", "outside_image", "outside_frame")


@dataclass
class PreparedPair:
    """A pair ready to match: its scored points' source frame positions and target ground truth (pair pixels)."""

    pair: object
    index: np.ndarray  # [n] the scored points' indices in the pair
    uv: np.ndarray  # [n, 2] source frame positions
    truth: np.ndarray  # [n, 2] target ground truth, target pixels
    source_place: Placement
    target_place: Placement
    excluded: dict[str, int] = field(default_factory=dict)


def _place(features: PairFeatures, key: str, size: tuple[int, int], notes: dict) -> Placement:
    """The store's placement of image `key`, or (a store that records none) the whole image as the frame."""
    place = features.placement(key)
    if place is None:
        notes["no_placement"] = notes.get("no_placement", 0) + 1
        return P.whole_image(size)
    if tuple(place.size) != tuple(size):
        notes["resized"] = notes.get("resized", 0) + 1
    return place


def prepare_pair(pair, source_place: Placement, target_place: Placement) -> PreparedPair:
    """`pair`'s points to score (see the module doc for what is left out) in the frames these placements give."""
    src = np.asarray(pair.source_points, np.float64).reshape(-1, 2)
    tgt = np.asarray(pair.target_points, np.float64).reshape(-1, 2)
    valid = np.asarray(pair.valid, bool).reshape(-1)
    inside = P.in_image(src, pair.source_size) & P.in_image(tgt, pair.target_size)
    stored = P.rescale(np.nan_to_num(src), pair.source_size, source_place.size)
    uv = P.image_to_frame(stored, source_place)
    seen = P.in_frame(uv)
    scored = valid & inside & seen
    excluded = {"invalid": int((~valid).sum()), "outside_image": int((valid & ~inside).sum()),
                "outside_frame": int((valid & inside & ~seen).sum())}
    index = np.flatnonzero(scored)
    return PreparedPair(pair, index, uv[index], tgt[index], source_place, target_place, excluded)


def _target_lattice(prep: PreparedPair) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Frame positions of every pixel of the pair's target image (through a resized copy where the store's differs)
    and which of them the frame covers."""
    h, w = prep.pair.target_size
    xs = P.rescale(np.stack([np.arange(w), np.zeros(w)], 1), (h, w), prep.target_place.size)
    ys = P.rescale(np.stack([np.zeros(h), np.arange(h)], 1), (h, w), prep.target_place.size)
    u = P.image_to_frame(xs, prep.target_place)[:, 0]
    v = P.image_to_frame(ys, prep.target_place)[:, 1]
    covered = torch.from_numpy(((v >= 0) & (v <= 1))[:, None] & ((u >= 0) & (u <= 1))[None, :])
    return (torch.from_numpy(u).float(), torch.from_numpy(v).float()), covered


def match_batch(batch: Sequence[PreparedPair], features: PairFeatures, working_size: Sequence[int] | None,
                soft_argmax: int = 0, temperature: float = 0.02, device: str = "cpu") -> list[np.ndarray]:
    """Matched positions ``[n, 2]`` in each target's own pixels, for pairs prepared by `prepare_pair`. On a working
    grid the pairs are matched together (their maps must share shapes, as one store's do); at the images' own size,
    together the pairs whose targets share size and placement (one lattice)."""
    out: list[np.ndarray] = [np.zeros((0, 2))] * len(batch)
    groups: dict[tuple, list[int]] = {}
    for i, prep in enumerate(batch):
        if len(prep.index):
            key = () if working_size is not None else (tuple(prep.pair.target_size), prep.target_place)
            groups.setdefault(key, []).append(i)
    for group in groups.values():
        n = max(len(batch[i].index) for i in group)
        uv = torch.full((len(group), n, 2), 0.5)
        for row, i in enumerate(group):
            uv[row, : len(batch[i].index)] = torch.from_numpy(batch[i].uv)
        per_key = [[features.maps(batch[i].pair.source) for i in group],
                   [features.maps(batch[i].pair.target) for i in group]]
        source, target = ([torch.stack([maps[m] for maps in side]).to(device) for m in range(len(side[0]))]
                          for side in per_key)
        if working_size is not None:
            size = (int(working_size[0]), int(working_size[1]))
            pos, _ = match_points(source, target, uv.to(device), size, soft_argmax=soft_argmax,
                                  temperature=temperature)
        else:
            lattice, covered = _target_lattice(batch[group[0]])
            pos, _ = match_points(source, target, uv.to(device), tuple(t.to(device) for t in lattice),
                                  soft_argmax=soft_argmax, temperature=temperature, valid=covered.to(device))
        for row, i in enumerate(group):
            prep = batch[i]
            cells = pos[row, : len(prep.index)].cpu().numpy().astype(np.float64)
            if working_size is not None:  # grid cell → frame → the stored image → the pair's image
                at = P.frame_to_image(P.grid_to_frame(cells, size), prep.target_place)
                cells = P.rescale(at, prep.target_place.size, prep.pair.target_size)
            out[i] = cells
    return out


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here")
    return name


def _missing_line(missing: dict[str, list[str]], shown: int = 5) -> str:
    parts = []
    for store, keys in missing.items():
        more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
        parts.append(f"{store}: {len(keys)} of the pairs' images are not in the store ({', '.join(keys[:shown])}"
                     f"{more})")
    return "; ".join(parts) + "; extract them from the same data spec (difffeat extract spair:ROOT:SPLIT)"


def open_pairs(data: str) -> tuple[list, Path | None]:
    """The pairs of a data spec (a layout with `pairs()`, e.g. ``spair:ROOT:SPLIT``) and its root."""
    from difffeat.data.layouts import open_data

    layout = open_data(data)
    if not hasattr(layout, "pairs"):
        raise UserError(f"{data}: layout {layout.name} has no keypoint pairs (use spair:ROOT[:SPLIT])")
    pairs = layout.pairs()
    if not pairs:
        raise UserError(f"{data}: no pairs in this split")
    return pairs, Path(layout.root)


def eval_corr(features: Sequence[str | os.PathLike], data: str | None = None, *, pairs: Sequence | None = None,
              image_root: str | os.PathLike | None = None, progress: bool = True, **options) -> dict:
    """PCK of stored features on keypoint pairs (module doc); writes into `out` and returns results.json's content
    with ``out``. `data` is a data spec with pairs (``spair:ROOT:SPLIT``), or give the `pairs` themselves (objects
    with `PairSample`'s fields; `image_root` then finds their images for the pictures). `options` are
    `CorrEvalConfig`'s."""
    given = {k: v for k, v in options.items() if v is not None}
    config = CorrEvalConfig.from_dict({"features": [str(f) for f in features], "data": data, **given})
    if pairs is None:
        if config.data is None:
            raise UserError("give the pairs: --data spair:ROOT[:SPLIT]")
        pairs, image_root = open_pairs(config.data)
    pairs = list(pairs)
    folder = RunFolder(config.out, "eval-corr", config, overwrite=True, owned=EVAL_FILES)
    feats = PairFeatures(config.features, config.layers, config.variants)
    total = len(pairs)
    if config.max_pairs is not None and total > config.max_pairs:
        chosen = np.sort(np.random.default_rng(config.seed).choice(total, config.max_pairs, replace=False))
        pairs = [pairs[i] for i in chosen]
    missing = feats.missing([k for p in pairs for k in (p.source, p.target)])
    if missing:
        raise UserError(_missing_line(missing))
    device = _device(config.device)
    notes: dict[str, int] = {}
    prepared = []
    for p in pairs:
        src_place = _place(feats, p.source, p.source_size, notes)
        tgt_place = _place(feats, p.target, p.target_size, notes)
        prepared.append(prepare_pair(p, src_place, tgt_place))
    from tqdm.auto import tqdm

    predictions: list[np.ndarray] = []
    step = config.batch_size
    with torch.no_grad():
        for start in tqdm(range(0, len(prepared), step), desc="match", unit="batch", disable=not progress,
                          leave=False):
            predictions += match_batch(prepared[start : start + step], feats, config.working_size,
                                       config.soft_argmax, config.temperature, device)
    table = score_table(prepared, predictions, config.alphas)
    results = summarise(table, prepared, config, notes, feats, total)
    folder.create()
    folder.write_json("results.json", results)
    write_per_pair(folder.file("per_pair.csv"), table)
    if config.examples:
        draw_examples(folder.file("examples.png"), prepared, predictions, table, config, image_root)
    write_report(folder.file("report.html"), results, folder.file("examples.png"))
    return {**results, "out": str(config.out)}


def score_table(prepared: Sequence[PreparedPair], predictions: Sequence[np.ndarray], alphas: Sequence[float]) -> dict:
    """Per pair: points scored, and per normalisation and α the number correct (``correct[norm][α]`` ``[P]``)."""
    n_points = np.array([len(p.index) for p in prepared])
    correct = {norm: {a: np.zeros(len(prepared), int) for a in alphas} for norm in NORMALISATIONS}
    for j, (prep, pred) in enumerate(zip(prepared, predictions)):
        if not len(prep.index):
            continue
        for norm in NORMALISATIONS:
            length = reference_length(norm, prep.pair.target_bbox, prep.pair.target_size)
            for a in alphas:
                correct[norm][a][j] = int(correct_points(pred, prep.truth, a * length).sum())
    return {"keys": [p.pair.key for p in prepared], "categories": [p.pair.category for p in prepared],
            "points": n_points, "correct": correct}


def summarise(table: dict, prepared: Sequence[PreparedPair], config: CorrEvalConfig, notes: dict,
              feats: PairFeatures, total: int) -> dict:
    scores = {norm: {str(a): pck_table(table["correct"][norm][a], table["points"], table["categories"],
                                       config.bootstrap, config.seed)
                     for a in config.alphas} for norm in NORMALISATIONS}
    excluded = {k: int(sum(p.excluded.get(k, 0) for p in prepared)) for k in EXCLUSIONS}
    excluded["pairs_without_points"] = int(sum(1 for p in prepared if not len(p.index)))
    said = []
    if notes.get("resized"):
        said.append(f"{notes['resized']} image(s) of the pairs were stored at another size than the annotation's; "
                    "their points were scaled to the stored size and matches back")
    if notes.get("no_placement"):
        said.append(f"{notes['no_placement']} image(s) have no recorded placement; the whole image was taken as "
                    "the extraction frame")
    main_alpha = _main_alpha(config.alphas)
    headline = {f"pck@{a}_{norm}_{avg}": scores[norm][str(a)]["overall"][avg]
                for norm in NORMALISATIONS for a in config.alphas for avg in ("per_point", "per_image")}
    return {"pairs": len(prepared), "pairs_in_data": total, "points": int(np.sum(table["points"])),
            "excluded": excluded, "notes": said, "main": {"alpha": main_alpha, "norm": "bbox"},
            "summary": headline, "scores": scores,
            "matching": {"layers": feats.names, "lattice": (list(config.working_size) if config.working_size
                                                            else "each target image's own pixels"),
                         "soft_argmax": config.soft_argmax, "temperature": config.temperature},
            "features": list(config.features), "data": config.data}


def _main_alpha(alphas: Sequence[float]) -> float:
    return 0.1 if 0.1 in alphas else sorted(alphas)[len(alphas) // 2]


def write_per_pair(path: Path, table: dict) -> None:
    from difffeat.utils.atomic import atomic_path

    columns = [(norm, a) for norm in NORMALISATIONS for a in table["correct"][NORMALISATIONS[0]]]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["key", "category", "points", *[f"correct@{a}_{norm}" for norm, a in columns]])
    for j, key in enumerate(table["keys"]):
        writer.writerow([key, table["categories"][j], int(table["points"][j]),
                         *[int(table["correct"][norm][a][j]) for norm, a in columns]])
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def read_per_pair(path: str | os.PathLike) -> dict:
    """per_pair.csv back as ``{"keys", "categories", "points" [P], "correct": {column: [P]}}``."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    correct = {c: np.array([int(r[c]) for r in rows]) for c in (rows[0] if rows else {}) if c.startswith("correct@")}
    return {"keys": [r["key"] for r in rows], "categories": [r["category"] for r in rows],
            "points": np.array([int(r["points"]) for r in rows]), "correct": correct}


def _image(root: Path | None, key: str, size: tuple[int, int]):
    from PIL import Image

    from difffeat.data.images import BadImageError, load_image

    if root is not None:
        try:
            return load_image(Path(root) / key)
        except (BadImageError, UserError, OSError):
            pass
    return Image.new("RGB", (int(size[1]), int(size[0])), (96, 96, 96))


def draw_examples(path: Path, prepared: Sequence[PreparedPair], predictions: Sequence[np.ndarray], table: dict,
                  config: CorrEvalConfig, image_root) -> None:
    from downstream.corr.draw import MatchPicture, save_pictures

    usable = [j for j, p in enumerate(prepared) if len(p.index)]
    if not usable:
        return
    rng = np.random.default_rng(config.seed)
    chosen = sorted(rng.choice(usable, min(config.examples, len(usable)), replace=False).tolist())
    alpha = _main_alpha(config.alphas)
    pictures = []
    for j in chosen:
        prep, pred = prepared[j], predictions[j]
        pair = prep.pair
        length = reference_length("bbox", pair.target_bbox, pair.target_size)
        ok = correct_points(pred, prep.truth, alpha * length)
        src = np.asarray(pair.source_points, np.float64)[prep.index]
        pictures.append(MatchPicture(_image(image_root, pair.source, pair.source_size),
                                     _image(image_root, pair.target, pair.target_size), src, pred, ok, prep.truth,
                                     f"{pair.key}  {int(ok.sum())}/{len(ok)} within {alpha}·bbox"))
    save_pictures(pictures, path)


def write_report(path: Path, results: dict, examples: Path) -> None:
    """report.html: the scores (overall and per category) and the example pairs, one self-contained page."""
    from difffeat.report.page import CSP, CSS, esc, img_file, table
    from difffeat.utils.atomic import atomic_path

    def pct(value, low=None, high=None) -> str:
        if value is None or value != value:
            return "–"
        text = f"{100 * value:.1f}"
        if low is not None and low == low:
            text += f" [{100 * low:.1f}, {100 * high:.1f}]"
        return text

    scores = results["scores"]
    rows = []
    for norm in NORMALISATIONS:
        for a, t in scores[norm].items():
            o = t["overall"]
            rows.append([f"PCK@{a} {norm}", pct(o["per_point"], o.get("per_point_low"), o.get("per_point_high")),
                         pct(o["per_image"], o.get("per_image_low"), o.get("per_image_high")),
                         pct(t["category_mean"]["per_point"]), pct(t["category_mean"]["per_image"])])
    main = results["main"]
    per_cat = scores[main["norm"]][str(main["alpha"])]["per_category"]
    cat_rows = [[esc(c), str(s["pairs"]), str(s["points"]), pct(s["per_point"], s.get("per_point_low"),
                                                                   s.get("per_point_high")),
                 pct(s["per_image"], s.get("per_image_low"), s.get("per_image_high"))] for c, s in per_cat.items()]
    ex = results["excluded"]
    m = results["matching"]
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><meta http-equiv='Content-Security-Policy' "
             f"content=\"{CSP}\"><title>eval-corr</title><style>{CSS}</style></head><body>",
             "<h2>Semantic correspondence (eval-corr)</h2>",
             f"<p class='sub'>{results['pairs']} pairs ({results['pairs_in_data']} in the data), {results['points']} "
             f"points scored; left out: {ex['invalid']} invalid, {ex['outside_image']} outside their image, "
             f"{ex['outside_frame']} outside the extraction frame; {ex['pairs_without_points']} pairs without a "
             f"point. Layers: {esc(', '.join(m['layers']))}; lattice: {esc(m['lattice'])}; "
             f"{'soft-argmax window ' + str(m['soft_argmax']) if m['soft_argmax'] else 'hard argmax'}.</p>",
             *[f"<p class='note'>{esc(n)}</p>" for n in results["notes"]],
             "<h3>PCK (%), overall, with 95% bootstrap intervals over pairs</h3>",
             table(["threshold", "per point", "per image", "category mean (point)", "category mean (image)"], rows),
             f"<h3>Per category, PCK@{main['alpha']} bbox (%)</h3>",
             table(["category", "pairs", "points", "per point", "per image"], cat_rows)]
    if examples.is_file():
        parts += [f"<h3>Example pairs (green: within {main['alpha']}·max(w, h) of the target box; red: not; white "
                  "circles: ground truth)</h3>", img_file(examples, "example pairs")]
    parts.append("</body></html>")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(parts))
