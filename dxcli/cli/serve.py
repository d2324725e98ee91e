"""`dx serve`: one warm model behind HTTP (a page, `/v1/detect`, OpenAI-compatible chat)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from dxcli.cli.common import DEFAULT_PROFILE_NAME, ProfileOpt, err_console, resolve_config, set_option

SetOpt = set_option("eval.max_new_tokens=256")


def serve(
    model: Annotated[Optional[str], typer.Option("--model", help="dx checkpoint (or run folder); default: the profile's model.path.")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on; other than loopback it needs --token or --allow-remote.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port (0: a free one, printed at start).")] = 8000,
    token: Annotated[Optional[str], typer.Option("--token", envvar="DX_SERVE_TOKEN", help="Bearer token every API call must carry (or DX_SERVE_TOKEN).")] = None,
    allow_remote: Annotated[bool, typer.Option("--allow-remote", help="Serve a non-local --host without a token, open on purpose.")] = False,
    no_reasoning: Annotated[bool, typer.Option("--no-reasoning", help="Binary head only: no LLM loaded, chat completions refused.")] = False,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help="A request's default and largest generation length (default: eval.max_new_tokens).")] = None,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", help="Largest request body; bigger ones get 413.")] = 20.0,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Most images (times samples) generated together.")] = 16,
    batch_wait_ms: Annotated[float, typer.Option("--batch-wait-ms", help="How long a request waits for others to batch with.")] = 10.0,
    max_pending: Annotated[int, typer.Option("--max-pending", help="Requests queued for the model beyond this get 503 (each holds its decoded image).")] = 64,
    profile: ProfileOpt = DEFAULT_PROFILE_NAME,
    sets: SetOpt = None,
) -> None:
    """Serve a model over HTTP: a page at /, POST /v1/detect, OpenAI-compatible /v1/chat/completions.

    Concurrent requests are batched onto one warm model (on the GPU when there is one). Binds
    127.0.0.1 unless told otherwise; Ctrl-C answers the requests in flight, then stops.

    Example: dx serve --model runs/instruct --port 8000   (then open http://127.0.0.1:8000/)
    """
    # options first: an unsafe --host is refused in one line before anything heavy loads
    from dxcli.server.options import ServeOptions, require_serving_libraries

    require_serving_libraries()
    resolved = resolve_config(profile, sets, {"eval.max_new_tokens": max_new_tokens}, show=False)
    options = ServeOptions(model=model, host=host, port=port, token=token, allow_remote=allow_remote,
                           reasoning=not no_reasoning, max_new_tokens=resolved.config.eval.max_new_tokens,
                           max_upload_mb=max_upload_mb, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
                           max_pending=max_pending)
    from dxcli.server.run import serve as run_server

    run_server(options, resolved.config, say=lambda line: err_console.print(line, soft_wrap=True, markup=False))


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
