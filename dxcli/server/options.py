"""What `dx serve` is asked to do, checked when it is built: an unsafe binding never exists.

Light on purpose (standard library and dx's base only): `dx serve` builds it before torch loads,
so a refused host costs the user no model load.
"""

from __future__ import annotations

import importlib.util
import ipaddress
from dataclasses import dataclass

from dxcli.base.errors import DxError, UsageError

MAX_SAMPLES = 16  # a chat request's `n`: one request may not fill a whole batch many times over


@dataclass(frozen=True)
class ServeOptions:
    model: str | None  # checkpoint or run folder; None: the profile's model.path
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None  # bearer token every API call must carry
    allow_remote: bool = False  # a non-local host without a token, on purpose
    reasoning: bool = True  # False: the binary head alone (no LLM weights loaded)
    max_new_tokens: int = 512  # a request's default and its ceiling
    max_upload_mb: float = 20.0
    max_batch: int = 16  # images (times samples) generated together
    batch_wait_ms: float = 10.0  # how long the first request of a batch waits for company
    # requests queued beyond this get 503; each holds its decoded image (up to Pillow's 89 M pixels,
    # 268 MB) until its batch runs, so this bounds the memory a burst of large uploads can take
    max_pending: int = 64

    def __post_init__(self) -> None:
        check_binding(self.host, self.token, self.allow_remote)
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port {self.port}: a port is 0 to 65535")
        for name, value in (("--max-new-tokens", self.max_new_tokens), ("--max-batch", self.max_batch),
                            ("--max-upload-mb", self.max_upload_mb), ("--max-pending", self.max_pending)):
            if value <= 0:
                raise UsageError(f"{name} must be positive, not {value}")
        if self.batch_wait_ms < 0:
            raise UsageError(f"--batch-wait-ms must be 0 or more, not {self.batch_wait_ms}")
        if self.token is not None and not self.token.strip():
            raise UsageError("--token is empty")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


def is_local(host: str) -> bool:
    """Only this machine can reach `host`: `localhost` or a loopback address. Any other name may
    resolve to an outside interface, so it counts as remote."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_binding(host: str, token: str | None, allow_remote: bool) -> None:
    """A host other machines can reach serves the model to them: only with a token, or when the
    user says it is meant to be open."""
    if is_local(host) or token or allow_remote:
        return
    raise UsageError(f"--host {host} is reachable from other machines: add --token SECRET (clients send "
                     "'Authorization: Bearer SECRET') or --allow-remote to serve it open on purpose")


def require_serving_libraries() -> None:
    """The web stack is the `serve` extra: without it, one line saying what to install."""
    missing = [name for module, name in (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("python_multipart", "python-multipart"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise DxError(f"dx serve needs {', '.join(missing)}: pip install \"dxcli[serve]\"")
