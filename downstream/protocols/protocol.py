"""A protocol: the field's standard evaluation of a backbone, as data (one versioned JSON file per protocol).

A protocol fixes the data set (layout and splits), the models it allows, the extraction (layers, timesteps,
ensemble, prompt, input size and resize), the head and its training, the seeds, how scores are reduced, the
anchors (published numbers with their sources) and, in `differences`, what difffeat does otherwise than the
paper's code and why. Its `smoke` block is the same chain at toy scale on the built-in world.

`Protocol.resolved(model=..., overrides=..., smoke=...)` gives the settings a run uses; any setting may be
overridden (``extract.timesteps=[100]``, ``head.iterations=500``), and a run with an override, or with a model
the protocol does not list, is marked as not the protocol.

    >>> p = load_protocol("ade20k")
    >>> p.task, p.data["layout"], p.extract["timesteps"]
    ('segmentation', 'ade20k', [50])
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from difffeat.errors import UserError

REQUIRED = ("name", "version", "task", "title", "source", "data", "models", "extract", "seeds", "smoke", "anchors")


@dataclass
class Protocol:
    """One protocol's settings (see the module doc); `raw` is the file as written."""

    name: str
    version: int
    task: str
    title: str
    source: str
    data: dict
    models: list[str]
    extract: dict
    seeds: list[int]
    smoke: dict
    anchors: list[dict]
    head: dict = field(default_factory=dict)
    evaluate: dict = field(default_factory=dict)
    match: dict = field(default_factory=dict)
    report: str = ""
    differences: list[str] = field(default_factory=list)
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, data: dict, where: str) -> Protocol:
        missing = [k for k in REQUIRED if k not in data]
        if missing:
            raise UserError(f"{where}: a protocol needs {', '.join(missing)}")
        known = {f for f in cls.__dataclass_fields__ if f != "raw"}
        return cls(**{k: copy.deepcopy(v) for k, v in data.items() if k in known}, raw=copy.deepcopy(data))

    def settings(self) -> dict:
        """The sections a run uses, as one nested dict (what overrides address by dotted names)."""
        return {"model": self.models[0], "data": copy.deepcopy(self.data), "extract": copy.deepcopy(self.extract),
                "head": copy.deepcopy(self.head), "evaluate": copy.deepcopy(self.evaluate),
                "match": copy.deepcopy(self.match), "seeds": list(self.seeds)}

    def resolved(self, model: str | None = None, overrides: dict[str, Any] | None = None,
                 smoke: bool = False) -> tuple[dict, list[str]]:
        """(the settings of a run, the reasons it is not the protocol as published: [] when it is)."""
        settings = self.settings()
        departures = []
        if smoke:
            small = copy.deepcopy(self.smoke)
            settings["model"] = small.pop("model", settings["model"])
            settings["smoke_n"] = small.pop("n", 30)
            for section, values in small.items():
                if isinstance(values, dict):
                    settings.setdefault(section, {}).update(values)
                else:
                    settings[section] = values
            departures.append("smoke: the protocol at toy scale on the built-in world")
        if model is not None and model != settings["model"]:
            if model not in self.models and not smoke:
                raise UserError(f"protocol {self.name} runs {' or '.join(self.models)}, not {model}; to run it anyway "
                                f"(marked as not the protocol): --set model={model}")
            settings["model"] = model
        for key, value in (overrides or {}).items():
            set_dotted(settings, key, value, self.name)
            departures.append(f"{key} = {json.dumps(value)}")
        return settings, departures


def set_dotted(settings: dict, key: str, value: Any, where: str) -> None:
    """``settings["a"]["b"] = value`` for `key` "a.b"; UserError naming the key when its section is unknown."""
    parts = key.split(".")
    node = settings
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            raise UserError(f"protocol {where}: no setting section {part!r} for --set {key} (sections: "
                            f"{', '.join(k for k, v in settings.items() if isinstance(v, dict))})")
        node = node[part]
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--set``: VALUE read as JSON when it parses (numbers, lists), else as text."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {text!r}: expected KEY=VALUE, e.g. head.iterations=500")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def _files() -> dict[str, Any]:
    folder = resources.files("downstream.protocols") / "definitions"
    return {f.name: f for f in folder.iterdir() if f.name.endswith(".json")}


def protocol_names() -> list[str]:
    return sorted(load_protocol_file(f).name for f in _files().values())


def load_protocol_file(file) -> Protocol:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{file}: unreadable protocol ({e})") from None
    return Protocol.from_dict(data, str(file))


def load_protocol(name: str) -> Protocol:
    """The protocol called `name` (``ade20k``, ``ddpm-seg/horse_21`` …); UserError listing the known ones."""
    files = _files()
    file = files.get(name.replace("/", "_") + ".json")
    if file is None:
        raise UserError(f"unknown protocol {name!r}; protocols: {', '.join(protocol_names())}")
    return load_protocol_file(file)
