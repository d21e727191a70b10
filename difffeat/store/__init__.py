"""The feature store: sharded safetensors with a manifest (`feature_store`), its identity, export and merge.

`difffeat.store.FeatureStore` and `difffeat.store.FeatureStoreWriter` are the public names (DESIGN.md); they load
their module on first use, so importing the package costs nothing.
"""

from difffeat.lazy import lazy_getattr

__getattr__ = lazy_getattr(__name__, {"FeatureStore": "difffeat.store.feature_store",
                                      "FeatureStoreWriter": "difffeat.store.feature_store"})

__all__ = ["FeatureStore", "FeatureStoreWriter"]
