"""`dx dataset split`: a pool into a split tree, and a split tree into conversation records.

(a) `split_pool`: `POOL/<domain>/<label>/*` -> `OUT/<domain>/<split>/<label>/*`, stratified by
    domain and label, deterministic for a seed. Files are copied or hard-linked, never moved.
    Content-identical files are one unit: the first (by path) is kept, the copies are skipped
    (reported), so no content lands in two splits and the result passes `dx dataset check`.
(b) `write_records`: OUT/train.json, val.json, test.json (JSON arrays of METHOD.md §4
    records) from a tree and optional reasoning; `holdout` gives leave-one-domain-out records.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import random
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dxcli.base.errors import DxError, UsageError
from dxcli.data.records import (REASONING_FILE, default_reasoning, load_reasoning, records_from_images,
                                save_records, tree_key)
from dxcli.data.tree import LABELS, SPLITS, is_image_name, scan_tree

Progress = Callable[[int, int], None]
DEFAULT_RATIOS = (0.8, 0.1, 0.1)


def parse_ratios(text: str | Sequence[float]) -> tuple[float, float, float]:
    """'0.8,0.1,0.1' (or three numbers) -> train/val/test fractions, each >= 0, summing to 1."""
    try:
        values = [float(v) for v in (text.split(",") if isinstance(text, str) else text)]
    except ValueError:
        raise UsageError(f"--ratios expects three numbers like 0.8,0.1,0.1, got {text!r}") from None
    if len(values) != 3 or any(not math.isfinite(v) or v < 0 for v in values):
        raise UsageError(f"--ratios expects three non-negative numbers (train,val,test), got {text!r}")
    if abs(sum(values) - 1.0) > 1e-6:
        raise UsageError(f"--ratios must sum to 1, got {text!r} (sum {sum(values):g})")
    return values[0], values[1], values[2]


def _scan_pool(pool: Path) -> list[tuple[str, str, str]]:
    """(domain, label, rel) for every image of the pool, sorted; bad folders are an error."""
    if not pool.is_dir():
        raise UsageError(f"{pool}: not a directory")
    items, unexpected = [], []
    for domain in sorted(pool.iterdir()):
        if domain.name.startswith(".") or not domain.is_dir():
            continue
        for label in sorted(domain.iterdir()):
            if label.name.startswith("."):
                continue
            if not label.is_dir() or label.name not in LABELS:
                unexpected.append(f"{domain.name}/{label.name}")
                continue
            for file in sorted(label.iterdir()):
                if file.is_file() and not file.name.startswith(".") and is_image_name(file.name):
                    items.append((domain.name, label.name, f"{domain.name}/{label.name}/{file.name}"))
    if unexpected:
        hint = " (this looks like a split tree: use --records)" if any(
            u.split("/")[1] in SPLITS for u in unexpected) else ""
        raise DxError(f"{pool}: expected POOL/<domain>/<real|fake>/<image>; unexpected: "
                      f"{', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}{hint}")
    if not items:
        raise DxError(f"{pool}: no images found under POOL/<domain>/<real|fake>/")
    return items


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise DxError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return digest.hexdigest()


def _inside(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b)


def _prepare_out(pool: Path, out: Path, force: bool) -> None:
    """Refuse overlapping folders and a non-empty OUT without `force`; with `force`, clear only
    the domain folders of an earlier split tree (anything else in OUT stops the command)."""
    pool_r, out_r = pool.resolve(), out.resolve()
    if _inside(out_r, pool_r) or _inside(pool_r, out_r):
        raise UsageError(f"--out {out} overlaps the pool {pool}; choose a separate folder")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    entries = [e for e in out.iterdir() if not e.name.startswith(".")] if out.exists() else []
    if not entries:
        return
    if not force:
        raise UsageError(f"--out {out} exists and is not empty; pass --force to replace it")
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink() and all(
                child.name in SPLITS and child.is_dir() for child in entry.iterdir()
                if not child.name.startswith(".")):
            continue
        if entry.is_file():
            continue  # top-level files (records, notes) are left alone
        raise UsageError(f"--force: {entry} does not look like part of a split tree; "
                         "refusing to delete it (choose an empty --out)")
    for entry in entries:
        if entry.is_dir():
            shutil.rmtree(entry)


def _assign(units: list[str], ratios: tuple[float, float, float], rng: random.Random) -> dict[str, str]:
    """rel -> split for one stratum: shuffle, then cut at the rounded cumulative ratios."""
    order = sorted(units)
    rng.shuffle(order)
    n = len(order)
    cut_train = math.floor(n * ratios[0] + 0.5)
    cut_val = math.floor(n * (ratios[0] + ratios[1]) + 0.5)
    return {rel: "train" if i < cut_train else "val" if i < cut_val else "test"
            for i, rel in enumerate(order)}


def _place(source: Path, dest: Path, link: bool) -> None:
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if link:
            os.link(source, dest)
        else:
            shutil.copy2(source, dest)
    except OSError as exc:
        if link and exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise DxError(f"--link: cannot hard-link {source} -> {dest} ({exc.strerror}); "
                          "OUT must be on the same filesystem, or copy without --link") from None
        raise DxError(f"cannot write {dest} ({exc.strerror or exc})") from None


def split_pool(pool: Path, out: Path, ratios: Sequence[float] | str = DEFAULT_RATIOS,
               seed: int = 0, link: bool = False, force: bool = False,
               progress: Progress | None = None) -> dict[str, Any]:
    """Split POOL into the OUT tree. `progress(done, total)` counts hashing then placing."""
    pool, out = Path(pool), Path(out)
    ratios = parse_ratios(ratios)
    items = _scan_pool(pool)
    _prepare_out(pool, out, force)
    total = 2 * len(items)
    first_with: dict[str, str] = {}
    duplicates: list[dict[str, str]] = []
    strata: dict[tuple[str, str], list[str]] = {}
    for done, (domain, label, rel) in enumerate(items, start=1):
        digest = _sha256(pool / rel)
        if digest in first_with:
            duplicates.append({"path": rel, "same_as": first_with[digest]})
        else:
            first_with[digest] = rel
            strata.setdefault((domain, label), []).append(rel)
        if progress:
            progress(done, total)
    split_of: dict[str, str] = {}
    for (domain, label), units in strata.items():
        split_of.update(_assign(units, ratios, random.Random(f"{seed}/{domain}/{label}")))
    counts: dict[str, dict[str, dict[str, int]]] = {}
    out.mkdir(parents=True, exist_ok=True)
    for done, (domain, label, rel) in enumerate(items, start=len(items) + 1):
        split = split_of.get(rel)
        if split is not None:
            _place(pool / rel, out / domain / split / label / Path(rel).name, link)
            domain_counts = counts.setdefault(domain, {s: dict.fromkeys(LABELS, 0) for s in SPLITS})
            domain_counts[split][label] += 1
        if progress:
            progress(done, total)
    return {"out": str(out), "mode": "link" if link else "copy", "seed": seed,
            "ratios": list(ratios), "images": len(split_of), "counts": counts,
            "duplicates_skipped": duplicates}


def record_paths(out: Path) -> dict[str, Path]:
    return {split: Path(out) / f"{split}.json" for split in SPLITS}


def records_from_tree_files(tree: Path, out: Path, reasoning_file: Path | None, holdout: str | None = None,
                            force: bool = False) -> dict[str, Any]:
    """`dx dataset split --records`: `write_records` with the reasoning of `reasoning_file`, or of
    TREE/reasoning.jsonl when there is one; the summary says which (`reasoning`: path or None)."""
    if reasoning_file is not None:
        annotations, source = load_reasoning(reasoning_file), str(reasoning_file)
    else:
        annotations = default_reasoning(tree)
        source = str(Path(tree) / REASONING_FILE) if annotations is not None else None
    summary = write_records(tree, out, annotations, holdout=holdout, force=force)
    summary["reasoning"] = source
    return summary


def write_records(tree: Path, out: Path, reasoning: dict[str, str] | None,
                  holdout: str | None = None, force: bool = False) -> dict[str, Any]:
    """Write OUT/{train,val,test}.json from the tree. With `holdout`, train/val come from the
    other domains and test from the held-out domain's test split (leave-one-domain-out)."""
    tree, out = Path(tree), Path(out)
    images, _ = scan_tree(tree)
    if not images:
        raise DxError(f"{tree}: no images found under <domain>/<split>/<label>/")
    if _inside(out.resolve(), tree.resolve()):
        raise UsageError(f"--out {out} is inside the image tree {tree}; commands never write there")
    domains = sorted({image.domain for image in images})
    if holdout is not None and holdout not in domains:
        raise UsageError(f"--holdout {holdout!r}: no such domain; the tree has {', '.join(domains)}")
    paths = record_paths(out)
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not force:
        raise UsageError(f"{', '.join(existing)} already exist; pass --force to overwrite")
    reasoning = reasoning or {}
    files: dict[str, dict[str, Any]] = {}
    for split, path in paths.items():
        chosen = domains if holdout is None else (
            [holdout] if split == "test" else [d for d in domains if d != holdout])
        records = records_from_images(images, (split,), chosen, reasoning, root=tree)
        annotated = {tree_key(r.image) for r in records} & reasoning.keys()
        save_records(path, records)
        files[split] = {"path": str(path), "records": len(records), "domains": chosen,
                        "real": sum(r.binary_label == 0 for r in records),
                        "fake": sum(r.binary_label == 1 for r in records),
                        "with_reasoning": len(annotated)}
    return {"out": str(out), "holdout": holdout, "files": files,
            "reasoning_unmatched": len(reasoning.keys() - {tree_key(i.rel) for i in images})}
