"""Small image files for dataset tests: valid odd formats, broken files, whole trees."""

from __future__ import annotations

import hashlib
import io
import random
import struct
import zlib
from pathlib import Path

from PIL import Image



def noise_image(size: tuple[int, int] = (40, 40), mode: str = "RGB", seed: int = 0) -> Image.Image:
    """An image whose pixels (hence bytes) differ for every seed."""
    if mode == "P":  # a real palette, not a bare index plane
        return noise_image(size, "RGB", seed).quantize(colors=16)
    bands = len(Image.new(mode, (1, 1)).getbands())
    data = random.Random(seed).randbytes(size[0] * size[1] * bands)
    return Image.frombytes(mode, size, data)


def save_image(path: Path, *, size: tuple[int, int] = (40, 40), mode: str = "RGB", seed: int = 0,
               fmt: str | None = None, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise_image(size, mode, seed).save(path, format=fmt or _format_of(path), **options)
    return path


def _format_of(path: Path) -> str:
    ext = path.suffix.lower()
    return {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP",
            ".gif": "GIF", ".tif": "TIFF", ".tiff": "TIFF"}[ext]


def make_tree(root: Path, n: int = 4, domains=("alpha", "beta"), splits=("train", "val", "test"),
              size: tuple[int, int] = (40, 40), seed: int = 0) -> list[str]:
    """n distinct PNGs per domain/split/label; returns their rel paths."""
    rels = []
    counter = seed * 100_000
    for domain in domains:
        for split in splits:
            for label in ("real", "fake"):
                for i in range(n):
                    rel = f"{domain}/{split}/{label}/{label}_{i}.png"
                    counter += 1
                    save_image(root / rel, size=size, seed=counter)
                    rels.append(rel)
    return rels


def make_pool(root: Path, n: int = 20, domains=("alpha", "beta")) -> list[str]:
    """POOL/<domain>/<label>/* with n distinct small PNGs each."""
    rels = []
    for d, domain in enumerate(domains):
        for label in ("real", "fake"):
            for i in range(n):
                rel = f"{domain}/{label}/{label}_{i:03d}.png"
                save_image(root / rel, size=(8, 8), seed=d * 10_000 + (label == "fake") * 1000 + i)
                rels.append(rel)
    return rels


def write_odd_valid_images(folder: Path, seed: int = 0) -> list[Path]:
    """Valid images of unusual kinds: all must pass a dataset check."""
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees on display
    return [
        save_image(folder / "gray.png", mode="L", seed=seed + 1),
        save_image(folder / "cmyk.jpg", mode="CMYK", seed=seed + 2),
        save_image(folder / "palette.png", mode="P", seed=seed + 3),
        save_image(folder / "alpha.png", mode="RGBA", seed=seed + 4),
        save_image(folder / "rotated.jpg", size=(48, 36), seed=seed + 5, exif=exif.tobytes()),
        save_image(folder / "upper.JPG", seed=seed + 6),
        save_image(folder / "photo.webp", seed=seed + 7),
        save_image(folder / "bits.bmp", seed=seed + 8),
        save_image(folder / "anim.gif", mode="P", seed=seed + 9),
        save_image(folder / "scan.tiff", seed=seed + 10),
    ]


def truncated_jpeg(path: Path) -> Path:
    buffer = io.BytesIO()
    noise_image((64, 64), seed=99).save(buffer, format="JPEG", quality=90)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def png_declaring_size(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height (a decompression bomb made in microseconds):
    the IHDR chunk of a tiny PNG is rewritten with a valid CRC."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b"IHDR")
    struct.pack_into(">II", data, ihdr + 4, width, height)
    crc = zlib.crc32(bytes(data[ihdr:ihdr + 17]))
    struct.pack_into(">I", data, ihdr + 17, crc)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """rel path -> (content hash, mtime_ns) of every file: proves a folder was not touched."""
    return {p.relative_to(root).as_posix(): (sha256(p), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def exit_status(result) -> int:
    """The exit status `dx` gives; an unexpected exception (a bug) is re-raised."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code


def assert_demo_layout(root: Path, summary: dict, domains: tuple[str, ...], split_sizes: dict[str, int]) -> list[Path]:
    """A demo tree as `dx dataset demo` promises it: every domain/split/label folder with its share
    of images, the summary's counts agreeing; returns the images."""
    assert sorted(p.name for p in root.iterdir()) == sorted([*domains, "reasoning.jsonl"])
    for domain in domains:
        assert sorted(p.name for p in (root / domain).iterdir()) == ["test", "train", "val"]
        for split, n in split_sizes.items():
            assert sorted(p.name for p in (root / domain / split).iterdir()) == ["fake", "real"]
            for label in ("real", "fake"):
                assert len(list((root / domain / split / label).iterdir())) == n // 2
                assert summary["counts"][domain][split][label] == n // 2
    images = sorted(root.glob("*/*/*/*.png"))
    assert summary["images"] == len(images) == len(domains) * sum(split_sizes.values())
    return images
