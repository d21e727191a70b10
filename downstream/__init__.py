"""Heads trained on stored features: data, heads, losses, optimizers, metrics, training.

Depends only on `difffeat.store.feature_store` and plain arrays. Filled by the segmentation and classification issues.
"""
