"""`dx dataset split`: a pool into a split tree, and a split tree into conversation records.

(a) `split_pool`: `POOL/<domain>/<label>/*` -> `OUT/<domain>/<split>/<label>/*`, stratified by
    domain and label, deterministic for a seed. Files are copied or hard-linked, never moved.
    Content-identical files are one unit: the first (by path) is kept, the copies are skipped
    (reported), so no content lands in two splits and the result passes `dx dataset check`.
    A tree in another layout (ForenSynths, GenImage, Chameleon, ...; dxcli/data/layouts.py)
    becomes a dx tree of hard links, keeping the splits it is read with unless --ratios re-splits
    one without split folders; folded folders (categories, subsets) prefix the file names.
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
from dxcli.data.tree import LABELS, SPLITS, TreeImage, TreeListing, walk_tree

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


def _read_source(source: Path) -> TreeListing:
    """The images of SOURCE in any recognised layout. Folders outside the layout stop the command
    (a split must not drop images silently); a dx tree already has its splits."""
    listing = walk_tree(source)
    layout = listing.layout
    if layout.name == "dx" and listing.images:
        raise DxError(f"{source}: already a dx tree ({layout.pattern}); to write records from it use --records")
    pool_hint = " (a pool to split is POOL/<domain>/<real|fake>/<image>)" if layout.name in ("dx", "no-split") else ""
    shown = listing.unexpected_dirs
    if shown:
        raise DxError(f"{source}: folders outside the {layout.describe()} layout: {', '.join(shown[:5])}"
                      f"{' ...' if len(shown) > 5 else ''}; move or rename them{pool_hint}")
    if not listing.images:
        raise DxError(f"{source}: no images found in label folders{pool_hint}")
    return listing


def _is_dx_pool(listing: TreeListing) -> bool:
    """`POOL/<domain>/<real|fake>/<image>`: dx's own input to split (copied unless --link, split by ratios)."""
    return listing.layout.name == "no-split" and all(
        not image.folded and image.rel.split("/")[1] in LABELS for image in listing.images)


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


def _place(source: Path, dest: Path, mode: str, link_hint: str) -> None:
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if mode == "link":
            os.link(source, dest)
        else:
            shutil.copy2(source, dest)
    except OSError as exc:
        if mode == "link" and exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise DxError(f"cannot hard-link {source} -> {dest} ({exc.strerror}); {link_hint}") from None
        raise DxError(f"cannot write {dest} ({exc.strerror or exc})") from None


def split_pool(pool: Path, out: Path, ratios: Sequence[float] | str | None = None,
               seed: int = 0, link: bool = False, force: bool = False,
               progress: Progress | None = None, copy: bool = False) -> dict[str, Any]:
    """Split SOURCE into the dx tree OUT. A dx pool is split by `ratios` (default 0.8,0.1,0.1) and
    copied unless `link`. Any other layout is hard-linked unless `copy`, and keeps the splits it is
    read with (its published ones; test without split folders) unless `ratios` re-splits a tree
    without split folders. `progress(done, total)` counts hashing (when splitting) then placing."""
    pool, out = Path(pool), Path(out)
    if link and copy:
        raise UsageError("--link and --copy exclude each other")
    given = parse_ratios(ratios) if ratios is not None else None
    listing = _read_source(pool)
    dx_pool, layout = _is_dx_pool(listing), listing.layout
    if given is not None and layout.split_folders:
        raise UsageError(f"--ratios: {pool} already has split folders ({layout.describe()}); they are kept, "
                         "leave out --ratios")
    assign = dx_pool or given is not None
    mode = "copy" if copy or (dx_pool and not link) else "link"
    _prepare_out(pool, out, force)
    images = listing.images
    total = (2 if assign else 1) * len(images)
    if assign:
        split_of, duplicates = _assign_splits(pool, images, given or DEFAULT_RATIOS, seed, progress, total)
    else:
        split_of, duplicates = {image.rel: image.split for image in images}, []
    link_hint = ("--link: OUT must be on the same filesystem, or copy without --link" if dx_pool else
                 f"put --out on the filesystem of {pool}, or pass --copy; or skip the split: every dx "
                 "command reads the tree in place")
    counts = _place_images(pool, out, images, split_of, mode, link_hint,
                           lambda done: progress(total - len(images) + done, total) if progress else None)
    if progress:  # skipped duplicates are never placed: end the count at its total
        progress(total, total)
    return {"out": str(out), "mode": mode, "seed": seed if assign else None,
            "ratios": list(given or DEFAULT_RATIOS) if assign else None, "images": len(split_of),
            "counts": counts, "duplicates_skipped": duplicates, "layout": layout.to_json(),
            "splits": "assigned" if assign else "kept"}


def _assign_splits(pool: Path, images: list[TreeImage], ratios: Sequence[float], seed: int,
                   progress: Progress | None, total: int) -> tuple[dict[str, str], list[dict[str, str]]]:
    """rel -> split, stratified by (domain, label); content-identical files after the first are skipped."""
    first_with: dict[str, str] = {}
    duplicates: list[dict[str, str]] = []
    strata: dict[tuple[str, str], list[str]] = {}
    for done, image in enumerate(images, start=1):
        digest = _sha256(pool / image.rel)
        if digest in first_with:
            duplicates.append({"path": image.rel, "same_as": first_with[digest]})
        else:
            first_with[digest] = image.rel
            strata.setdefault((image.domain, image.label), []).append(image.rel)
        if progress:
            progress(done, total)
    split_of: dict[str, str] = {}
    for (domain, label), units in strata.items():
        split_of.update(_assign(units, tuple(ratios), random.Random(f"{seed}/{domain}/{label}")))
    return split_of, duplicates


def _place_images(pool: Path, out: Path, images: list[TreeImage], split_of: dict[str, str], mode: str,
                  link_hint: str, placed: Callable[[int], None]) -> dict[str, dict[str, dict[str, int]]]:
    """Place every image at OUT/<domain>/<split>/<label>/<folded_..._name>; counts per domain/split/label."""
    plan: dict[Path, TreeImage] = {}
    for image in images:
        if image.rel not in split_of:
            continue
        dest = out / image.domain / split_of[image.rel] / image.label / "_".join((*image.folded, Path(image.rel).name))
        if dest in plan:  # checked before anything is written
            raise DxError(f"{pool}: {plan[dest].rel} and {image.rel} would both become {dest}; rename one of them")
        plan[dest] = image
    counts: dict[str, dict[str, dict[str, int]]] = {}
    out.mkdir(parents=True, exist_ok=True)
    for done, (dest, image) in enumerate(plan.items(), start=1):
        _place(pool / image.rel, dest, mode, link_hint)
        split = split_of[image.rel]
        counts.setdefault(image.domain, {s: dict.fromkeys(LABELS, 0) for s in SPLITS})[split][image.label] += 1
        placed(done)
    return counts


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
    listing = walk_tree(tree)  # any layout: the records point at the images where they are
    images = listing.images
    if not images:
        raise DxError(f"{tree}: no images found in the label folders of a {listing.layout.describe()} tree")
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
            "reasoning_unmatched": len(reasoning.keys() - {tree_key(i.rel) for i in images}),
            "layout": listing.layout.to_json()}
