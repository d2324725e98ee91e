"""The `dx` entry point. Sub-command modules are light: heavy imports happen inside commands."""

from __future__ import annotations

import importlib
import os
import sys

import typer

from dxcli import __version__

_state = {"debug": bool(os.environ.get("DX_DEBUG"))}


class _Group(typer.core.TyperGroup):
    """Turns a DxError anywhere below into one red line and its exit status (2 usage, 1 failure)."""

    def invoke(self, ctx):
        from dxcli.errors import DxError

        try:
            return super().invoke(ctx)
        except DxError as exc:
            if _state["debug"]:
                raise
            from dxcli.cli.common import err_console

            err_console.print(f"[bold red]error:[/] {_escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


app = typer.Typer(
    cls=_Group,
    name="dx",
    help="dx: vision-language deepfake detection (DX-LLaVA + PRPO).\n\n"
    "Example: dx dataset demo demo-data && dx dataset check demo-data",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    add_completion=False,
)

# group name -> module holding a `app` Typer (or `register(app)` for top-level commands)
GROUPS = {
    "profiles": "dxcli.cli.profiles",
    "dataset": "dxcli.cli.dataset",
    "questions": "dxcli.cli.questions",
    "train": "dxcli.cli.train",
    "eval": "dxcli.cli.eval",
}
TOP_LEVEL = ["dxcli.cli.detect", "dxcli.cli.demo"]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dx {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    if debug:
        _state["debug"] = True
        os.environ["DX_DEBUG"] = "1"  # inherited by launched workers


def _register() -> None:
    for name, module_name in GROUPS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # group not built yet
            raise
        app.add_typer(module.app, name=name)
    for module_name in TOP_LEVEL:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        module.register(app)


_register()


def run() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    run()
