"""`dx detect`: verdict, head probability and reasoning for images."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from dxcli.cli.common import DEFAULT_PROFILE_NAME, ProfileOpt, set_option, console, err_console, resolve_config

SetOpt = set_option("eval.max_new_tokens=256")


def detect(
    ctx: typer.Context,
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders or glob patterns.")],
    model: Annotated[Optional[str], typer.Option("--model", help="dx checkpoint (or run folder); default: the profile's model.path.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per image on stdout.")] = False,
    no_reasoning: Annotated[bool, typer.Option("--no-reasoning", help="Binary head only: no text generation (fast).")] = False,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help="Generation length cap.")] = None,
    server: Annotated[Optional[str], typer.Option("--server", help="Send the images to a running `dx serve` at this URL instead of loading a model.")] = None,
    token: Annotated[Optional[str], typer.Option("--token", envvar="DX_SERVE_TOKEN", help="With --server: the server's bearer token (or DX_SERVE_TOKEN).")] = None,
    profile: ProfileOpt = DEFAULT_PROFILE_NAME,
    sets: SetOpt = None,
) -> None:
    """Is this image real or fake? Prints the verdict, the head's P(fake), the reasoning and the time.

    Example: dx detect photo.jpg more-images/ --model runs/instruct
    Example: dx detect photo.jpg --server http://127.0.0.1:8000   (a running `dx serve` answers)
    """
    from dxcli.base.errors import DxError, UsageError
    from dxcli.evaluation.detections import expand_inputs

    if server is not None:
        given = [flag for flag, value in (("--model", model), ("--set", sets),
                                          ("--profile", profile != DEFAULT_PROFILE_NAME)) if value]
        if given:
            raise UsageError(f"--server: the server's model and settings answer; drop {', '.join(given)}")
        from dxcli.evaluation.detect_client import detect_remote

        paths = expand_inputs(inputs)
        rows = detect_remote(server, paths, token=token, reasoning=not no_reasoning, max_new_tokens=max_new_tokens)
    else:
        # DX_SERVE_TOKEN may be exported for other runs; a --token typed here means a server was meant
        source = ctx.get_parameter_source("token")
        if source is not None and source.name == "COMMANDLINE":
            raise UsageError("--token goes with --server (a local model needs no token)")
        from dxcli.evaluation.detect import detect as run_detect
        from dxcli.evaluation.detect import open_detector

        resolved = resolve_config(profile, sets, {"eval.max_new_tokens": max_new_tokens}, show=False)
        paths = expand_inputs(inputs)
        bundle = open_detector(model, resolved.config, reasoning=not no_reasoning)
        rows = run_detect(bundle, paths, max_new_tokens=resolved.config.eval.max_new_tokens,
                          reasoning=not no_reasoning)
    failed = print_detections(rows, as_json)
    if failed:
        raise DxError(f"{failed} of {len(paths)} image(s) could not be read")


def print_detections(rows, as_json: bool) -> int:
    """Print each row as it comes (JSON lines, or a rule, the figures and the reasoning); returns
    how many failed."""
    from rich.markdown import Markdown

    failed = 0
    for found in rows:
        failed += found.error is not None
        if as_json:
            typer.echo(json.dumps(found.to_json()))
            continue
        if found.error:
            err_console.print(f"[red]{found.path}: cannot read ({found.error})[/]")
            continue
        colour = {"fake": "red", "real": "green"}.get(found.verdict or "", "yellow")
        console.rule(found.path)
        console.print(f"verdict [bold {colour}]{found.verdict or 'no answer'}[/]   head P(fake) "
                      f"{found.head_prob:.3f}   {found.seconds:.2f}s")
        if found.reasoning:
            console.print(Markdown(found.reasoning))
    return failed


def register(app: typer.Typer) -> None:
    app.command("detect")(detect)
