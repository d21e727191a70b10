"""GATE: ranks candidate techniques by how well they suppress content shift (reconstruct, score, rank, report).

    import difffeat, gate
    pipe = difffeat.load_pipeline("mini")
    result = gate.rank(pipe, "shapes/test", {"canny": ["controlnet:canny"], "caption": ["prompt:caption"]})
    result.table(), result.accepted, gate.write_report(result, Path("runs/gate"))

`difffeat gate IMAGES --candidates FILE.yaml --out DIR` is the same from the command line (docs/gate.md).
"""

# Names load on first use: `difffeat`'s CLI imports `gate.cli`, which must not pull in torch at start-up.
from difffeat.lazy import lazy_getattr

_LAZY = {
    "rank": "gate.ranking",
    "GateConfig": "gate.ranking",
    "GateResult": "gate.ranking",
    "read_candidates": "gate.candidates",
    "write_report": "gate.report",
    "sweep": "gate.sweeping",
    "SweepConfig": "gate.sweeping",
}

__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = list(_LAZY)
