"""The OpenAI chat-completions protocol, as far as one image and one question go: a request read
into (image bytes, question, sampling), and an Answer written back as a `chat.completion`.

dx's model has one conversation shape (METHOD.md §3: a fixed system prompt, one user turn holding
the image and the question), so anything the model cannot honour is refused in one line rather
than dropped: a system or assistant message, several images, streaming, tools, stop strings.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from dxcli.base.template import DEFAULT_QUESTION
from dxcli.server.engine import Answer, Sampling
from dxcli.server.inputs import BadRequest, data_uri_bytes
from dxcli.server.options import MAX_SAMPLES

# fields of the OpenAI schema the model cannot honour: refused when set, never silently ignored
UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "stop", "logprobs", "top_logprobs",
               "logit_bias", "audio", "prediction")


class ChatRequest(BaseModel):
    # the rest of OpenAI's optional fields (user, metadata, store, ...) change nothing here
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    n: int = Field(1, ge=1, le=MAX_SAMPLES)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's defaults: sampled, temperature 1
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stream: bool | None = False


def read_request(request: ChatRequest, model_id: str, max_new_tokens: int) -> tuple[bytes, str, Sampling]:
    """(image bytes, question, sampling) of a chat request, or a BadRequest saying what is refused."""
    if request.model != model_id:
        raise BadRequest(f"The model `{request.model}` does not exist: this server serves `{model_id}`",
                         status=404, code="model_not_found")
    if request.stream:
        raise BadRequest("stream=true is not supported: the answer comes whole", code="unsupported_parameter")
    extra = request.model_extra or {}
    for name in UNSUPPORTED:
        if extra.get(name) not in (None, False, [], {}):
            raise BadRequest(f"'{name}' is not supported by dx's model", code="unsupported_parameter")
    limit = request.max_completion_tokens or request.max_tokens or max_new_tokens
    if limit > max_new_tokens:
        raise BadRequest(f"max_tokens {limit} is over this server's --max-new-tokens {max_new_tokens}",
                         code="max_tokens_too_large")
    image, question = read_messages(request.messages)
    sampling = Sampling(True, limit, request.temperature, request.top_p, request.n, request.seed)
    return image, question, sampling


def read_messages(messages: list[dict[str, Any]]) -> tuple[bytes, str]:
    """One user message holding one image (a `data:` URI) and optional text; no text asks dx's
    default question."""
    roles = [message.get("role") for message in messages]
    if roles != ["user"]:
        raise BadRequest(f"messages must be one user message (got roles {roles}): dx's model has a fixed "
                         "system prompt and answers one turn with one image")
    content = messages[0].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise BadRequest("the user message's content must be a string or a list of parts")
    texts, images = [], []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "image_url":
            image_url = part.get("image_url")
            images.append(image_url.get("url") if isinstance(image_url, dict) else image_url)
        else:
            raise BadRequest(f"content part type {kind!r} is not supported: send 'text' and 'image_url' parts")
    if len(images) != 1:
        raise BadRequest(f"send exactly one image (an image_url part with a data: URI), not {len(images)}",
                         code="missing_image" if not images else None)
    question = "\n".join(text for text in texts if text.strip()).strip()
    return data_uri_bytes(images[0]), question or DEFAULT_QUESTION


def completion(answer: Answer, model_id: str) -> dict[str, Any]:
    """An OpenAI `chat.completion` object; `dx` adds the binary head's P(fake) beside it."""
    choices = [{"index": i, "message": {"role": "assistant", "content": text},
                "finish_reason": "stop" if done else "length", "logprobs": None}
               for i, (text, done) in enumerate(zip(answer.texts, answer.finished))]
    completion_tokens = sum(answer.completion_tokens)
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model_id, "choices": choices,
            "usage": {"prompt_tokens": answer.prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": answer.prompt_tokens + completion_tokens},
            "dx": {"head_prob": answer.head_prob}}


def models_list(model_id: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "dx"}]}
