"""`eval robust`: perturbed copies of a question set's images, made with PIL.

A perturbation is a pure function of the image (noise is seeded from the image's path), so a
rerun makes the same copies. Copies are written as PNG (lossless: the only change is the
perturbation's own; a JPEG perturbation is decoded, then stored losslessly) under a work folder,
mirroring the questions' relative paths (`.png` appended to other names), never beside the originals.
"""

from __future__ import annotations

import io
import os
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from dxcli.base.errors import DxError, UsageError
from dxcli.base.images import check_relative, load_rgb, safe_image_path
from dxcli.runtime.progress import ProgressView

CLEAN = "clean"  # the unperturbed images: the row every perturbation is compared with
BLUR_RADIUS = 1.5
NOISE_SIGMA = 8.0  # in 0-255 pixel units: 8/255 of the range


def jpeg(image: Any, quality: int) -> Any:
    from PIL import Image

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def downscale(image: Any) -> Any:
    """Half size and back (bicubic both ways): what resizing pipelines do to fine detail."""
    from PIL import Image

    width, height = image.size
    small = image.resize((max(1, width // 2), max(1, height // 2)), Image.Resampling.BICUBIC)
    return small.resize((width, height), Image.Resampling.BICUBIC)


def blur(image: Any) -> Any:
    from PIL import ImageFilter

    return image.filter(ImageFilter.GaussianBlur(radius=BLUR_RADIUS))


def noise(image: Any, seed: int) -> Any:
    """Additive Gaussian noise, rounded and clipped to 8 bits. numpy draws it: PIL's own
    `effect_noise` uses the C library's unseeded rand(), so copies would differ between runs."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + np.random.default_rng(seed).normal(0.0, NOISE_SIGMA, pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")


# name -> (function of the image; takes the seed too when it draws random numbers)
PERTURBATIONS: dict[str, tuple[Callable[..., Any], bool]] = {
    "jpeg95": (partial(jpeg, quality=95), False),
    "jpeg75": (partial(jpeg, quality=75), False),
    "jpeg50": (partial(jpeg, quality=50), False),
    "downscale": (downscale, False),
    "blur": (blur, False),
    "noise": (noise, True),
}


def parse_perturbations(spec: str | Sequence[str] | None) -> list[str]:
    """`jpeg50,blur` -> ["jpeg50", "blur"] (order kept, duplicates once); None or empty -> all."""
    import difflib

    names = spec.split(",") if isinstance(spec, str) else list(spec or [])
    names = list(dict.fromkeys(n.strip().lower() for n in names if n.strip()))
    for name in names:
        if name not in PERTURBATIONS:
            close = difflib.get_close_matches(name, list(PERTURBATIONS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UsageError(f"--perturb: unknown perturbation '{name}'{hint}; known: {', '.join(PERTURBATIONS)}")
    return names or list(PERTURBATIONS)


def perturb(image: Any, name: str, key: str = "") -> Any:
    """The perturbed RGB image; `key` (the image's path) seeds perturbations that draw noise."""
    function, seeded = PERTURBATIONS[name]
    if seeded:
        return function(image, seed=zlib.crc32(f"{name}:{key}".encode()))
    return function(image)


def copy_name(rel: str) -> str:
    """Where the perturbed copy of `rel` goes, relative to the perturbation's image folder: the
    same path, with `.png` appended unless it is one already (`a.jpg` and `a.png` stay apart)."""
    normal = check_relative(rel)
    return normal if normal.lower().endswith(".png") else normal + ".png"


def moved_image(rel: str) -> str:
    """The question's image path in the perturbed set; a path that is not a valid relative one
    stays as it is, so inference reports it per question, as `eval infer` does on the originals."""
    try:
        return copy_name(rel)
    except DxError:
        return rel


def make_copy(source_root: Path, rel: str, dest_root: Path, name: str) -> bool:
    """Write the perturbed copy of one image (skipped when already there); False when the
    original cannot be read (its question is then answered as an error, like `eval infer` does)."""
    try:
        dest = dest_root / copy_name(rel)
        if dest.exists():
            return True
        image = load_rgb(safe_image_path(source_root, rel))
    except Exception:  # missing, unreadable or escaping: the inference step reports it per question
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial_file = dest.with_name(f".{dest.name}.part")
    # compress_level 1: still lossless, and PNG's default level makes writing the slow step
    perturb(image, name, rel).save(partial_file, format="PNG", compress_level=1)
    os.replace(partial_file, dest)  # a crash never leaves a torn copy that a rerun would trust
    return True


def make_perturbed_set(questions: list[dict[str, Any]], source_root: Path, dest_root: Path,
                       name: str, workers: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Copies of every question's image under `dest_root`, and the questions pointing at them.
    Returns (questions, how many originals could not be read)."""
    rels = list(dict.fromkeys(str(q["image"]) for q in questions))
    progress = ProgressView(len(rels), f"perturb {name}", enabled=True)
    unreadable = 0
    # PIL releases the GIL while it encodes, decodes and filters: threads use every core
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        for done, ok in enumerate(pool.map(lambda rel: make_copy(source_root, rel, dest_root, name), rels), 1):
            unreadable += not ok
            progress.update(done, {})
    progress.close()
    moved = [{**q, "image": moved_image(str(q["image"]))} for q in questions]
    return moved, unreadable
