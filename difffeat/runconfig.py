"""Run configs as data: read the config a `--config FILE` option names, and pin a run folder to its config.

Every run folder (extraction, training, GATE, recipes) keeps its resolved config as JSON; a run can be
repeated from that file, and a resumed run must not continue under a different config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from difffeat.atomic import write_json_atomic
from difffeat.errors import UserError


def read_saved_config(path: str | os.PathLike) -> dict:
    """The config dict of a saved run file: a run's config.json / manifest.json (its "config" entry) or a bare
    config; one clear error when the file cannot be read."""
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read the run config ({e})") from None
    return saved.get("config", saved) if isinstance(saved, dict) else saved


def pin_run_config(folder: str | os.PathLike, config: dict, name: str = "config.json", what: str = "a run") -> Path:
    """Write `config` to FOLDER/name, or, when a run already lives there, check that it had the same config
    (so resuming never mixes two configs). Returns the file's path."""
    path = Path(folder) / name
    if path.exists() and json.loads(path.read_text()) != config:
        raise UserError(f"{folder}: holds {what} with another config (see {path}); use a new folder")
    write_json_atomic(path, config)
    return path
