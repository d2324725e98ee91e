"""The `dx` entry point. Sub-command modules are light: heavy imports happen inside commands."""

from __future__ import annotations

import os
import sys

import typer

from dxcli import __version__
from dxcli.cli import dataset, demo, detect, profiles, questions, serve, train
from dxcli.cli import eval as eval_group
from dxcli.cli import model as model_group
from dxcli.cli.common import reflow

_state = {"debug": bool(os.environ.get("DX_DEBUG"))}


class _Group(typer.core.TyperGroup):
    """Turns a DxError anywhere below (and a filesystem error the user can fix, such as a read-only
    output folder) into one line and its exit status: 2 usage, 1 failure, 130 interrupted."""

    def invoke(self, ctx):
        from dxcli.base.errors import DxError, Interrupted, user_os_error

        try:
            return super().invoke(ctx)
        except (DxError, OSError) as exc:
            error = exc if isinstance(exc, DxError) else user_os_error(exc)
            if error is None or _state["debug"]:
                raise
            from dxcli.cli.common import err_console

            label = "[bold yellow]stopped:[/]" if isinstance(error, Interrupted) else "[bold red]error:[/]"
            err_console.print(f"{label} {_escape(str(error))}", soft_wrap=True)
            raise typer.Exit(error.exit_code) from None


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

def _version(value: bool) -> None:
    if value:
        typer.echo(f"dx {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show the whole resolved config before a run."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    if verbose:
        os.environ["DX_VERBOSE"] = "1"
    if debug:
        _state["debug"] = True
        os.environ["DX_DEBUG"] = "1"  # inherited by launched workers


# Every command group and top-level command, registered explicitly: a missing module is an
# ImportError at start-up, never a silently absent command. The modules import only typer and
# rich at the top; each command imports its library entry point when it runs.
app.add_typer(profiles.app, name="profiles")
app.add_typer(dataset.app, name="dataset")
app.add_typer(questions.app, name="questions")
app.add_typer(train.app, name="train")
app.add_typer(eval_group.app, name="eval")
app.add_typer(model_group.app, name="model")
detect.register(app)
serve.register(app)
demo.register(app)


def _reflow_help(typer_app: typer.Typer) -> None:
    for command in typer_app.registered_commands:
        command.callback.__doc__ = reflow(command.callback.__doc__)
    for group in typer_app.registered_groups:
        _reflow_help(group.typer_instance)


_reflow_help(app)


def run() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    run()
