"""Data-set profiles for train-cls: which `ClsTrainConfig` fields a profile of `downstream.profiles` sets.

A profile holds the released hyper-parameters of one data set per method (`downstream/profiles.json`).
`profile_fields(name, method, optim)` turns the sections that concern a run into config values: the
evaluation's (`shots`, `test_agnostic`) always, a method's section for that method (`dirmixe` with its
`test_time_aggregation`, `vs`, `tla_adrw`, `ldam`) and an optimizer's for that optimizer (`imbsam`,
`ssesam`, and `sam_schedule` for both: their scripts' plain momentum and per-epoch cosine). They replace defaults
only: `apply_profile` keeps every value the user gave.

    >>> fields = profile_fields("imagenet-lt", "dirmixe", "none")
    >>> [fields[k] for k in ("dirmixe.tau", "dirmixe.lambda_var", "dirichlet_ratio", "dirichlet_concentration")]
    [1.6, 1.0, 50, 10000.0]
    >>> profile_fields("cifar100-lt", "la", "imbsam")["imbsam_tail_weight"]
    2.0
    >>> {k: v for k, v in profile_fields("cifar100-lt", "la", "ssesam").items() if k in ("lr_schedule", "nesterov")}
    {'lr_schedule': 'epoch-cosine', 'nesterov': False}
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from difffeat.errors import UserError
from downstream.profile_apply import overlay_profile
from downstream.profiles import profile, settings

# section → (when it applies: "always", a method or an optimizer name, or a tuple of them; profile key → field)
SECTIONS: dict[str, tuple[str | tuple[str, ...], dict[str, str]]] = {
    "shots": ("always", {"many_above": "many_above", "few_below": "few_below"}),
    "test_agnostic": ("always", {k: k for k in ("forward_ratios", "backward_ratios", "dirichlet_ratio",
                                                "dirichlet_concentration", "dirichlet_draws")}),
    "dirmixe": ("dirmixe", {"tau": "dirmixe.tau", "lambda_var": "dirmixe.lambda_var", "trials": "dirmixe.trials",
                            "concentration": "dirmixe.concentration"}),
    "test_time_aggregation": ("dirmixe", {"lr": "aggregation.lr", "weight_decay": "aggregation.weight_decay",
                                          "batch_size": "aggregation.batch_size", "epochs": "aggregation.epochs"}),
    "vs": ("vs", {"gamma": "vs_gamma", "tau": "vs_tau"}),
    "tla_adrw": ("tla-adrw", {"gamma": "vs_gamma", "tau": "vs_tau", "stage2_tau": "tla_tau", "nu": "adrw_nu"}),
    "ldam": ("ldam", {"max_margin": "ldam_margin", "scale": "ldam_scale"}),
    "imbsam": ("imbsam", {"rho": "rho", "eta": "tail_eta", "tail_weight": "imbsam_tail_weight"}),
    "ssesam": ("ssesam", {"rho_head": "rho", "rho_tail": "rho_tail", "gamma": "sse_gamma", "eta": "tail_eta"}),
    "sam_schedule": (("imbsam", "ssesam"), {"lr_schedule": "lr_schedule", "nesterov": "nesterov"}),
}


def profile_fields(name: str, method: str, optim: str) -> dict[str, Any]:
    """The config values profile `name` sets for a train-cls run of `method` with `optim` (see the module doc)."""
    chosen = profile(name)
    if chosen.get("task") != "classification":
        raise UserError(f"profile {name!r} is a {chosen.get('task')} profile; train-cls takes a classification "
                        "profile")
    fields: dict[str, Any] = {}
    for section, (when, names) in SECTIONS.items():
        whens = (when,) if isinstance(when, str) else when
        if section not in chosen or ("always" not in whens and not {method, optim} & set(whens)):
            continue
        for key, value in settings(name, section).items():
            if key in names:
                fields[names[key]] = value
    return fields


def apply_profile(values: Mapping[str, Any], name: str, given: Iterable[str] = (),
                  defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`values` (config field → value) with profile `name`'s settings for the fields not in `given` (those the
    user set explicitly win); `defaults` supply method and optim when `values` lacks them. The profile's name
    is kept in ``extra["profile"]`` (the run's config records where its values came from)."""
    defaults = dict(defaults or {})
    method = values.get("method", defaults.get("method"))
    optim = values.get("optim", defaults.get("optim"))
    return overlay_profile(values, profile_fields(name, method, optim), name, given)


def config_from_profile(args):
    """The `ClsTrainConfig` of parsed train-cls arguments with profile ``args.profile`` filling the fields the
    command line did not give (`difffeat.spine.config_cli.given_fields`)."""
    from difffeat.spine.config_cli import config_from_args, given_fields
    from downstream.cls.config import ClsTrainConfig

    given = given_fields(args, ClsTrainConfig)
    values = apply_profile({f: getattr(args, f) for f in given}, args.profile, given,
                           defaults={"method": ClsTrainConfig.method, "optim": ClsTrainConfig.optim})
    return config_from_args(ClsTrainConfig, args, **values)
