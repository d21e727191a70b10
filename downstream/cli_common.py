"""Command-line pieces shared by train-seg and train-cls."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

from difffeat.errors import UserError
from difffeat.spine.config_cli import config_from_args
from difffeat.spine.run import Config

C = TypeVar("C", bound=Config)


def train_config_of(config_cls: type[C], args: argparse.Namespace,
                    from_profile: Callable[[argparse.Namespace], C]) -> C:
    """The training config parsed arguments ask for: a repeated run's own config (``--config``, written to
    ``--out``), a data set's profile filling the flags not given (``--profile``, via `from_profile`), or the
    flags alone."""
    if args.config:
        if args.profile:
            raise UserError("--profile: a repeated run (--config) keeps its own settings; give one or the other")
        return config_cls.from_run(args.config, out=args.out)
    if args.profile:
        return from_profile(args)
    return config_from_args(config_cls, args)
