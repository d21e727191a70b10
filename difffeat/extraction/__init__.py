"""Extraction: the extractor, its hooks and conditioning seam, the extract run, its fast paths and benchmark."""
