"""Throughput of `dx dataset check` (images/s) on a generated tree of small images.

Run: python tests/bench/bench_dataset_check.py [--images 20000] [--size 64]
Prints the library call with one worker and with all cores, and the whole `dx` command.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

DOMAINS = ("d0", "d1", "d2", "d3")
SPLITS = ("train", "val", "test")
LABELS = ("real", "fake")


def _write_batch(args: tuple[str, int, int, int]) -> int:
    """Write images start..stop-1: noise PNGs and JPEGs, a blend of the two common formats."""
    from PIL import Image

    root, start, stop, size = args
    for index in range(start, stop):
        cell = index % (len(DOMAINS) * len(SPLITS) * len(LABELS))
        domain = DOMAINS[cell // 6]
        split, label = SPLITS[(cell // 2) % 3], LABELS[cell % 2]
        image = Image.frombytes("RGB", (size, size), random.Random(index).randbytes(size * size * 3))
        ext, fmt = (".png", "PNG") if index % 2 else (".jpg", "JPEG")
        folder = Path(root, domain, split, label)
        folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        (folder / f"img_{index:06d}{ext}").write_bytes(buffer.getvalue())
    return stop - start


def make_tree(root: Path, count: int, size: int) -> None:
    step = 500
    batches = [(str(root), s, min(s + step, count), size) for s in range(0, count, step)]
    with ProcessPoolExecutor() as pool:
        list(pool.map(_write_batch, batches))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()

    from dxcli.data.check import check_tree

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "tree"
        started = time.perf_counter()
        make_tree(root, args.images, args.size)
        print(f"generated {args.images} images of {args.size}x{args.size} px "
              f"in {time.perf_counter() - started:.1f} s")
        cores = os.cpu_count()
        for workers in (1, 0):
            started = time.perf_counter()
            report = check_tree(root, workers=workers)
            seconds = time.perf_counter() - started
            assert report.ok and report.images == args.images, report.problems[:3]
            label = "1 worker" if workers == 1 else f"all cores ({cores})"
            print(f"check_tree, {label}: {args.images / seconds:,.0f} images/s ({seconds:.2f} s)")
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "dxcli", "dataset", "check", str(root), "--json"],
                              capture_output=True, text=True)
        seconds = time.perf_counter() - started
        assert done.returncode == 0, done.stderr
        print(f"dx dataset check (whole command, all cores): {args.images / seconds:,.0f} images/s "
              f"({seconds:.2f} s)")


if __name__ == "__main__":
    main()
