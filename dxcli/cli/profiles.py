"""`dx profiles list|show`."""

from __future__ import annotations

from typing import Annotated

import typer

from dxcli.cli.common import set_option, console, print_config, print_memory_plan

SetOpt = set_option("prpo.group_size=4")
from dxcli.base.errors import UsageError

app = typer.Typer(help="Hardware/training profiles (YAML).", no_args_is_help=True)


@app.command("list")
def list_() -> None:
    """List the built-in profiles.

    Example: dx profiles list
    """
    from dxcli import config as cfg

    from rich.table import Table

    table = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for name, path in cfg.list_profiles().items():
        first = next((l.lstrip("# ").strip() for l in path.read_text().splitlines() if l.strip()), "")
        table.add_row(name, first.removeprefix(f"{name}:").strip())  # the description, without its own name
    console.print(table)


@app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="Profile name or YAML path.")],
    sets: SetOpt = None,
    memory: Annotated[bool, typer.Option("--memory", help="Show the per-GPU memory plan instead of the keys.")] = False,
    stage: Annotated[str | None, typer.Option("--stage", help="align|instruct|prpo (with --memory; default: all).")] = None,
) -> None:
    """Show a profile fully resolved, with where each value comes from; or its memory plan.

    Example: dx profiles show cpu-tiny --set train.max_steps=5
    Example: dx profiles show h100x2 --memory --stage prpo --set prpo.group_size=8
    """
    from dxcli import config as cfg

    resolved = cfg.resolve(name, sets or [])
    if not memory:
        if stage is not None:
            raise UsageError("--stage goes with --memory")
        print_config(resolved, console_=console)
        return
    from dxcli.jobs.memory import STAGES, plan_memory
    from dxcli.jobs.memory_checkpoint import CHECKPOINT_SHARE_TARGET

    for one in [stage] if stage else STAGES:  # plan_memory rejects an unknown stage
        plan = plan_memory(resolved.config, one)
        print_memory_plan(plan, resolved.profile, console_=console)
        share = plan.checkpoint.share
        colour = "yellow" if share is not None and share > CHECKPOINT_SHARE_TARGET else "dim"
        console.print(f"[{colour}]{plan.checkpoint.describe()}[/]")
