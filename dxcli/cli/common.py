"""Shared CLI pieces: option types, config resolution and printing. Parsing and printing only."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any

import typer
from rich.console import Console

from dxcli.config import DEFAULT_PROFILE

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

ProfileOpt = Annotated[
    str,
    typer.Option("--profile", "-p", help="Profile name (see `dx profiles list`) or a YAML path."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key, e.g. --set train.max_steps=20 (repeatable)."),
]
DEFAULT_PROFILE_NAME = DEFAULT_PROFILE  # the one default, from config


def is_tty() -> bool:
    return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


def resolve_config(profile: str, sets: list[str] | None, flags: dict[str, Any] | None = None,
                   show: bool = True):
    """Resolve and (optionally) print the config table; returns `config.Resolved`."""
    from dxcli import config as cfg

    resolved = cfg.resolve(profile, sets or [], flags or {})
    if show:
        print_config(resolved, only_changed=True)
    return resolved


def print_config(resolved, only_changed: bool = False, console_: Console | None = None) -> None:
    from rich.table import Table

    from dxcli import config as cfg

    table = Table(title=f"config (profile: {resolved.profile or 'none'})", title_justify="left")
    table.add_column("key")
    table.add_column("value")
    table.add_column("from", style="dim")
    for key, value in cfg.flat_items(resolved.config):
        source = resolved.sources.get(key, "default")
        if only_changed and source == "default":
            continue
        table.add_row(key, repr(value) if isinstance(value, str) else str(value), source)
    (console_ or err_console).print(table)
