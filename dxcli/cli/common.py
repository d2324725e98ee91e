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
def set_option(example: str) -> Any:
    """The repeatable --set option, with an example that fits the command it belongs to."""
    return Annotated[list[str] | None, typer.Option(
        "--set", help=f"Override a config key, e.g. --set {example} (repeatable; `dx profiles show` lists the keys).")]


SetOpt = set_option("train.max_steps=20")
DEFAULT_PROFILE_NAME = DEFAULT_PROFILE  # the one default, from config


def is_tty() -> bool:
    return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


def resolve_config(profile: str, sets: list[str] | None, flags: dict[str, Any] | None = None,
                   show: bool = True):
    """Resolve the config; with `show`, say which one in a line (`dx --verbose`: the whole table
    of values that differ from the code defaults). Returns `config.Resolved`."""
    from dxcli import config as cfg

    resolved = cfg.resolve(profile, sets or [], flags or {})
    if show and os.environ.get("DX_VERBOSE"):
        print_config(resolved, only_changed=True)
    elif show:
        changed = [f"{key}={value}" for key, value in cfg.flat_items(resolved.config)
                   if resolved.sources.get(key) in ("--set", "flag")]
        err_console.print(f"[dim]profile {resolved.profile}" + (f"; {', '.join(changed)}" if changed else "")
                          + " (dx --verbose shows every setting)[/]", highlight=False)
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


def print_memory_plan(plan: Any, profile: str | None, console_: Console | None = None) -> None:
    """A `jobs.memory.MemoryPlan` as a table: rows, then the peak against the GPU's capacity."""
    from rich.table import Table

    out = console_ or console
    table = Table(title=f"memory per GPU: {plan.stage} (profile: {profile or 'none'}, {plan.world} GPU"
                        f"{'s' if plan.world > 1 else ''})", title_justify="left")
    table.add_column("item")
    table.add_column("GiB", justify="right")
    table.add_column("when", style="dim")
    table.add_column("note", style="dim")
    for row in plan.rows:
        table.add_row(row.item, f"{row.gib:.2f}", row.phase, row.note)
    out.print(table)
    phases = " / ".join(f"{name} {gib:.1f}" for name, gib in plan.phase_totals.items() if gib)
    out.print(f"peak = always-resident {plan.total - max(plan.phase_totals.values()):.1f} + the largest "
              f"phase ({phases or 'none'}) GiB; model from {plan.shapes.source}")
    if plan.cpu_gib:
        out.print(f"offloaded to CPU memory: {plan.cpu_gib:.1f} GiB per process")
    if plan.capacity <= 0:
        out.print(f"[bold]total {plan.total:.1f} GiB[/] (capacity unknown: set hardware.gpu_memory_gb)")
        return
    colour = "green" if plan.fits and plan.headroom >= 0.10 else ("yellow" if plan.fits else "red")
    out.print(f"[bold {colour}]total {plan.total:.1f} GiB of {plan.capacity:g} GiB, headroom "
              f"{100 * plan.headroom:.0f}%[/]")


def reflow(doc: str | None) -> str | None:
    """A command's docstring as help text: each paragraph joined into one line, so the terminal
    wraps it evenly at its own width; every `Example:` line stays a paragraph of its own."""
    if not doc:
        return doc
    import inspect

    paragraphs: list[list[str]] = []
    for block in inspect.cleandoc(doc).split("\n\n"):
        current: list[str] = []
        for line in block.splitlines():
            if line.lstrip().startswith("Example") and current:
                paragraphs.append(current)
                current = []
            current.append(line.strip())
        paragraphs.append(current)
    return "\n\n".join(" ".join(lines) for lines in paragraphs if lines)
