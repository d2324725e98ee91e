"""`dx detect --server URL`: the same Detection rows, answered by a running `dx serve`.

Standard library only (no torch, no HTTP package): a script checking one image per process pays
for Python and this file, not for a model stack. A few images are in flight at once, so the
server can batch them; rows come back in input order.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dxcli.base.errors import DxError, UsageError
from dxcli.evaluation.detections import Detection

IN_FLIGHT = 4  # images sent at once: enough for the server to batch, few enough to stay polite
TIMEOUT_S = 900  # one answer, queueing included; a long generation on a CPU takes minutes
# refusals about the image itself: that image's row carries the message and the others go on
IMAGE_ERRORS = ("invalid_image", "upload_too_large")


def detect_remote(url: str, paths: list[Path], *, token: str | None, reasoning: bool,
                  max_new_tokens: int | None) -> Iterator[Detection]:
    """One Detection per path, in order; an unreadable or refused image is an error row, a server
    that cannot be reached or refuses the request itself is a DxError."""
    endpoint = detect_endpoint(url)
    fields = {"reasoning": reasoning, **({"max_new_tokens": max_new_tokens} if max_new_tokens else {})}
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        yield from pool.map(lambda path: _detect_one(endpoint, path, fields, token), paths)


def detect_endpoint(url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"--server {url}: give the server's address, e.g. http://127.0.0.1:8000")
    return url.rstrip("/") + "/v1/detect"


def _detect_one(endpoint: str, path: Path, fields: dict, token: str | None) -> Detection:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:  # as the local detector reports it: this row fails, the rest go on
        return Detection(str(path), None, None, None, 0.0, f"{type(exc).__name__}: {exc}")
    body = json.dumps({"image": base64.b64encode(data).decode(), "name": Path(path).name, **fields}).encode()
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(endpoint, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            row = json.load(response)
    except urllib.error.HTTPError as exc:
        message, code = _server_error(exc)
        if code in IMAGE_ERRORS:
            return Detection(str(path), None, None, None, 0.0, message)
        raise DxError(f"{endpoint}: {message}" + _hint(code)) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DxError(f"cannot reach the dx server at {endpoint}: {reason}") from None
    return Detection(str(path), row["verdict"], row["head_prob"], row["reasoning"], row["seconds"])


def _server_error(exc: urllib.error.HTTPError) -> tuple[str, str | None]:
    """(message, code) of an error answer; a body that is not dx's JSON error keeps the status."""
    try:
        error = json.loads(exc.read())["error"]
        return str(error["message"]), error.get("code")
    except (ValueError, KeyError, TypeError):
        return f"HTTP {exc.code} {exc.reason}", None


def _hint(code: str | None) -> str:
    return {"invalid_api_key": " (pass --token or set DX_SERVE_TOKEN)",
            "no_reasoning": " (add --no-reasoning)"}.get(code or "", "")
