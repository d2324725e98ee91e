"""The built-in demo data: a small image tree (METHOD.md §4) with reasoning, made offline in seconds.

Real images are crops, at varied positions and scales, of the two photographs scikit-learn ships
(`china.jpg`, `flower.jpg`), resized to `size` x `size`. Fake images are other crops of the same
photographs passed through a simulated generator pipeline, one per domain, each leaving a trace
real generators leave, tied to the output pixel grid:

- `gan`: a stride-2 transposed convolution whose kernel phases have unequal gains: a
  checkerboard that alternates pixel by pixel (a spectral peak at the Nyquist frequency);
- `diffusion`: a latent decoder that over-smooths, leaves a faint 8-pixel grid from its 8x
  upsampling, and re-noises evenly (detail gone, the same noise in flat and busy areas);
- `banding`: a smooth rendering quantised to a few levels per channel with a clustered-dot
  dither (colour banding, flat plateaus, a 4-pixel crosshatch);
- `resample`: a quarter-resolution image upsampled 4x by pixel replication with uneven
  interpolation weights (4-pixel blocks, stair-stepped edges, a 4-pixel grid).

Every image gets a DF-R5-style reasoning text written from properties measured on the saved image
(grid ripples of period 2, 4 and 8, blockiness, colour-level coverage, noise evenness and level,
detail, brightness), in the evidence vocabulary of the PRPO lexicon (METHOD.md §9).

This is a pipeline check, not a deepfake benchmark: the traces are deliberately plain, so that a
tiny randomly initialised CNN separates real from fake after a few seconds of CPU training.

The hard setting (`hard=True`, `dx dataset demo --hard`) keeps the tree layout, the domain names
and the reasoning writer, and changes the images:

- crops of twelve photographs: scikit-learn's two and ten that scikit-image ships in its wheel
  (five colour, five grey used as RGB), read from the package folders, offline;
- camera variations on every crop, real or fake: exposure and tone curve, sometimes defocus,
  sometimes signal-dependent sensor noise, sometimes JPEG compression (an 8-pixel grid in reals);
- each fake is the crop plus `s` times its domain's trace, `s` drawn per image from
  `HARD_STRENGTH` (0.3 to 1);
- two generator variants per domain. The shared variant (`HARD_SHARED_SHARE`, 60% of a
  domain's fakes) has a 4x stage, and its period-4 trace is common to all four domains: `gan`
  stacks two stride-2 transposed convolutions from quarter resolution (checkerboards of period
  2 and 4), `diffusion` smooths, re-noises lightly and leaves 8- and 4-pixel ripples, `banding`
  dithers with the 4-pixel crosshatch, `resample` replicates 4x4 blocks. The private variant
  (the other 40%) leaves a trace no other domain has: a single period-2 checkerboard, an
  8-pixel ripple alone, undithered posterisation, a 1.5x bicubic upscale.

A detector trained on three domains can find the fourth's fakes only through the shared
family, so leave-one-domain-out SFT detects about the shared share of them, while the training
domains' own private traces are learned. See tests/bench/README.md, "Hard demo:
leave-one-domain-out SFT", for the measured figures.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from dxcli.base.errors import UsageError
from dxcli.base.jsonio import write_jsonl_atomic
from dxcli.data.records import REASONING_FILE
from dxcli.data.demo_reasoning import measure, write_reasoning
from dxcli.data.demo_render import (DOMAINS, MAX_SIZE, MIN_SIZE, PIPELINES, DemoJob, draw_crop, draw_hard_crop,
                                    real_crop, render_hard)
from dxcli.data.tree import LABELS, SPLITS
# ---------------------------------------------------------------------------------------------
# Public entry point


def make_demo(
    out: Path,
    *,
    seed: int = 0,
    n_train: int = 200,
    n_val: int = 40,
    n_test: int = 80,
    size: int = 96,
    progress: Callable[[int, int], None] | None = None,
    overwrite: bool = False,
    workers: int | None = None,
    hard: bool = False,
) -> dict:
    """Write the demo tree and `OUT/reasoning.jsonl`; return a summary.

    `n_*` count images per domain (half real, half fake). A non-empty OUT is refused unless
    `overwrite`, which first removes the demo's own domain folders (nothing else). The same seed
    gives byte-identical files, whatever the number of `workers` (default: all cores).
    `hard` makes the harder setting (see `HARD_PHOTOS` and `render_hard`); the default output
    does not change with it.
    """
    started = time.perf_counter()
    out = Path(out)
    counts_per_split = _validate(out, seed=seed, n_train=n_train, n_val=n_val, n_test=n_test,
                                 size=size, overwrite=overwrite)
    if overwrite:
        for domain in DOMAINS:
            shutil.rmtree(out / domain, ignore_errors=True)
    jobs = plan_jobs(seed=seed, counts_per_split=counts_per_split, size=size, hard=hard)
    for folder in sorted({str(Path(job.rel).parent) for job in jobs}):
        (out / folder).mkdir(parents=True, exist_ok=True)

    results = _run_jobs(jobs, out, progress, workers)
    write_jsonl_atomic(out / REASONING_FILE,
                       ({"image": rel, "reasoning": text} for rel, _, text in results))
    counts = {d: {s: {lab: 0 for lab in LABELS} for s in SPLITS} for d in DOMAINS}
    for job in jobs:
        counts[job.domain][job.split][job.label] += 1
    return {
        "out": str(out),
        "seed": seed,
        "size": size,
        "difficulty": "hard" if hard else "default",
        "photos": len({job.photo for job in jobs}),
        "domains": list(DOMAINS),
        "counts": counts,
        "images": len(jobs),
        "bytes": sum(nbytes for _, nbytes, _ in results) + (out / REASONING_FILE).stat().st_size,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _validate(out: Path, *, seed: int, n_train: int, n_val: int, n_test: int, size: int,
              overwrite: bool) -> dict[str, int]:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UsageError(f"seed must be a non-negative integer, got {seed!r}")
    counts = {"train": n_train, "val": n_val, "test": n_test}
    for split, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 2 or n % 2:
            raise UsageError(f"n_{split} must be an even number >= 2 (half real, half fake), "
                             f"got {n!r}")
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE \
            or size % 8:
        raise UsageError(f"size must be a multiple of 8 from {MIN_SIZE} to {MAX_SIZE} "
                         f"(the traces repeat every 2, 4 or 8 pixels), got {size!r}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{out}: directory is not empty (choose a new folder or overwrite)")
    return counts


def _run_jobs(jobs: list[DemoJob], out: Path, progress: Callable[[int, int], None] | None,
              workers: int | None) -> list[tuple[str, int, str]]:
    """Render in job order; a process pool when there is enough work to pay for it."""
    workers = workers or os.cpu_count() or 1
    results: list[tuple[str, int, str]] = []
    if workers > 1 and len(jobs) >= 200:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            chunk = max(8, len(jobs) // (workers * 8))
            for result in pool.map(render_job, jobs, [out] * len(jobs), chunksize=chunk):
                results.append(result)
                if progress:
                    progress(len(results), len(jobs))
        return results
    for job in jobs:
        results.append(render_job(job, out))
        if progress:
            progress(len(results), len(jobs))
    return results


# ---------------------------------------------------------------------------------------------
# Planning: every crop is drawn up front, sequentially, so crops never repeat and the result
# does not depend on how the rendering is scheduled.


def plan_jobs(*, seed: int, counts_per_split: dict[str, int], size: int, hard: bool = False
              ) -> list[DemoJob]:
    rng = np.random.default_rng(seed)
    used: set[tuple] = set()
    jobs = []
    draw = draw_hard_crop if hard else draw_crop
    for domain in DOMAINS:
        for split in SPLITS:
            per_label = counts_per_split[split] // 2
            for label in LABELS:
                for index in range(per_label):
                    photo, box, flip = draw(rng, size, used)
                    name = f"{domain}-{split}-{label}-{index:04d}.png"
                    jobs.append(DemoJob(domain, split, label, f"{domain}/{split}/{label}/{name}",
                                        photo, box, flip, size, int(rng.integers(2**62)), hard))
    return jobs



def render_job(job: DemoJob, out: Path) -> tuple[str, int, str]:
    """Make, save and describe one image. Returns (rel, bytes written, reasoning text)."""
    rng = np.random.default_rng(job.seed)
    if job.hard:
        pixels = render_hard(job, rng)
    else:
        pixels = real_crop(job)
        if job.label == "fake":
            pixels = PIPELINES[job.domain](pixels, rng)
    image = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    path = Path(out) / job.rel
    Image.fromarray(image).save(path, format="PNG", compress_level=6)
    text = write_reasoning(measure(image), job.label, rng)
    return job.rel, path.stat().st_size, text


