"""JSON / JSONL reading and writing with errors that name the file and line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from dxcli.base.errors import DxError, UsageError


def iter_jsonl(path: Path, *, allow_torn_tail: bool = False) -> Iterator[dict[str, Any]]:
    """Yield one object per non-empty line (see `iter_numbered_jsonl`)."""
    for _, obj in iter_numbered_jsonl(path, allow_torn_tail=allow_torn_tail):
        yield obj


def iter_numbered_jsonl(path: Path, *, allow_torn_tail: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) per non-empty line.

    A malformed line is an error naming file and line, except (with `allow_torn_tail`) a last
    line without its newline, which is what a crash mid-write leaves behind.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    with path.open("rb") as fh:
        lines = fh.read().split(b"\n")
    last = len(lines) - 1
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            if allow_torn_tail and number - 1 == last:
                return
            raise DxError(f"{path}:{number}: malformed JSON line ({exc})") from None
        if not isinstance(obj, dict):
            raise DxError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
        yield number, obj


def read_json_or_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSON array of objects or a JSONL file (decided by the first non-blank character)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8", errors="strict")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DxError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
        for index, obj in enumerate(data):
            if not isinstance(obj, dict):
                raise DxError(f"{path}: item {index} is not a JSON object")
        return data
    return list(iter_jsonl(path))


def dumps_line(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=False) + "\n"


def write_jsonl_atomic(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write all rows to a temp file, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(dumps_line(row))
    os.replace(tmp, path)


def truncate_torn_tail(path: Path) -> int:
    """Cut a final line that lacks its newline (a crash mid-append). Returns bytes removed."""
    path = Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1
    with path.open("r+b") as fh:
        fh.truncate(keep)
    return len(data) - keep
