"""GATE: ranks candidate techniques by how well they suppress content shift (reconstruct, score, rank, report).

Filled by the GATE issue; the package exists so the distribution's layout is fixed from the start.
"""
