"""`dx profiles list|show`."""

from __future__ import annotations

from typing import Annotated

import typer

from dxcli.cli.common import SetOpt, console, print_config

app = typer.Typer(help="Hardware/training profiles (YAML).", no_args_is_help=True)


@app.command("list")
def list_() -> None:
    """List the built-in profiles.

    Example: dx profiles list
    """
    from dxcli import config as cfg

    for name, path in cfg.list_profiles().items():
        first = next((l.lstrip("# ").strip() for l in path.read_text().splitlines() if l.strip()), "")
        console.print(f"[bold]{name}[/]  {first}")


@app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="Profile name or YAML path.")],
    sets: SetOpt = None,
) -> None:
    """Show a profile fully resolved, with where each value comes from.

    Example: dx profiles show cpu-tiny --set train.max_steps=5
    """
    from dxcli import config as cfg

    print_config(cfg.resolve(name, sets or []), console_=console)
