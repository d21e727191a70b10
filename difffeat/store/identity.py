"""Which features a feature store holds, as a run trained on it records them: the store's identity.

A head learns the features of one extraction; another model, timestep or technique gives other numbers for the same
images, and a head run on them scores nonsense without a word. So a run records the identity of every store it trained
on, and what reads the run checks it (`--resume`, `eval-seg` / `eval-cls`, `difffeat report`):

- ``features_hash``: the hash of the store's *feature-defining* config: everything the manifest's config holds but
  where its images came from (`SOURCE_FIELDS`: the image folder or data set and split, the captions table, the output
  folder) and how they were shared among jobs. A val store beside the train store, extracted the same way, has the
  train store's hash; a store of another model, timestep, seed, prompt setting or technique has another.
- ``shards_digest``: sha256 over the checksums the shards carry in their headers
  (`difffeat.store.feature_store.shard_digest`), sorted, so the same shards give the same digest whatever their file
  names (a merge renames them). A store re-extracted, resumed with more images or edited has another. Only headers
  are read.

A record without these entries (a run made before stores were pinned) is not compared.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from difffeat.errors import UserError
from difffeat.spine.run import as_json_data, config_hash, differing_fields
from difffeat.store.feature_store import list_shards, read_manifest

# Where a store's images came from and how jobs shared them: not what its features are. `captions_csv` is a table
# of per-image captions, like the images themselves (a split may have its own); how captions become prompts
# (prompt_source, caption_column, label_template, prompt) stays part of the features.
SOURCE_FIELDS = ("images", "data", "captions_csv", "out", "shard_index", "num_shards")


def feature_config(config: Mapping[str, Any]) -> dict:
    """A store config without `SOURCE_FIELDS`: what defines its features."""
    return {k: v for k, v in as_json_data(dict(config)).items() if k not in SOURCE_FIELDS}


def features_hash(config: Mapping[str, Any]) -> str:
    return config_hash(feature_config(config))


def shards_digest(path: str | os.PathLike) -> tuple[str, int]:
    """(sha256 over the sorted shard checksums, number of distinct image keys) of the store at `path`; a shard of an
    older difffeat, which carries no checksum, counts by its name and size."""
    from safetensors import safe_open

    sums, keys = [], set()
    for _, _, file in list_shards(path):
        try:
            with safe_open(str(file), framework="np") as f:
                meta = f.metadata() or {}
            keys.update(json.loads(meta.get("keys", "[]")))
        except Exception as e:  # a damaged file, whatever safetensors raised: name it
            raise UserError(f"{file}: unreadable feature shard ({' '.join(str(e).split())[:200]})") from None
        sums.append(meta.get("sha256") or f"unsummed:{file.name}:{file.stat().st_size}")
    return config_hash(sorted(sums)), len(keys)


def store_identity(path: str | os.PathLike) -> dict:
    """What a run records of a store it trained on: the `IDENTITY_FIELDS` (see the module doc)."""
    features = feature_config(read_manifest(path)["config"])
    digest, images = shards_digest(path)
    return {"features_hash": config_hash(features), "shards_digest": digest, "images": images, "features": features}


def store_record(path: str | os.PathLike, shortcuts: Sequence[str] = ()) -> dict:
    """A run's record of a store: its path as given and resolved, the manifest entries `shortcuts` (model, layers …)
    and its identity."""
    from difffeat.store.feature_store import FeatureStore

    manifest = FeatureStore(path).manifest
    return {"path": str(path), "resolved": str(Path(path).resolve()), **{k: manifest.get(k) for k in shortcuts},
            **store_identity(path)}


def _differ(recorded: Mapping[str, Any], features: Mapping[str, Any]) -> str:
    return ", ".join(differing_fields(recorded.get("features") or {}, features)) or "its config"


def features_differ(recorded: Mapping[str, Any], path: str | os.PathLike) -> str | None:
    """The feature-defining fields in which the store at `path` differs from the store `recorded` (comma-separated),
    or None when its features were extracted the same way (another split of the same data counts as the same)."""
    if "features_hash" not in recorded:
        return None
    features = feature_config(read_manifest(path)["config"])
    return None if config_hash(features) == recorded["features_hash"] else _differ(recorded, features)


def changed_since(recorded: Mapping[str, Any], path: str | os.PathLike) -> str | None:
    """Why the store at `path` is no longer the store `recorded` (other settings, other shards), or None."""
    if "features_hash" not in recorded:
        return None
    now = store_identity(path)
    if now["features_hash"] != recorded["features_hash"]:
        return f"re-extracted with other settings (differs in: {_differ(recorded, now['features'])})"
    if now["shards_digest"] != recorded.get("shards_digest"):
        return (f"re-extracted, resumed or edited (its shards changed; {recorded.get('images', '?')} images then, "
                f"{now['images']} now)")
    return None


def check_unchanged(recorded: Sequence[Mapping[str, Any]] | None, paths: Sequence[str | os.PathLike],
                    run: str | os.PathLike) -> None:
    """For a resumed run: every store it trained on must be the store it recorded, or one line says which changed."""
    for record, path in zip(recorded or [], paths):
        why = changed_since(record, path)
        if why:
            raise UserError(f"{path}: the feature store was {why} since the run in {run} began; resuming would "
                            "train on other features: start a new run (--overwrite, or another --out) or restore the "
                            "store")


def check_same_features(recorded: Sequence[Mapping[str, Any]] | None, paths: Sequence[str | os.PathLike],
                        run: str | os.PathLike) -> None:
    """For an evaluation: every store given must hold features extracted as the run's training stores were."""
    for record, path in zip(recorded or [], paths):
        differ = features_differ(record, path)
        if differ:
            raise UserError(f"{path}: its features were extracted otherwise than those the run in {run} was trained "
                            f"on ({record.get('path')}; differs in: {differ}); a head scores only the features it "
                            "learned: evaluate on a store extracted with the training store's settings (another split "
                            "of the same data is fine)")

