"""`serve`: bind, load the model once, then let uvicorn answer until Ctrl-C.

The socket is bound before the model loads (a taken port fails in one line, in a second) but
listens only once uvicorn starts, so a client never reaches a server that cannot answer yet.
On SIGINT or SIGTERM uvicorn stops accepting, answers every request in flight, and only then
does the lifespan stop the model's worker.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Callable

from dxcli.base.errors import DxError, Interrupted
from dxcli.config import DxConfig
from dxcli.evaluation.detect import open_detector
from dxcli.runtime.dist import from_env
from dxcli.server.app import create_app
from dxcli.server.engine import Engine
from dxcli.server.options import ServeOptions, check_binding


def serve(options: ServeOptions, config: DxConfig, say: Callable[[str], None]) -> None:
    """Serve `options.model` until interrupted; `say` gets the line naming the address."""
    import uvicorn

    check_binding(options.host, options.token, options.allow_remote)
    listener = bind(options.host, options.port)
    try:
        model = options.model or config.model.path
        bundle = open_detector(options.model, config, reasoning=options.reasoning)
        engine = Engine(bundle, max_batch=options.max_batch, batch_wait_s=options.batch_wait_ms / 1000,
                        max_pending=options.max_pending)
        device = str(from_env().device)
        model_id = Path(str(model)).resolve().name
        app = create_app(engine, options, model_id, device)
        # timeout_graceful_shutdown None: a request in flight at Ctrl-C is answered however long it takes
        # (a second Ctrl-C forces the exit)
        server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="info", server_header=False,
                                               timeout_graceful_shutdown=None))
        mode = "verdict + reasoning" if options.reasoning else "binary head only"
        say(f"serving {model_id} ({mode}, {device}) at {address(listener)}  (Ctrl-C stops after answering "
            "the requests in flight)")
        server.run(sockets=[listener])
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled, once it has shut down
        raise Interrupted("dx serve: every request in flight was answered") from None
    finally:
        listener.close()


def bind(host: str, port: int) -> socket.socket:
    """A bound TCP socket (not yet listening) for host:port; port 0 picks a free one."""
    try:
        family, kind, proto, _, where = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                           flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise DxError(f"--host {host}: {exc.strerror}") from None
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
    try:
        listener.bind(where)
    except OSError as exc:
        listener.close()
        raise DxError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return listener


def address(listener: socket.socket) -> str:
    host, port = listener.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
