"""`dx questions gen`: an evaluation question set (question JSONL, METHOD.md §4).

From a tree, labels come from the label folders. From records, the label comes from the image
path's label folder (else `binary_label`, else the answer marker) and is cross-checked against
the record's answer marker and `binary_label`; disagreements are reported, not fixed.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from dxcli.base.answer import parse_answer
from dxcli.data.records import load_records
from dxcli.data.tree import LABELS, SPLITS, parse_tree_path, scan_tree
from dxcli.base.errors import DxError, UsageError
from dxcli.base.template import DEFAULT_QUESTION


def _question(question_id: str, image: str, text: str, label: str, domain: str | None) -> dict:
    return {"question_id": question_id, "image": image, "text": text, "label": label,
            "domain": domain}


def _from_tree(root: Path, split: str, domain: str | None) -> list[dict[str, Any]]:
    images, _ = scan_tree(root)
    return [_question(image.rel, image.rel, DEFAULT_QUESTION, image.label, image.domain)
            for image in images
            if image.split == split and (domain is None or image.domain == domain)]


def _from_records(path: Path, split: str, domain: str | None, images_root: Path | None
                  ) -> tuple[list[dict[str, Any]], list[str]]:
    """Records of the split (a record whose path shows no split is kept: the file is taken to
    be that split already), with their label cross-checked."""
    questions, mismatches = [], []
    for record in load_records(path, images_root):
        _, path_split, folder_label = parse_tree_path(record.image)
        if (path_split is not None and path_split != split) or (
                domain is not None and record.domain != domain):
            continue
        marker = parse_answer(record.answer)
        label = folder_label or record.label or marker
        if label is None:
            mismatches.append(f"{record.id}: no label (no label folder, binary_label or answer "
                              "marker); skipped")
            continue
        if marker is None:
            mismatches.append(f"{record.id}: label {label} but the answer has no marker")
        elif marker != label:
            mismatches.append(f"{record.id}: label {label} but the answer says {marker}")
        if record.label is not None and record.label != label:
            mismatches.append(f"{record.id}: label {label} but binary_label says {record.label}")
        questions.append(_question(record.id, record.image, record.question, label, record.domain))
    return questions, mismatches


def _sample(questions: list[dict], n: int | None, seed: int, balanced: bool) -> list[dict]:
    """A seeded sample, returned in question_id order so the output is byte-stable."""
    rng = random.Random(seed)
    pool = sorted(questions, key=lambda q: q["question_id"])
    if balanced:
        by_label = {label: [q for q in pool if q["label"] == label] for label in LABELS}
        per_label = min(len(group) for group in by_label.values())
        if n is not None:
            if n > 2 * per_label:
                raise UsageError(f"--n {n} --balanced needs {(n + 1) // 2} images of each label; the smaller label "
                                 f"has {per_label} (at most --n {2 * per_label}, or leave out --n)")
            per_label = n // 2
        chosen = [q for label in LABELS for q in rng.sample(by_label[label], per_label)]
    else:
        if n is not None and n > len(pool):
            raise UsageError(f"--n {n}: only {len(pool)} images are available (leave out --n for all of them)")
        chosen = pool if n is None else rng.sample(pool, n)
    return sorted(chosen, key=lambda q: q["question_id"])


def generate_questions(source: Path, *, n: int | None, seed: int, balanced: bool,
                       split: str = "test", domain: str | None = None,
                       images_root: Path | None = None) -> tuple[list[dict], list[str]]:
    """(questions, mismatch messages) from a tree folder or a records file (JSON/JSONL).

    Deterministic for a seed. `question_id` is the image's path in the tree (a record's id),
    so the same image keeps the same id whatever the seed or sample size.
    """
    source = Path(source)
    if split not in SPLITS:
        raise UsageError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if n is not None and n < 1:
        raise UsageError(f"--n must be at least 1, got {n}")
    if source.is_dir():
        questions, mismatches = _from_tree(source, split, domain), []
    elif source.is_file():
        questions, mismatches = _from_records(source, split, domain, images_root)
    else:
        raise UsageError(f"{source}: no such tree folder or records file")
    if not questions:
        where = f"split {split!r}" + (f", domain {domain!r}" if domain else "")
        raise DxError(f"{source}: no images for {where}")
    if balanced and len({q["label"] for q in questions}) < 2:
        raise DxError(f"{source}: --balanced needs both real and fake images; found only "
                      f"{questions[0]['label']}")
    return _sample(questions, n, seed, balanced), mismatches


def counts_by_domain(questions: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """{domain: {"real": n, "fake": n}} of a question set."""
    counts: dict[str, dict[str, int]] = {}
    for question in questions:
        per_label = counts.setdefault(str(question["domain"]), {"real": 0, "fake": 0})
        per_label[question["label"]] += 1
    return counts
