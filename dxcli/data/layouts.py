"""Which layout an image tree is in, and where each of its label folders belongs.

dx reads its own layout and the layouts the field publishes its benchmarks in. Every layout maps
the folders above a label folder to (domain, split), so everything downstream sees the same
`TreeImage` records whatever the tree (dxcli/data/tree.py walks it):

  dx           <domain>/<split>/<label>/
  no-split     <domain>/[<category>/]<label>/               no split folders: split test
  chameleon    <label>/  or  <split>/<label>/               one domain, named after ROOT
  forensynths  train|val/<category>/<label>/, test/<generator>/[<category>/]<label>/
  genimage     <generator>/<subset>/<split>/<label>/

Label folders are real|0_real|nature and fake|1_fake|ai, one naming per folder; split folders are
train|val|test. Names are case-sensitive. Detection reads folder names only, down to the deepest
label folder a layout has (depth 4); symlinked folders are followed and that depth bounds any loop.
An ambiguous or mixed tree is a one-line DxError that says how to rename it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

from dxcli.base.errors import DxError

SPLITS = ("train", "val", "test")
LABEL_PAIRS = (("real", "fake"), ("0_real", "1_fake"), ("nature", "ai"))  # dx, ForenSynths, GenImage
LABELS = LABEL_PAIRS[0]  # what every label folder reads as
LABEL_OF = {name: LABELS[i] for pair in LABEL_PAIRS for i, name in enumerate(pair)}
LABEL_NAMES = " and ".join("|".join(pair[i] for pair in LABEL_PAIRS) for i in range(2))  # real|0_real|nature and ...
LISTED_DEPTH = 3  # folders listed while looking for label folders: the deepest lie at depth 4
PROGAN = "progan"  # ForenSynths' train and val sets are ProGAN images, one LSUN category a folder
UNSPLIT = "test"  # a tree without split folders is a published test set


class Place(NamedTuple):
    domain: str
    split: str
    folded: tuple[str, ...]  # folder names between the domain and the label (categories, subsets)


@dataclass
class Folder:
    """A folder of the tree above the label folders, listed once for detection and the walk."""

    path: Path
    parts: tuple[str, ...]  # folder names from ROOT; () for ROOT itself
    folders: list[Folder] = field(default_factory=list)  # sub-folders that are not label folders
    labels: list[str] = field(default_factory=list)  # names of label sub-folders
    files: list[str] = field(default_factory=list)
    listed: bool = True  # False below LISTED_DEPTH: the contents were not read

    @property
    def name(self) -> str:
        return self.parts[-1] if self.parts else self.path.name

    @property
    def rel(self) -> str:
        return "/".join(self.parts) or "."


def list_folder(path: Path) -> list[os.DirEntry]:
    """The visible entries of a folder, sorted by name; an unreadable folder is a DxError."""
    try:
        with os.scandir(path) as it:
            return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as exc:
        raise DxError(f"{path}: cannot list the folder ({exc.strerror or exc})") from None


def is_folder(entry: os.DirEntry) -> bool:
    """A folder, through symlinks; a link that loops onto itself or dangles is not one (a stray file)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def read_folders(path: Path, parts: tuple[str, ...] = ()) -> Folder:
    """The folders above the label folders, to LISTED_DEPTH (label folders are not entered)."""
    folder = Folder(Path(path), parts, listed=len(parts) <= LISTED_DEPTH)
    if not folder.listed:
        return folder
    for entry in list_folder(folder.path):
        if not is_folder(entry):
            folder.files.append(entry.name)
        elif entry.name in LABEL_OF:
            folder.labels.append(entry.name)
        else:
            folder.folders.append(read_folders(Path(entry.path), parts + (entry.name,)))
    return folder


def label_depths(folder: Folder) -> set[int]:
    """How many levels below `folder` label folders lie (1: it holds label folders itself)."""
    depths = {1} if folder.labels else set()
    for child in folder.folders:
        depths |= {depth + 1 for depth in label_depths(child)}
    return depths


# ---------------------------------------------------------------- the layouts

def _place_dx(parts: tuple[str, ...], root_name: str) -> Place | None:
    return Place(parts[0], parts[1], ()) if len(parts) == 2 and parts[1] in SPLITS else None


def _place_no_split(parts: tuple[str, ...], root_name: str) -> Place | None:
    return Place(parts[0], UNSPLIT, parts[1:]) if len(parts) in (1, 2) else None


def _place_chameleon(parts: tuple[str, ...], root_name: str) -> Place | None:
    if not parts:
        return Place(root_name, UNSPLIT, ())
    return Place(root_name, parts[0], ()) if len(parts) == 1 and parts[0] in SPLITS else None


def _place_forensynths(parts: tuple[str, ...], root_name: str) -> Place | None:
    if len(parts) == 2 and parts[0] in ("train", "val"):
        return Place(PROGAN, parts[0], parts[1:])
    if len(parts) in (2, 3) and parts[0] == "test":
        return Place(parts[1], "test", parts[2:])
    return None


def _place_genimage(parts: tuple[str, ...], root_name: str) -> Place | None:
    return Place(parts[0], parts[2], parts[1:2]) if len(parts) == 3 and parts[2] in SPLITS else None


# name -> (title, pattern, where label folders may sit, which folders hold deeper ones)
_LAYOUTS: dict[str, tuple[str, str, Callable[..., Place | None], Callable[[tuple[str, ...]], bool]]] = {
    "dx": ("dx", "<domain>/<split>/<label>/", _place_dx, lambda p: len(p) < 2),
    "no-split": ("no split folders", "<domain>/[<category>/]<label>/", _place_no_split,
                 lambda p: len(p) < 2),
    "chameleon": ("Chameleon", "[<split>/]<label>/", _place_chameleon, lambda p: not p),
    "forensynths": ("ForenSynths", "train|val/<category>/<label>/, test/<generator>/[<category>/]<label>/",
                    _place_forensynths,
                    lambda p: not p or (len(p) == 1 and p[0] in SPLITS) or (len(p) == 2 and p[0] == "test")),
    "genimage": ("GenImage", "<generator>/<subset>/<split>/<label>/", _place_genimage, lambda p: len(p) < 3),
}


@dataclass(frozen=True)
class Layout:
    name: str  # a key of _LAYOUTS
    root_name: str  # the domain of a tree without domain folders
    notes: tuple[str, ...] = ()  # what the user should know about how the tree was read
    split_folders: bool = True  # False: no split folders, every image is read as test

    @property
    def title(self) -> str:
        return _LAYOUTS[self.name][0]

    @property
    def pattern(self) -> str:
        return _LAYOUTS[self.name][1]

    def place(self, parts: tuple[str, ...]) -> Place | None:
        """(domain, split, folded) of label folders inside the folder at `parts`; None: none belong there."""
        return _LAYOUTS[self.name][2](parts, self.root_name)

    def descends(self, parts: tuple[str, ...]) -> bool:
        """Whether the folder at `parts` holds folders that lead to label folders."""
        return _LAYOUTS[self.name][3](parts)

    def describe(self) -> str:
        return f"{self.title} ({self.pattern})"

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "title": self.title, "pattern": self.pattern, "notes": list(self.notes)}


def check_label_names(folder: Folder) -> None:
    """One naming of the labels per folder: `real` beside `0_real` is a mistake to fix, not to guess."""
    pairs = sorted({pair for pair in LABEL_PAIRS for name in folder.labels if name in pair})
    if len(pairs) < 2:
        return
    keep = LABELS if LABELS in pairs else pairs[0]
    moves = ", ".join(f"{name}/ into {keep[LABELS.index(LABEL_OF[name])]}/"
                      for name in folder.labels if name not in keep)
    raise DxError(f"{folder.path}: label folders {', '.join(folder.labels)} mix namings; use one of "
                  f"real|fake, 0_real|1_fake, nature|ai per folder (move the images of {moves})")


# ---------------------------------------------------------------- detection

def root_name(root: Path) -> str:
    """The domain of a tree without domain folders: the root folder's own name."""
    return Path(root).resolve().name or "root"


def detect_layout(root: Folder) -> Layout:
    """The one layout that explains the tree's label folders; the dx layout when none does (its
    walk then reports every folder as unexpected, as it always did)."""
    name = root_name(root.path)
    if root.labels:
        if label_depths(root) != {1}:
            raise DxError(f"{root.path}: holds label folders ({', '.join(root.labels)}) and other folders with "
                          "label folders inside: a Chameleon-style test set holds only its label folders; "
                          "move the other folders out")
        return Layout("chameleon", name, (f"no domain or split folders: one domain, {name} (the root "
                                          "folder's name), split test (a published test set)",),
                      split_folders=False)
    _refuse_split_look_alikes([folder.name for folder in root.folders if folder.labels], str(root.path))
    splits = [folder for folder in root.folders if folder.name in SPLITS and label_depths(folder)]
    if splits:
        return _split_first(root, splits, name)
    votes = {folder.name: _domain_layout(folder, root.path) for folder in root.folders if label_depths(folder)}
    return _layout_from_votes(root, votes, name)


def _split_first(root: Folder, splits: list[Folder], name: str) -> Layout:
    """ROOT/<split>/...: Chameleon (`test/<label>`) or ForenSynths (`test/<generator>/...`)."""
    others = [folder.name for folder in root.folders if folder.name not in SPLITS and label_depths(folder)]
    split_names = ", ".join(folder.name for folder in splits)
    if others:
        raise DxError(f"{root.path}: holds split folders ({split_names}) beside other folders with label "
                      f"folders ({', '.join(others)}): the split comes first (ForenSynths: test/<generator>/<label>) "
                      f"or the domain does (dx: <domain>/<split>/<label>), not both; move {', '.join(others)} "
                      "into a split folder, or rename a domain called like a split")
    direct = [folder.name for folder in splits if folder.labels]
    deeper = [folder.name for folder in splits if label_depths(folder) - {1}]
    if direct and deeper:
        raise DxError(f"{root.path}: label folders lie directly in {', '.join(direct)} and in sub-folders of "
                      f"{', '.join(deeper)}: that fits both Chameleon (<split>/<label>) and ForenSynths "
                      "(<split>/<generator>/<label>); put every split's label folders at the same depth")
    if direct:
        return Layout("chameleon", name, (f"no domain folders: one domain, {name} (the root folder's name)",))
    notes = []
    if any(folder.name in ("train", "val") for folder in splits):
        notes.append(f"train/ and val/ hold ProGAN's LSUN categories (ForenSynths trains on ProGAN alone): "
                     f"they fold into domain {PROGAN}")
    if any(folder.name == "test" and 3 in label_depths(folder) for folder in splits):
        notes.append("test/<generator>/<category>/ folds into the generator's domain")
    return Layout("forensynths", name, tuple(notes))


def _domain_layout(domain: Folder, root: Path) -> str:
    """Which layout a first-level folder follows: dx, no-split, genimage, or none (no structure)."""
    where = f"{root}/{domain.rel}"
    if domain.labels:
        if label_depths(domain) != {1}:
            raise DxError(f"{where}: holds label folders ({', '.join(domain.labels)}) beside sub-folders with "
                          "label folders: move the label folders into a split (e.g. test/) or category folder")
        return "no-split"
    direct = [folder for folder in domain.folders if folder.labels]
    deeper = [folder for folder in domain.folders if not folder.labels and 2 in label_depths(folder)]
    if direct and deeper:
        raise DxError(f"{where}: label folders lie in {', '.join(f.name for f in direct)} and one level deeper "
                      f"in {', '.join(f.name for f in deeper)}: that fits both dx (<domain>/<split>/<label>) "
                      "and GenImage (<generator>/<subset>/<split>/<label>); use one depth")
    if deeper:
        split_below = any(sub.labels and sub.name in SPLITS for folder in deeper for sub in folder.folders)
        return "genimage" if split_below else "none"
    return _splits_or_categories(direct, where) if direct else "none"


def _splits_or_categories(direct: list[Folder], where: str) -> str:
    """`<domain>/<split>/<label>` or `<generator>/<category>/<label>`: ForenSynths' categories include
    one called `train`, so a split name alone does not decide; the majority of the names does."""
    split_named = [folder.name for folder in direct if folder.name in SPLITS]
    other = [folder.name for folder in direct if folder.name not in SPLITS]
    if len(split_named) > len(other):
        return "dx"
    if len(other) > len(split_named):
        _refuse_split_look_alikes(other, where)
        return "no-split"
    raise DxError(f"{where}: sub-folders {', '.join(split_named)} are split names but {', '.join(other)} are "
                  "not: that fits both <domain>/<split>/<label> and <generator>/<category>/<label>; rename "
                  f"{', '.join(other)} to train|val|test, or give the categories names that are not splits")


def _refuse_split_look_alikes(names: list[str], where: str) -> None:
    """`Train` or `TEST` read as a domain or category would silently put its images in the test split."""
    slips = [name for name in names if name not in SPLITS and name.lower() in SPLITS]
    if slips:
        renames = ", ".join(f"{slip} to {slip.lower()}" for slip in slips)
        raise DxError(f"{where}: {', '.join(slips)} look like split folders, but split names are lower-case "
                      f"(train|val|test); rename {renames}")


def _layout_from_votes(root: Folder, votes: dict[str, str], name: str) -> Layout:
    by_layout: dict[str, list[str]] = {}
    for domain, vote in votes.items():
        if vote != "none":
            by_layout.setdefault(vote, []).append(domain)
    if not by_layout:
        return Layout("dx", name)
    if len(by_layout) > 1:
        groups = "; ".join(f"{', '.join(domains[:3])}{' ...' if len(domains) > 3 else ''}: {_LAYOUTS[kind][1]}"
                           for kind, domains in sorted(by_layout.items()))
        hint = ("put the label folders of a domain without splits under <domain>/test/"
                if set(by_layout) == {"dx", "no-split"} else "move every domain into one of these layouts")
        raise DxError(f"{root.path}: its domains follow different layouts ({groups}); {hint}")
    kind = next(iter(by_layout))
    return Layout(kind, name, _notes(kind, root), split_folders=kind != "no-split")


def _notes(kind: str, root: Folder) -> tuple[str, ...]:
    if kind == "no-split":
        notes = ["no split folders: every image is in the test split (a published test set)"]
        if any(2 in label_depths(folder) for folder in root.folders):
            notes.append("category folders fold into their generator's domain")
        return tuple(notes)
    if kind == "genimage":
        return ("the subset folders (e.g. imagenet_ai_0508_adm) fold into their generator's domain",)
    return ()
