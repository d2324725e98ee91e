"""Image files: which names are images, safe paths under an image root, and the one RGB loader."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from dxcli.base.errors import DxError

IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTS


def check_relative(rel: str) -> str:
    """Normalised posix form of a relative path; DxError when it is absolute or climbs out."""
    text = rel.replace("\\", "/")
    pure = PurePosixPath(text)
    if pure.is_absolute() or (len(text) > 1 and text[1] == ":"):
        raise DxError(f"image path '{rel}' is absolute; it must be relative to the image root")
    parts: list[str] = []
    for part in pure.parts:
        if part == "..":
            if not parts:
                raise DxError(f"image path '{rel}' escapes the image root")
            parts.pop()
        elif part != ".":
            parts.append(part)
    if not parts:
        raise DxError(f"image path '{rel}' names no file")
    return "/".join(parts)


def safe_image_path(root: Path, rel: str) -> Path:
    """ROOT/rel, refusing absolute paths and paths that leave ROOT through `..` or a symlink."""
    normal = check_relative(rel)
    root = Path(root)
    path = root / normal
    resolved_root = root.resolve()
    if not path.resolve().is_relative_to(resolved_root):
        raise DxError(f"image path '{rel}' escapes the image root {root} (through a symlink)")
    return path


def load_rgb(path: Path):
    """The image as RGB, turned upright by its EXIF orientation (as a viewer shows it).

    Pillow's decompression-bomb warning becomes an error naming the file: an image that large is
    either an attack or a mistake, and a raw library warning tells the user neither.
    """
    import warnings

    from PIL import Image, ImageOps

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as img:
                return ImageOps.exif_transpose(img).convert("RGB")
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise DxError(f"{path}: too many pixels to be a photo ({exc})") from None
