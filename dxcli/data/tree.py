"""The image tree (METHOD.md §4): `ROOT/<domain>/<split>/<label>/<file>`, or one of the field's
layouts (ForenSynths, GenImage, Chameleon, trees without split folders; dxcli/data/layouts.py).

Every tree is read through `walk_tree`: it recognises the layout and maps each image to
(rel path, domain, split, label), so every command works on every layout and no image is copied.
Names are case-sensitive (`Train` or `FAKE` is not a split or label); file extensions are not.
Hidden entries (names starting with '.') are skipped everywhere, and regular files directly in
ROOT (such as `reasoning.jsonl`) are not part of the tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from dxcli.base.errors import UsageError
from dxcli.base.images import is_image_name
from dxcli.data.layouts import (LABEL_OF, LABELS, SPLITS, Folder, Layout, Place, check_label_names, detect_layout,
                                is_folder, list_folder, read_folders)

__all__ = ["LABELS", "SPLITS", "TreeImage", "TreeListing", "is_image_name", "parse_tree_path", "scan_tree",
           "walk_tree"]


@dataclass
class TreeImage:
    rel: str  # posix path relative to ROOT
    domain: str
    split: str
    label: str  # real or fake, whatever the label folder's name
    folded: tuple[str, ...] = ()  # folders between domain and label the layout folds (categories)


@dataclass
class TreeListing:
    """Everything a walk of the tree finds; `scan_tree` returns the first two fields."""

    images: list[TreeImage] = field(default_factory=list)
    unexpected_dirs: list[str] = field(default_factory=list)
    stray_files: list[str] = field(default_factory=list)  # files where only dirs or images belong
    layout: Layout | None = None


def walk_tree(root: Path) -> TreeListing:
    """Recognise the tree's layout and walk it (symlinks followed: the bounded depth stops loops)."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"{root}: not a directory")
    top = read_folders(root)
    found = TreeListing(layout=detect_layout(top))
    _walk(top, found.layout, found)
    found.images.sort(key=lambda image: image.rel)
    return found


def _walk(folder: Folder, layout: Layout, found: TreeListing) -> None:
    """Folders the layout has no place for are unexpected; files where only folders belong are strays."""
    place, descends = layout.place(folder.parts), layout.descends(folder.parts)
    if place is not None and (folder.labels or not descends):
        _walk_label_parent(folder, place, found)
        return
    if not descends:
        found.unexpected_dirs.append(folder.rel)
        return
    prefix = f"{folder.rel}/" if folder.parts else ""
    if folder.parts:  # files directly in ROOT (reasoning.jsonl, README) are not part of the tree
        found.stray_files += [prefix + name for name in folder.files]
    found.unexpected_dirs += [prefix + name for name in folder.labels]  # labels where none belong
    for child in folder.folders:
        _walk(child, layout, found)


def _walk_label_parent(folder: Folder, place: Place, found: TreeListing) -> None:
    check_label_names(folder)
    prefix = f"{folder.rel}/" if folder.parts else ""
    if folder.parts:
        found.stray_files += [prefix + name for name in folder.files]
    found.unexpected_dirs += [prefix + child.name for child in folder.folders]
    for label in folder.labels:
        rel_label = prefix + label
        for entry in list_folder(folder.path / label):
            rel = f"{rel_label}/{entry.name}"
            if is_folder(entry):
                found.unexpected_dirs.append(rel)
            elif is_image_name(entry.name):
                found.images.append(TreeImage(rel, place.domain, place.split, LABEL_OF[label], place.folded))
            else:
                found.stray_files.append(rel)


def scan_tree(root: Path) -> tuple[list[TreeImage], list[str]]:
    """(images sorted by rel, rel paths of directories outside the allowed names)."""
    listing = walk_tree(root)
    return listing.images, listing.unexpected_dirs


def parse_tree_path(rel: str) -> tuple[str | None, str | None, str | None]:
    """(domain, split, label) read from a path like `[prefix/]domain/split/label/file`.

    Each part is None when the path does not show it; a lone label folder still gives the label,
    and the field's label folders (`0_real`, `1_fake`, `nature`, `ai`) give theirs, so records that
    point into a ForenSynths or GenImage tree get their labels from their paths too (not their
    domains: in those layouts the folder above the split is a category or a subset).
    """
    parts = PurePosixPath(rel.replace("\\", "/")).parts[:-1]
    for i in range(len(parts) - 1, 0, -1):
        if parts[i] in LABELS and parts[i - 1] in SPLITS:
            domain = parts[i - 2] if i >= 2 else None
            return domain, parts[i - 1], parts[i]
    label = next((LABEL_OF[part] for part in reversed(parts) if part in LABEL_OF), None)
    return None, None, label
