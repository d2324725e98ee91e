"""`dx dataset check`: decode every image of a tree, hash it, and report what is wrong.

The tree may be in any layout dxcli/data/layouts.py recognises; the report names the layout.

Kinds of problem (errors unless marked):
  corrupt, empty, not_image, too_large (over the decompression-bomb pixel limit),
  unexpected_dir (a folder the layout has no place for: a split/label folder outside the allowed,
  case-sensitive names, or a folder inside a label folder), duplicate (the same bytes twice
  within one split: across domains too, since a leave-one-domain-out run trains on several
  domains at once), leak (the same bytes in two splits, in any domains), no_images (the tree holds no image at all);
  warnings: too_small (short side below min_side), imbalance (one label outnumbers the other by
  more than imbalance_ratio within a domain's split), stray_file (a file where only folders or
  images belong; it is ignored by every command).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dxcli.data.layouts import LABEL_NAMES, Layout
from dxcli.data.tree import LABELS, SPLITS, TreeImage, walk_tree
from dxcli.base.errors import UsageError

ERROR_KINDS = frozenset({"corrupt", "empty", "not_image", "too_large", "unexpected_dir",
                         "duplicate", "leak", "no_images"})
WARNING_KINDS = frozenset({"too_small", "imbalance", "stray_file"})
CHUNK = 64  # images per pool task: large enough to amortise pickling, small for smooth progress
INLINE_BELOW = 2 * CHUNK  # small trees are checked in-process: starting workers costs more


@dataclass
class ImageResult:
    rel: str
    digest: str | None  # sha256 of the bytes; None when the file could not be read
    kind: str | None = None  # a problem kind, or None when the image decoded
    detail: str = ""
    width: int = 0
    height: int = 0


@dataclass
class CheckReport:
    counts: dict[str, dict[str, dict[str, int]]]  # domain -> split -> label -> images
    problems: list[dict[str, str]] = field(default_factory=list)  # path, kind, detail, severity
    images: int = 0
    layout: Layout | None = None  # how the tree was read

    @property
    def errors(self) -> list[dict[str, str]]:
        return [p for p in self.problems if p["severity"] == "error"]

    @property
    def warnings(self) -> list[dict[str, str]]:
        return [p for p in self.problems if p["severity"] == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> dict[str, Any]:
        """{"ok", "counts", "problems"}, plus "layout" when the tree is not in the dx layout (the
        object keeps the shape it always had for dx trees)."""
        found = {
            "ok": self.ok,
            "counts": self.counts,
            "problems": [{"path": p["path"], "kind": p["kind"], "detail": p["detail"]}
                         for p in self.problems],
        }
        if self.layout is not None and self.layout.name != "dx":
            found["layout"] = self.layout.to_json()
        return found


def inspect_image(path: str, rel: str, max_pixels: int) -> ImageResult:
    """Read, hash and fully decode one image (runs in a worker process)."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return ImageResult(rel, None, "corrupt", f"cannot read: {exc.strerror or exc}")
    digest = hashlib.sha256(data).hexdigest()
    if not data:
        return ImageResult(rel, digest, "empty", "zero bytes")
    previous_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                img.load()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        pixels = re.search(r"\d+", str(exc))
        detail = f"{pixels.group() if pixels else 'too many'} pixels, over the limit of {max_pixels}"
        return ImageResult(rel, digest, "too_large", detail)
    except UnidentifiedImageError:
        return ImageResult(rel, digest, "not_image", "not a recognised image format")
    except Exception as exc:  # noqa: BLE001 - any decoder failure means the file is unusable
        return ImageResult(rel, digest, "corrupt", f"{type(exc).__name__}: {exc}")
    finally:
        Image.MAX_IMAGE_PIXELS = previous_limit
    return ImageResult(rel, digest, None, "", width, height)


def _inspect_chunk(items: list[tuple[str, str]], max_pixels: int) -> list[ImageResult]:
    return [inspect_image(path, rel, max_pixels) for path, rel in items]


def _chunks(items: list[tuple[str, str]], size: int) -> Iterator[list[tuple[str, str]]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def inspect_all(root: Path, images: list[TreeImage], max_pixels: int, workers: int = 0,
                progress: Callable[[int, int], None] | None = None) -> list[ImageResult]:
    """Inspect every image, in a process pool over all cores (workers=0) unless the tree is small.

    Chunks are submitted a few at a time per worker, so memory stays flat on huge trees.
    """
    items = [(str(Path(root) / image.rel), image.rel) for image in images]
    total = len(items)
    workers = workers or os.cpu_count() or 1
    results: list[ImageResult] = []
    if progress:
        progress(0, total)
    if workers == 1 or total < INLINE_BELOW:
        for chunk in _chunks(items, CHUNK):
            results += _inspect_chunk(chunk, max_pixels)
            if progress:
                progress(len(results), total)
        return results
    chunks = _chunks(items, CHUNK)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending: set[Future] = set()
        while True:
            while len(pending) < 4 * workers:
                chunk = next(chunks, None)
                if chunk is None:
                    break
                pending.add(pool.submit(_inspect_chunk, chunk, max_pixels))
            if not pending:
                break
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                results += future.result()
            if progress:
                progress(len(results), total)
    results.sort(key=lambda result: result.rel)
    return results


def _problem(path: str, kind: str, detail: str) -> dict[str, str]:
    return {"path": path, "kind": kind, "detail": detail,
            "severity": "error" if kind in ERROR_KINDS else "warning"}


def _count(images: list[TreeImage]) -> dict[str, dict[str, dict[str, int]]]:
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for image in images:
        domain = counts.setdefault(image.domain, {s: dict.fromkeys(LABELS, 0) for s in SPLITS})
        domain[image.split][image.label] += 1
    return counts


def _imbalance(counts: dict[str, dict[str, dict[str, int]]], ratio: float) -> list[dict[str, str]]:
    problems = []
    for domain, splits in counts.items():
        for split, labels in splits.items():
            small, large = sorted(labels.values())
            if large and (small == 0 or large / small > ratio):
                detail = f"real {labels['real']} vs fake {labels['fake']} (limit {ratio:g}x)"
                problems.append(_problem(f"{domain}/{split}", "imbalance", detail))
    return problems


def _same_content(images: list[TreeImage], results: list[ImageResult]) -> list[dict[str, str]]:
    """`duplicate` within a split, `leak` across splits; the first file (train, then val, then
    test; then by path) is the original, every other copy is reported against it."""
    by_rel = {image.rel: image for image in images}
    groups: dict[str, list[TreeImage]] = defaultdict(list)
    for result in results:
        if result.digest and result.kind != "empty":
            groups[result.digest].append(by_rel[result.rel])
    problems = []
    for members in groups.values():
        if len(members) < 2:
            continue
        members.sort(key=lambda image: (SPLITS.index(image.split), image.rel))
        first_in_split: dict[str, TreeImage] = {}
        for image in members:
            if image.split in first_in_split:
                original = first_in_split[image.split]
                labels = "" if original.label == image.label else " (labelled differently!)"
                problems.append(_problem(image.rel, "duplicate",
                                         f"same content as {original.rel}{labels}"))
            else:
                first_in_split[image.split] = image
                if image is not members[0]:
                    problems.append(_problem(image.rel, "leak",
                                             f"same content as {members[0].rel} "
                                             f"({members[0].split} vs {image.split})"))
    return problems


def check_tree(root: Path, *, min_side: int = 32, max_pixels: int = 89_478_485,
               imbalance_ratio: float = 1.5, workers: int = 0,
               progress: Callable[[int, int], None] | None = None) -> CheckReport:
    """Check the image tree (METHOD.md §4) at `root`. `progress(done, total)` is called as images finish."""
    if workers < 0 or min_side < 0 or max_pixels < 1 or imbalance_ratio < 1:
        raise UsageError("dataset check: need workers >= 0, min_side >= 0, max_pixels >= 1 and "
                         f"imbalance_ratio >= 1 (got {workers}, {min_side}, {max_pixels}, "
                         f"{imbalance_ratio})")
    listing = walk_tree(Path(root))
    results = inspect_all(Path(root), listing.images, max_pixels, workers, progress)
    allowed = (f"allowed ({listing.layout.describe()}): split {'|'.join(SPLITS)}, label {LABEL_NAMES}, "
               "images only inside label folders")
    problems = [_problem(rel, "unexpected_dir", allowed) for rel in listing.unexpected_dirs]
    problems += [_problem(rel, "stray_file", "not an image in a label folder; ignored")
                 for rel in listing.stray_files]
    for result in results:
        if result.kind:
            problems.append(_problem(result.rel, result.kind, result.detail))
        elif min(result.width, result.height) < min_side:
            problems.append(_problem(result.rel, "too_small",
                                     f"{result.width}x{result.height} px, minimum side {min_side}"))
    counts = _count(listing.images)
    problems += _imbalance(counts, imbalance_ratio)
    problems += _same_content(listing.images, results)
    if not listing.images:
        problems.append(_problem(".", "no_images", "no images found in the label folders of a "
                                 f"{listing.layout.describe()} tree"))
    problems.sort(key=lambda p: (p["path"], p["kind"]))
    return CheckReport(counts=counts, problems=problems, images=len(listing.images), layout=listing.layout)
