"""The HTTP face of the engine: the page, `/v1/detect`, the OpenAI routes and `/health`.

Handlers read and check the request, decode the image in a worker thread (Pillow off the event
loop), and wait on the engine's future; every refusal is one JSON error in OpenAI's shape
(`{"error": {"message", "type", "param", "code"}}`), and the server goes on serving.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from contextlib import asynccontextmanager
from html import escape
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from dxcli.base.answer import parse_answer
from dxcli.base.template import DEFAULT_QUESTION
from dxcli.evaluation.detections import Detection
from dxcli.rl.paragraphs import split_paragraphs
from dxcli.server.engine import Answer, Busy, Engine, Sampling
from dxcli.server.inputs import BadRequest, decode_image, image_field_bytes
from dxcli.server.limits import UploadLimit, error_payload
from dxcli.server.openai_api import ChatRequest, completion, models_list, read_request
from dxcli.server.options import ServeOptions

# a browser may run the page's own inline script and show the picked image, and load nothing else
PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src blob:; "
               "connect-src 'self'; form-action 'none'; base-uri 'none'")


class Service:
    def __init__(self, engine: Engine, options: ServeOptions, model_id: str, device: str) -> None:
        self.engine, self.options, self.model_id, self.device = engine, options, model_id, device
        self.created = int(time.time())
        html = resources.files("dxcli.server").joinpath("page.html").read_text(encoding="utf-8")
        self.html = (html.replace("__DX_MODEL__", escape(model_id))
                     .replace("__DX_TOKEN_REQUIRED__", "true" if options.token else "false")
                     .replace("__DX_MAX_UPLOAD_MB__", f"{options.max_upload_mb:g}"))

    def authorize(self, request: Request) -> None:
        """Every API call carries the bearer token when the server has one (the page and /health
        do not: they hold nothing)."""
        if self.options.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.options.token.encode()):
            raise BadRequest("a valid 'Authorization: Bearer TOKEN' header is required", status=401,
                             code="invalid_api_key")

    def page(self) -> HTMLResponse:
        return HTMLResponse(self.html, headers={"content-security-policy": PAGE_POLICY})

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model_id, "reasoning": self.options.reasoning, "device": self.device,
                "token_required": self.options.token is not None, "batches": self.engine.batches,
                "answered": self.engine.answered, "pending": self.engine.jobs.qsize()}

    def models(self) -> dict[str, Any]:
        return models_list(self.model_id, self.created)

    async def detect(self, request: Request) -> dict[str, Any]:
        started = time.perf_counter()
        data, name, reasoning, max_new_tokens = await self._detect_input(request)
        image = await run_in_threadpool(decode_image, data)
        answer = await self._ask(image, DEFAULT_QUESTION, Sampling(reasoning, max_new_tokens if reasoning else 0))
        text = answer.texts[0] if reasoning else None
        verdict = parse_answer(text) if reasoning else answer.head_verdict
        paragraphs = [p.text for p in split_paragraphs(text) if p.text] if text else []
        row = Detection(name, verdict, answer.head_prob, text, time.perf_counter() - started).to_json()
        return {**row, "paragraphs": paragraphs, "model": self.model_id}

    async def chat(self, request: Request) -> dict[str, Any]:
        if not self.options.reasoning:
            raise BadRequest("this server serves the binary head alone (dx serve --no-reasoning): chat "
                             "completions need the language model", code="no_reasoning")
        body = await _json_body(request)
        try:
            chat = ChatRequest.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise BadRequest(f"{'.'.join(map(str, first['loc'])) or 'body'}: {first['msg']}") from None
        data, question, sampling = read_request(chat, self.model_id, self.options.max_new_tokens)
        image = await run_in_threadpool(decode_image, data)
        return completion(await self._ask(image, question, sampling), self.model_id)

    async def _ask(self, image: Any, question: str, sampling: Sampling) -> Answer:
        try:
            future = self.engine.submit(image, question, sampling)
        except Busy as exc:
            raise BadRequest(f"the server is busy ({exc}): retry shortly", status=503, code="busy") from None
        try:
            return await asyncio.wrap_future(future)
        except Exception as exc:  # noqa: BLE001 - the engine logged the traceback; the client gets one line
            raise BadRequest(f"the model failed on this request's batch ({type(exc).__name__}: {exc})",
                             status=500, kind="server_error") from None

    async def _detect_input(self, request: Request) -> tuple[bytes, str, bool, int]:
        """(image bytes, name, reasoning, max_new_tokens) of a multipart upload or a JSON body."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            async with request.form(max_files=1, max_fields=8) as form:
                upload = form.get("image")
                if not isinstance(upload, UploadFile):
                    raise BadRequest("multipart uploads need the file in the field 'image'", code="missing_image")
                data, name = await upload.read(), upload.filename or "upload"
                fields = {key: form.get(key) for key in ("reasoning", "max_new_tokens")}
        elif kind == "application/json":
            fields = await _json_body(request)
            data, name = image_field_bytes(fields.get("image")), str(fields.get("name") or "upload")
        else:
            raise BadRequest(f"send the image as multipart/form-data (field 'image') or JSON, not '{kind or 'no type'}'",
                             status=415, code="unsupported_media_type")
        return data, name, self._reasoning(fields.get("reasoning")), self._max_new_tokens(fields.get("max_new_tokens"))

    def _reasoning(self, value: Any) -> bool:
        if value in (None, ""):
            return self.options.reasoning
        wanted = {"true": True, "1": True, "false": False, "0": False}.get(str(value).lower())
        if wanted is None:
            raise BadRequest(f"reasoning must be true or false, not {value!r}")
        if wanted and not self.options.reasoning:
            raise BadRequest("this server serves the binary head alone (dx serve --no-reasoning): ask with "
                             "reasoning false", code="no_reasoning")
        return wanted

    def _max_new_tokens(self, value: Any) -> int:
        limit = self.options.max_new_tokens
        if value in (None, ""):
            return limit
        try:
            wanted = int(value)
        except (TypeError, ValueError):
            raise BadRequest(f"max_new_tokens must be an integer, not {value!r}") from None
        if not 1 <= wanted <= limit:
            raise BadRequest(f"max_new_tokens must be 1 to this server's --max-new-tokens {limit}, not {wanted}",
                             code="max_tokens_too_large")
        return wanted


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise BadRequest("the JSON body must be an object")
    return body


def _error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, BadRequest):
        status, message, code, kind = exc.status, exc.message, exc.code, exc.kind
    else:  # Starlette's own: unknown route, wrong method, malformed multipart
        status, message, code, kind = exc.status_code, str(exc.detail), None, "invalid_request_error"
    headers = {"www-authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_payload(message, code, kind), status_code=status, headers=headers)


def create_app(engine: Engine, options: ServeOptions, model_id: str, device: str) -> FastAPI:
    """The ASGI app; its lifespan starts the engine's worker and, once uvicorn has answered every
    request in flight, stops it."""
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        yield
        await run_in_threadpool(engine.stop)

    service = Service(engine, options, model_id, device)
    # no /docs: its page pulls scripts from a CDN, and this server works offline
    app = FastAPI(title="dx serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(UploadLimit, max_bytes=options.max_upload_bytes)
    app.add_exception_handler(BadRequest, _error)
    app.add_exception_handler(StarletteHTTPException, _error)
    guarded = [Depends(service.authorize)]
    app.add_api_route("/", service.page, methods=["GET"], response_class=HTMLResponse)
    app.add_api_route("/health", service.health, methods=["GET"])
    app.add_api_route("/v1/models", service.models, methods=["GET"], dependencies=guarded)
    app.add_api_route("/v1/detect", service.detect, methods=["POST"], dependencies=guarded)
    app.add_api_route("/v1/chat/completions", service.chat, methods=["POST"], dependencies=guarded)
    return app
