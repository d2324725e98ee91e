"""`dx dataset reason`: label-conditioned reasoning for a tree's images, written by a teacher model.

The teacher is any OpenAI-compatible chat-completions endpoint (vLLM, SGLang, Ollama, a hosted
API, `dx serve`), reached through the official `openai` client. Each image goes to it as a
`data:` URI with a prompt that tells it the image's label (`reason_prompt.txt`, replaceable).
Every reply is checked against dx's answer format (`reason_check.py`) before it is kept.

Accepted replies are appended to ROOT/reasoning.jsonl (`{"image", "reasoning", "teacher"}`, what
`dx train` reads) as they arrive, one whole line per write(2), so a kill loses only the requests
in flight and a rerun asks only for the images not there yet. Rejected replies go to
ROOT/reasoning-rejected.jsonl with their reason, never into the reasoning file.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dxcli.base.errors import DxError, Interrupted, UsageError
from dxcli.base.jsonio import dumps_line, iter_jsonl, write_jsonl_atomic
from dxcli.data.reason_check import ReplyRules, check_reply, clean_reply, load_prompt, render_prompt
from dxcli.data.records import REASONING_FILE, load_reasoning, tree_key
from dxcli.data.tree import SPLITS, TreeImage, scan_tree

NO_KEY = "EMPTY"  # the client refuses to run keyless; servers started without a key ignore it
SENT_AS_IS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}  # others go as PNG
EXAMPLES = 5  # how many first rejections the summary names


@dataclass(frozen=True)
class Teacher:
    url: str  # base URL, e.g. http://127.0.0.1:8000/v1
    model: str
    api_key_env: str | None = None  # the variable holding the key; None sends no real key
    timeout: float = 120.0  # seconds per request
    retries: int = 3  # the client's own retries, with backoff, after errors and timeouts
    max_tokens: int = 1024
    temperature: float = 0.7


@dataclass(frozen=True)
class ReasonJob:
    root: Path
    out: Path | None = None  # default ROOT/reasoning.jsonl
    splits: tuple[str, ...] = ("train",)
    domains: tuple[str, ...] | None = None
    prompt_file: Path | None = None  # default reason_prompt.txt
    concurrency: int = 4
    reask: int = 1  # more asks for an image whose reply failed the check
    limit: int | None = None  # ask for at most this many images (try a prompt on a few first)
    redo: bool = False  # ask again for images that already have reasoning

    @property
    def out_file(self) -> Path:
        return Path(self.out) if self.out is not None else Path(self.root) / REASONING_FILE

    @property
    def rejected_file(self) -> Path:
        return self.out_file.with_name(f"{self.out_file.stem}-rejected.jsonl")


@dataclass
class ReasonSummary:
    out: str
    rejected_log: str
    images: int = 0  # chosen by split and domain
    already: int = 0  # had reasoning and were not asked again
    asked: int = 0
    accepted: int = 0
    rejected: int = 0  # images left without an accepted reply
    retried: int = 0  # images that needed more than one request
    retries: int = 0  # extra requests: the client's retries after errors/timeouts, and re-asks
    reasons: Counter = field(default_factory=Counter)  # kind of the final rejection -> images
    examples: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "reasons": dict(self.reasons.most_common()), "seconds": round(self.seconds, 1)}


@dataclass
class Outcome:
    image: TreeImage
    text: str | None = None  # the accepted reasoning
    reason: str | None = None  # why the last try failed
    retries: int = 0
    invalid: list[tuple[str, str]] = field(default_factory=list)  # (reason, reply) of each bad reply


def image_data_uri(path: Path) -> str:
    """The image as a `data:` URI: its own bytes in the formats endpoints commonly accept, else
    re-encoded as PNG (many servers refuse BMP, TIFF, GIF ...)."""
    from PIL import Image

    with Image.open(path) as image:
        if image.format in SENT_AS_IS:
            data, mime = Path(path).read_bytes(), SENT_AS_IS[image.format]
        else:
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="PNG")
            data, mime = buffer.getvalue(), "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def chosen_images(root: Path, splits: tuple[str, ...], domains: tuple[str, ...] | None) -> list[TreeImage]:
    images, _ = scan_tree(Path(root))
    known = sorted({image.domain for image in images})
    unknown = sorted(set(domains or ()) - set(known))
    if unknown:
        raise UsageError(f"--domain {', '.join(unknown)}: not in {root} (it has {', '.join(known) or 'none'})")
    chosen = [image for image in images
              if image.split in splits and (domains is None or image.domain in domains)]
    if not chosen:
        where = f" of domain {', '.join(domains)}" if domains else ""
        raise DxError(f"{root}: no images in split {', '.join(splits)}{where}")
    return chosen


def existing_reasoning(path: Path) -> set[str]:
    """Tree keys of the images `path` already holds reasoning for, after making the file safe to
    append to (a JSON array cannot take lines; a last line without its newline gets one)."""
    path = Path(path)
    if not path.is_file():
        return set()
    data = path.read_bytes()
    if data.lstrip().startswith(b"["):
        raise DxError(f"{path} is a JSON array; dx dataset reason appends JSONL lines: "
                      "pass --out for a new file")
    keys = set(load_reasoning(path))  # a malformed line stops here, naming it
    if data and not data.endswith(b"\n"):
        with path.open("ab") as fh:
            fh.write(b"\n")
    return keys


class LineSink:
    """Whole JSON lines appended with one write(2) each on an O_APPEND descriptor: a killed
    process leaves complete lines only. The file is created on the first line."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    def write(self, obj: dict[str, Any]) -> None:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        data = dumps_line(obj).encode("utf-8")
        if os.write(self._fd, data) != len(data):
            raise DxError(f"cannot write {self.path}: short write (is the disk full?)")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def compact(path: Path) -> None:
    """Keep one line per image, the last written (what load_reasoning uses), where the first was."""
    rows = list(iter_jsonl(path))
    latest: dict[str, dict[str, Any]] = {}
    for row in rows:
        latest[tree_key(str(row.get("image")))] = row
    if len(latest) < len(rows):
        write_jsonl_atomic(path, latest.values())


def _validate(job: ReasonJob, teacher: Teacher, rules: ReplyRules) -> None:
    if not Path(job.root).is_dir():
        raise UsageError(f"{job.root}: not a directory")
    bad_splits = sorted(set(job.splits) - set(SPLITS))
    if bad_splits or not job.splits:
        raise UsageError(f"--split {', '.join(bad_splits) or '(none)'}: splits are {', '.join(SPLITS)}")
    if not teacher.url.startswith(("http://", "https://")):
        raise UsageError(f"--teacher {teacher.url}: give the endpoint's base URL, e.g. http://127.0.0.1:8000/v1")
    checks = [(job.concurrency >= 1, "--concurrency must be at least 1"),
              (job.reask >= 0, "--reask must be 0 or more"),
              (teacher.retries >= 0, "--retries must be 0 or more"),
              (teacher.timeout > 0, "--timeout must be positive"),
              (teacher.max_tokens >= 1, "--max-tokens must be at least 1"),
              (job.limit is None or job.limit >= 1, "--limit must be at least 1"),
              (1 <= rules.min_paragraphs <= rules.max_paragraphs,
               "--min-paragraphs must be at least 1 and at most --max-paragraphs")]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def api_key(teacher: Teacher) -> str:
    """The key from the variable --api-key-env names; none by default (a placeholder is sent:
    the client needs one, and a server started without a key ignores it)."""
    if teacher.api_key_env is None:
        return NO_KEY
    key = os.environ.get(teacher.api_key_env, "")
    if not key.strip():
        raise UsageError(f"--api-key-env {teacher.api_key_env}: that environment variable is not set")
    return key.strip()


def reason_tree(job: ReasonJob, teacher: Teacher, rules: ReplyRules = ReplyRules(),
                progress: Callable[[int, int], None] | None = None) -> ReasonSummary:
    """Ask the teacher for reasoning on every chosen image that has none yet; the library entry
    point of `dx dataset reason`. Ctrl-C stops with the accepted replies kept (rerun resumes)."""
    _validate(job, teacher, rules)
    key, prompt = api_key(teacher), load_prompt(job.prompt_file)
    images = chosen_images(job.root, tuple(job.splits), job.domains)
    done = existing_reasoning(job.out_file)  # read with --redo too: it checks the file can take lines
    fresh = images if job.redo else [image for image in images if tree_key(image.rel) not in done]
    todo = fresh[:job.limit]
    summary = ReasonSummary(out=str(job.out_file), rejected_log=str(job.rejected_file), images=len(images),
                            already=len(images) - len(fresh))
    if not todo:
        return summary
    started = time.monotonic()
    sinks = (LineSink(job.out_file), LineSink(job.rejected_file))
    try:
        asyncio.run(_ask_all(job, teacher, rules, prompt, key, todo, summary, sinks, progress))
    except KeyboardInterrupt:
        raise Interrupted(f"{summary.accepted} accepted repl{'y' if summary.accepted == 1 else 'ies'} "
                          f"written to {job.out_file}; run the same command again to continue") from None
    finally:
        for sink in sinks:
            sink.close()
        summary.seconds = time.monotonic() - started
    if job.redo:
        compact(job.out_file)
    return summary


async def _ask_all(job: ReasonJob, teacher: Teacher, rules: ReplyRules, prompt: str, key: str,
                   todo: list[TreeImage], summary: ReasonSummary, sinks: tuple[LineSink, LineSink],
                   progress: Callable[[int, int], None] | None) -> None:
    """`job.concurrency` workers share one iterator of images (one event loop thread: no lock);
    each outcome is written the moment it arrives. A fatal error cancels the other workers."""
    import openai

    client = openai.AsyncOpenAI(base_url=teacher.url, api_key=key, max_retries=teacher.retries,
                                timeout=teacher.timeout)
    pending = iter(todo)

    async def worker() -> None:
        for image in pending:
            outcome = await _reason_one(client, job, teacher, rules, prompt, image)
            _record(outcome, summary, sinks, teacher)
            if progress is not None:
                progress(summary.asked, len(todo))

    async with client:
        await _check_reachable(client, teacher)
        tasks = [asyncio.ensure_future(worker()) for _ in range(min(job.concurrency, len(todo)))]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise


async def _check_reachable(client: Any, teacher: Teacher) -> None:
    """One cheap request first, so a wrong URL or key stops before any image is sent. A server
    without a model list (not every one has it) is fine: the first image's request tells."""
    import openai

    try:
        await client.models.list()
    except openai.APIStatusError as exc:
        if exc.status_code in (401, 403):
            _request_failure(exc, teacher)  # raises the one-line key error
    except openai.APIConnectionError as exc:
        raise DxError(f"cannot reach the teacher at {teacher.url} ({_short(exc)}): is the server running, "
                      "and is the URL its base URL (often ending in /v1)?") from None


async def _reason_one(client: Any, job: ReasonJob, teacher: Teacher, rules: ReplyRules, prompt: str,
                      image: TreeImage) -> Outcome:
    """Ask for one image's reasoning, up to 1 + job.reask times while replies fail the check."""
    import openai

    outcome = Outcome(image)
    try:
        uri = image_data_uri(Path(job.root) / image.rel)
    except Exception as exc:  # any decoder failure: this image cannot be shown to the teacher
        outcome.reason = f"unreadable image: {type(exc).__name__}: {exc}"
        return outcome
    text = render_prompt(prompt, image.label, rules)
    for attempt in range(1 + job.reask):
        outcome.retries += attempt > 0
        try:
            reply, finish_reason, retries = await _ask(client, teacher, uri, text)
        except openai.APIError as exc:
            outcome.retries += _retries_spent(exc, teacher)
            outcome.reason = _request_failure(exc, teacher)
            return outcome
        outcome.retries += retries
        reply = clean_reply(reply)
        outcome.reason = check_reply(reply, image.label, rules, finish_reason)
        if outcome.reason is None:
            outcome.text = reply
            return outcome
        outcome.invalid.append((outcome.reason, reply))
    return outcome


async def _ask(client: Any, teacher: Teacher, uri: str, prompt: str) -> tuple[str | None, str | None, int]:
    """(reply text, finish reason, retries the client took). The image goes first, as in dx's own
    template (`<image>` then the question)."""
    raw = await client.chat.completions.with_raw_response.create(
        model=teacher.model, max_tokens=teacher.max_tokens, temperature=teacher.temperature,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                               {"type": "text", "text": prompt}]}])
    completion = raw.parse()
    if not completion.choices:
        return None, None, raw.retries_taken
    choice = completion.choices[0]
    return choice.message.content, choice.finish_reason, raw.retries_taken


def _retries_spent(exc: Exception, teacher: Teacher) -> int:
    """The client retried timeouts and 408/409/429/5xx answers until its retries ran out."""
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return teacher.retries
    status = getattr(exc, "status_code", None)
    return teacher.retries if status in (408, 409, 429) or (status or 0) >= 500 else 0


def _request_failure(exc: Exception, teacher: Teacher) -> str:
    """The rejection reason of a failed request; a one-line DxError when no other image could
    fare better (a refused key, an unknown model or URL, a server gone)."""
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return f"timeout: no reply within {teacher.timeout:g} s, {teacher.retries + 1} tries"
    if isinstance(exc, openai.APIConnectionError):
        raise DxError(f"lost the teacher at {teacher.url} ({_short(exc)}); "
                      "run the same command again to continue")
    if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
        raise DxError(f"the teacher at {teacher.url} refused the request ({exc.status_code}: {_short(exc)}); "
                      "name the variable holding its key with --api-key-env")
    if isinstance(exc, openai.NotFoundError):
        raise DxError(f"the teacher at {teacher.url} answered 404 for model {teacher.model!r} ({_short(exc)}): "
                      "is that model served there, and is the URL its base URL (often ending in /v1)?")
    if isinstance(exc, openai.BadRequestError) and "max_tokens" in f"{exc.code} {exc.param} {exc.message}":
        # the same for every image: refusing them one by one would only hide it in the summary
        raise DxError(f"the teacher at {teacher.url} refuses --max-tokens {teacher.max_tokens} ({_short(exc)}); "
                      "lower --max-tokens to what it serves")
    if isinstance(exc, openai.APIStatusError):
        return f"error: the teacher answered {exc.status_code} ({_short(exc)})"
    return f"error: {type(exc).__name__} ({_short(exc)})"


def _short(exc: Exception, limit: int = 200) -> str:
    text = " ".join(str(getattr(exc, "message", None) or exc).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _record(outcome: Outcome, summary: ReasonSummary, sinks: tuple[LineSink, LineSink], teacher: Teacher) -> None:
    """Count one image's outcome and write it: the reasoning line, or its bad replies' lines."""
    accepted, rejected = sinks
    image = outcome.image
    for reason, reply in outcome.invalid:
        rejected.write({"image": image.rel, "label": image.label, "teacher": teacher.model,
                        "reason": reason, "reply": reply})
    summary.asked += 1
    summary.retries += outcome.retries
    summary.retried += outcome.retries > 0
    if outcome.text is not None:
        accepted.write({"image": image.rel, "reasoning": outcome.text, "teacher": teacher.model})
        summary.accepted += 1
        return
    if not outcome.invalid:  # a failed request or an unreadable image: logged with no reply
        rejected.write({"image": image.rel, "label": image.label, "teacher": teacher.model,
                        "reason": outcome.reason, "reply": None})
    summary.rejected += 1
    summary.reasons[str(outcome.reason).split(":", 1)[0]] += 1
    if len(summary.examples) < EXAMPLES:
        summary.examples.append({"image": image.rel, "reason": str(outcome.reason)})
