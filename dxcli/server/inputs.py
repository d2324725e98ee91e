"""Images as requests carry them (raw upload bytes, base64, `data:` URIs), decoded or refused.

Every refusal is a `BadRequest`: the handler answers it as a 4xx JSON error and the server goes on.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

from PIL import UnidentifiedImageError

from dxcli.base.errors import DxError
from dxcli.base.images import load_rgb


class BadRequest(Exception):
    """A request the server refuses: HTTP status, OpenAI-style error type and code, one line."""

    def __init__(self, message: str, status: int = 400, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.status, self.code, self.kind = message, status, code, kind


def decode_image(data: bytes) -> Any:
    """The upload as an upright RGB image (dx's one loader), or a BadRequest naming what is wrong:
    empty, not an image, truncated, or too many pixels to be a photo (a decompression bomb)."""
    if not data:
        raise BadRequest("the image is empty", code="invalid_image")
    try:
        return load_rgb(io.BytesIO(data))
    except DxError as exc:  # load_rgb's decompression-bomb refusal; its message names a BytesIO
        detail = str(exc).split(": ", 1)[-1]
        raise BadRequest(f"the image has {detail}", code="invalid_image") from None
    except UnidentifiedImageError:  # its own message names the in-memory buffer, which tells nobody anything
        raise BadRequest("not an image (no format Pillow can read)", code="invalid_image") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for a bad file; all mean "not usable"
        raise BadRequest(f"not a readable image ({type(exc).__name__}: {exc})", code="invalid_image") from None


def base64_bytes(text: str, what: str) -> bytes:
    """Base64 text (a `data:` URI's payload or a bare string) as bytes."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{what} is not valid base64", code="invalid_image") from None


def data_uri_bytes(url: str) -> bytes:
    """The image of a `data:[<type>][;base64],<payload>` URI. Remote URLs are refused: the server
    fetches nothing, so a client can never make it reach another machine."""
    if not isinstance(url, str):
        raise BadRequest("image_url.url must be a string")
    if url.startswith(("http://", "https://", "ftp://", "file:")):
        raise BadRequest("remote image URLs are refused (the server fetches nothing): send the image as a "
                         "data: URI, data:image/png;base64,...", code="remote_url_refused")
    if not url.startswith("data:"):
        raise BadRequest("image_url.url must be a data: URI (data:image/png;base64,...)", code="invalid_image")
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise BadRequest("a data: URI image must be base64 (data:image/png;base64,...)", code="invalid_image")
    return base64_bytes(payload, "the data: URI")


def image_field_bytes(value: Any) -> bytes:
    """`/v1/detect`'s JSON `image`: base64 text or a `data:` URI."""
    if not isinstance(value, str) or not value:
        raise BadRequest("JSON bodies need \"image\": base64 text or a data: URI", code="missing_image")
    if value.startswith(("data:", "http://", "https://", "ftp://", "file:")):
        return data_uri_bytes(value)
    return base64_bytes(value, "\"image\"")
