"""Conversation records (METHOD.md §4, LLaVA format) and reasoning annotations.

A record file is a JSON array or JSONL of
`{"id", "image", "domain", "conversations": [{"from": "human"}, {"from": "gpt"}], "binary_label"}`.
The original project's `train.json` loads as it is: `domain` and `binary_label` may be missing,
and are then read from the image path (`domain/split/label/file`) or the answer marker.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dxcli.base.answer import label_to_int, parse_answer
from dxcli.base.errors import DxError
from dxcli.base.images import check_relative, safe_image_path
from dxcli.base.jsonio import read_json_or_jsonl
from dxcli.base.template import DEFAULT_QUESTION, split_conversation, user_text
from dxcli.data.tree import LABELS, TreeImage, parse_tree_path, scan_tree

REASONING_FILE = "reasoning.jsonl"  # the optional annotation file inside a tree's ROOT


@dataclass
class Record:
    id: str
    image: str  # relative to the image root
    question: str
    answer: str
    binary_label: int | None  # 1 = fake, 0 = real
    domain: str | None

    @property
    def label(self) -> str | None:
        return None if self.binary_label is None else LABELS[self.binary_label]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "image": self.image,
            "domain": self.domain,
            "conversations": [
                {"from": "human", "value": user_text(self.question)},
                {"from": "gpt", "value": self.answer},
            ],
            "binary_label": self.binary_label,
        }


def with_answer_marker(text: str, label: str) -> str:
    """The text as is when it already concludes; else the text plus `### Answer: label`."""
    if parse_answer(text) is not None:
        return text
    text = text.rstrip()
    return f"{text}\n\n### Answer: {label}" if text else f"### Answer: {label}"


def _binary_label(obj: dict[str, Any], image: str, answer: str, where: str) -> int | None:
    value = obj.get("binary_label")
    if value is not None:
        if isinstance(value, bool) or value not in (0, 1):
            raise DxError(f"{where}: binary_label must be 0 or 1, got {value!r}")
        return int(value)
    _, _, folder_label = parse_tree_path(image)
    label = folder_label or parse_answer(answer)
    return None if label is None else label_to_int(label)


def record_from_json(obj: dict[str, Any], where: str, images_root: Path | None = None) -> Record:
    """One record from its JSON form; `where` (file and position) prefixes every error."""
    image = obj.get("image")
    if not isinstance(image, str) or not image.strip():
        raise DxError(f"{where}: record has no 'image' path")
    name = f"{where} (id {obj.get('id', image)!r})"
    try:
        image = check_relative(image)
        if images_root is not None:
            safe_image_path(images_root, image)
    except DxError as exc:
        raise DxError(f"{name}: {exc}") from None
    conversations = obj.get("conversations")
    if not isinstance(conversations, list) or not all(isinstance(t, dict) for t in conversations):
        raise DxError(f"{name}: 'conversations' must be a list of turns")
    try:
        question, answer = split_conversation(conversations)
    except (ValueError, KeyError) as exc:
        raise DxError(f"{name}: {exc}") from None
    if not isinstance(question, str) or not isinstance(answer, str):
        raise DxError(f"{name}: conversation turns must hold text")
    domain = obj.get("domain") or parse_tree_path(image)[0]
    return Record(id=str(obj.get("id", image)), image=image, question=question, answer=answer,
                  binary_label=_binary_label(obj, image, answer, name), domain=domain)


def load_records(path: Path, images_root: Path | None = None) -> list[Record]:
    """Records from a JSON array or JSONL file. With `images_root`, every image path is checked
    to stay inside it (symlinks included); without, absolute and `..`-climbing paths still fail.
    Errors name the file and the line (JSONL) or the item number (JSON array)."""
    path = Path(path)
    rows = read_json_or_jsonl(path)
    raw = path.read_bytes()
    if raw.lstrip().startswith(b"["):
        places = [f"{path}: record {index + 1}" for index in range(len(rows))]
    else:
        lines = raw.split(b"\n")
        places = [f"{path}:{number}" for number, line in enumerate(lines, start=1) if line.strip()]
    return [record_from_json(obj, where, images_root) for obj, where in zip(rows, places)]


def save_records(path: Path, records: list[Record]) -> None:
    """A JSON array, one record per line: loads like the original train.json, diffs nicely."""
    import json
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = ",\n".join(json.dumps(r.to_json(), ensure_ascii=False) for r in records)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"[\n{body}\n]\n" if records else "[]\n", encoding="utf-8")
    os.replace(tmp, path)


def tree_key(image: str) -> str:
    """The `domain/split/label/file` tail of a path: matches annotations written with a prefix
    (the original files used paths relative to other folders) against a tree's rel paths."""
    parts = image.replace("\\", "/").strip("/").split("/")
    return "/".join(parts[-4:])


def load_reasoning(path: Path) -> dict[str, str]:
    """{image rel path: reasoning text} from JSONL `{"image", "reasoning"}` lines or from
    conversation records (the original train.json: the gpt turn is the reasoning)."""
    path = Path(path)
    reasoning: dict[str, str] = {}
    for index, obj in enumerate(read_json_or_jsonl(path)):
        where = f"{path}: item {index + 1}"
        image = obj.get("image")
        if not isinstance(image, str) or not image.strip():
            raise DxError(f"{where}: no 'image' path")
        if isinstance(obj.get("reasoning"), str):
            text = obj["reasoning"]
        elif isinstance(obj.get("conversations"), list):
            try:
                text = split_conversation(obj["conversations"])[1]
            except (ValueError, KeyError, TypeError) as exc:
                raise DxError(f"{where}: {exc}") from None
        else:
            raise DxError(f"{where}: needs a 'reasoning' text or 'conversations'")
        try:
            reasoning[tree_key(check_relative(image))] = text
        except DxError as exc:
            raise DxError(f"{where}: {exc}") from None
    return reasoning


def default_reasoning(root: Path) -> dict[str, str] | None:
    """ROOT/reasoning.jsonl loaded when it exists (the built-in demo data writes it), else None."""
    path = Path(root) / REASONING_FILE
    return load_reasoning(path) if path.is_file() else None


def records_from_tree(root: Path, splits: tuple[str, ...] | list[str] = ("train",),
                      domains: list[str] | None = None, reasoning: dict[str, str] | None = None,
                      question: str = DEFAULT_QUESTION) -> list[Record]:
    """One record per image of the chosen splits/domains. The answer is the image's reasoning
    (given a marker if it lacks one) or, without reasoning, `### Answer: real|fake`."""
    images, _ = scan_tree(Path(root))
    return records_from_images(images, splits, domains, reasoning, question, root=Path(root))


def records_from_images(images: list[TreeImage], splits: tuple[str, ...] | list[str],
                        domains: list[str] | None = None, reasoning: dict[str, str] | None = None,
                        question: str = DEFAULT_QUESTION, root: Path | None = None) -> list[Record]:
    """`records_from_tree` over an already scanned tree."""
    known = sorted({image.domain for image in images})
    unknown = sorted(set(domains or []) - set(known))
    if unknown:
        raise DxError(f"{root or 'tree'}: no domain {', '.join(unknown)}; "
                      f"the tree has {', '.join(known) or 'none'}")
    records = []
    for image in images:
        if image.split not in splits or (domains is not None and image.domain not in domains):
            continue
        text = (reasoning or {}).get(tree_key(image.rel))
        answer = with_answer_marker(text, image.label) if text else f"### Answer: {image.label}"
        records.append(Record(id=image.rel, image=image.rel, question=question, answer=answer,
                              binary_label=label_to_int(image.label), domain=image.domain))
    return records


def find_bad_images(records: list[Record], images_root: Path, workers: int = 8) -> list[tuple[str, str]]:
    """(image, reason) for every record whose image is missing or cannot be decoded."""
    from PIL import Image

    def problem(record: Record) -> tuple[str, str] | None:
        try:
            path = safe_image_path(images_root, record.image)
        except DxError as exc:
            return record.image, str(exc)
        if not path.is_file():
            return record.image, "missing"
        try:
            with Image.open(path) as img:
                img.load()
        except Exception as exc:  # any decoder failure means the image is unusable
            return record.image, f"unreadable ({type(exc).__name__}: {exc})"
        return None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [p for p in pool.map(problem, records) if p is not None]
