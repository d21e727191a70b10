"""Semantic correspondence on diffusion features (DIFT's protocol; GeoAware-SC's soft-argmax): one module per concept.

    config    CorrEvalConfig (eval-corr), MatchConfig (match): the CLI flags come from their fields
    points    image pixels ↔ extraction frame ↔ feature grid, through a store's placement
    match     descriptors, cosine nearest neighbours, window soft-argmax, mutual nearest neighbours
    pck       PCK@α (bbox / img; per point / per image; per category), bootstrap intervals
    features  which stored layers / variants make a descriptor; PairFeatures reads them per image key
    evaluate  eval_corr: pairs → matches → scores, results.json, per_pair.csv, examples.png, report.html
    draw      pictures of matches
    live      match_images: `difffeat match` (features extracted live)
    cli       difffeat eval-corr / match

    from downstream.corr import eval_corr, match_points, pck_table
"""

from difffeat.lazy import lazy_getattr

_LAZY = {
    "CorrEvalConfig": "downstream.corr.config",
    "MatchConfig": "downstream.corr.config",
    "match_points": "downstream.corr.match",
    "mutual_nearest": "downstream.corr.match",
    "sample_descriptors": "downstream.corr.match",
    "lattice_descriptors": "downstream.corr.match",
    "window_soft_argmax": "downstream.corr.match",
    "pck_table": "downstream.corr.pck",
    "pck_per_point": "downstream.corr.pck",
    "pck_per_image": "downstream.corr.pck",
    "bootstrap_interval": "downstream.corr.pck",
    "paired_difference": "downstream.corr.pck",
    "PairFeatures": "downstream.corr.features",
    "choose_layers": "downstream.corr.features",
    "eval_corr": "downstream.corr.evaluate",
    "read_per_pair": "downstream.corr.evaluate",
    "match_images": "downstream.corr.live",
}

__getattr__ = lazy_getattr(__name__, _LAZY)

__all__ = list(_LAZY)
