"""The parts of `difffeat report`: one module per kind of folder it can show (GATE run, feature store,
segmentation head, classification head) over shared page helpers (`page`).

Each section reads only files on disk (JSON, PNG) and never imports the package that wrote them, so the
core keeps its one-way dependencies while the report still covers the whole chain.
"""
