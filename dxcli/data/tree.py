"""The image tree (METHOD.md §4): `ROOT/<domain>/<split>/<label>/<file>`.

Names are case-sensitive (`Train` or `FAKE` is not a split or label); file extensions are not.
Hidden entries (names starting with '.') are skipped everywhere, and regular files directly in
ROOT (such as `reasoning.jsonl`) are not part of the tree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from dxcli.base.errors import DxError, UsageError
from dxcli.base.images import is_image_name

SPLITS = ("train", "val", "test")
LABELS = ("real", "fake")


@dataclass
class TreeImage:
    rel: str  # posix path relative to ROOT
    domain: str
    split: str
    label: str


@dataclass
class TreeListing:
    """Everything a walk of the tree finds; `scan_tree` returns the first two fields."""

    images: list[TreeImage] = field(default_factory=list)
    unexpected_dirs: list[str] = field(default_factory=list)
    stray_files: list[str] = field(default_factory=list)  # files where only dirs or images belong



def _entries(path: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as exc:
        raise DxError(f"{path}: cannot list the folder ({exc.strerror or exc})") from None


def walk_tree(root: Path) -> TreeListing:
    """Walk the fixed four levels of the tree (symlinks followed: the depth bounds any loop)."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"{root}: not a directory")
    found = TreeListing()
    for domain in _entries(root):
        if not domain.is_dir():
            continue  # top-level files (reasoning.jsonl, README, ...) are not part of the tree
        for split in _entries(Path(domain.path)):
            rel_split = f"{domain.name}/{split.name}"
            if not split.is_dir():
                found.stray_files.append(rel_split)
            elif split.name not in SPLITS:
                found.unexpected_dirs.append(rel_split)
            else:
                _walk_split(Path(split.path), domain.name, split.name, found)
    found.images.sort(key=lambda image: image.rel)
    return found


def _walk_split(path: Path, domain: str, split: str, found: TreeListing) -> None:
    for label in _entries(path):
        rel_label = f"{domain}/{split}/{label.name}"
        if not label.is_dir():
            found.stray_files.append(rel_label)
            continue
        if label.name not in LABELS:
            found.unexpected_dirs.append(rel_label)
            continue
        for entry in _entries(Path(label.path)):
            rel = f"{rel_label}/{entry.name}"
            if entry.is_dir():
                found.unexpected_dirs.append(rel)
            elif is_image_name(entry.name):
                found.images.append(TreeImage(rel, domain, split, label.name))
            else:
                found.stray_files.append(rel)


def scan_tree(root: Path) -> tuple[list[TreeImage], list[str]]:
    """(images sorted by rel, rel paths of directories outside the allowed names)."""
    listing = walk_tree(root)
    return listing.images, listing.unexpected_dirs


def parse_tree_path(rel: str) -> tuple[str | None, str | None, str | None]:
    """(domain, split, label) read from a path like `[prefix/]domain/split/label/file`.

    Each part is None when the path does not show it; a lone label folder still gives the label.
    """
    parts = PurePosixPath(rel.replace("\\", "/")).parts[:-1]
    for i in range(len(parts) - 1, 0, -1):
        if parts[i] in LABELS and parts[i - 1] in SPLITS:
            domain = parts[i - 2] if i >= 2 else None
            return domain, parts[i - 1], parts[i]
    label = next((part for part in reversed(parts) if part in LABELS), None)
    return None, None, label
