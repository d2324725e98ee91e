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
- each fake is the crop plus `s` times its domain's trace, `s` drawn per image from a
  per-domain range (`HARD_STRENGTH`; down to 0.05-0.1, where a trace is hard to see);
- traces that overlap in part: `gan` stacks two stride-2 transposed convolutions from quarter
  resolution (checkerboards of period 2 and 4, some softness), `diffusion` smooths, re-noises
  lightly and leaves 8- and 4-pixel ripples, `banding` and `resample` are the default ones
  (`resample` at lower strengths). See tests/bench/README.md, "Hard demo: leave-one-domain-out
  SFT", for what leave-one-domain-out SFT makes of it.
"""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from dxcli.base.errors import DxError, UsageError
from dxcli.base.jsonio import write_jsonl_atomic
from dxcli.data.records import REASONING_FILE
from dxcli.data.tree import LABELS, SPLITS

DOMAINS = ("gan", "diffusion", "banding", "resample")
PHOTOS = ("china.jpg", "flower.jpg")

MIN_SIZE, MAX_SIZE = 32, 256
_MIN_CROP = 128  # crops are always downscaled (>= 1.33x), which erases the photos' JPEG grid
_PHOTO_HEIGHT, _PHOTO_WIDTH = 427, 640  # both photos


@dataclass(frozen=True)
class DemoJob:
    """One image to make: where it goes, which crop it starts from, and its pipeline seed."""

    domain: str
    split: str
    label: str
    rel: str
    photo: str
    box: tuple[int, int, int]  # left, top, side
    flip: bool
    size: int
    seed: int
    hard: bool = False  # the hard setting's photos, camera variations and graded traces


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
    draw = _draw_hard_crop if hard else _draw_crop
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


def _draw_crop(rng: np.random.Generator, size: int, used: set[tuple]
               ) -> tuple[str, tuple[int, int, int], bool]:
    """A square crop (log-uniform side, flipped or not) not drawn before."""
    low = max(_MIN_CROP, int(np.ceil(size * 4 / 3)))
    while True:
        side = int(round(np.exp(rng.uniform(np.log(low), np.log(_PHOTO_HEIGHT)))))
        photo = PHOTOS[int(rng.integers(len(PHOTOS)))]
        left = int(rng.integers(0, _PHOTO_WIDTH - side + 1))
        top = int(rng.integers(0, _PHOTO_HEIGHT - side + 1))
        flip = bool(rng.integers(2))
        key = (photo, left, top, side, flip)
        if key not in used:
            used.add(key)
            return photo, (left, top, side), flip


# ---------------------------------------------------------------------------------------------
# Rendering


@lru_cache(maxsize=None)
def _photo(name: str) -> Image.Image:
    """One of scikit-learn's sample photographs, read from its package folder (importing
    sklearn itself costs each worker over a second); `skimage/<file>` names one of
    scikit-image's (hard setting)."""
    if name.startswith(_SKIMAGE):
        return _skimage_photo(name[len(_SKIMAGE):])
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DxError("the demo data needs scikit-learn's sample photographs: "
                      "pip install scikit-learn")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "images" / name
    if not path.is_file():
        from sklearn.datasets import load_sample_image  # the documented way, if the layout moved

        return Image.fromarray(load_sample_image(name))
    with Image.open(path) as image:
        return image.convert("RGB")


def real_crop(job: DemoJob) -> np.ndarray:
    """The crop resized to size x size (Lanczos, so downscaling is properly anti-aliased)."""
    left, top, side = job.box
    image = _photo(job.photo).crop((left, top, left + side, top + side))
    image = image.resize((job.size, job.size), Image.LANCZOS)
    if job.flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(image, dtype=np.float32)


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


# ---------------------------------------------------------------------------------------------
# Simulated generator pipelines: float32 HxWx3 in [0, 255] in, same shape out.
# Each trace is tied to the output pixel grid (generators upsample from the image origin), so it
# repeats with a fixed phase in every image of a domain: the periodic fingerprint that makes real
# generators detectable, and plain enough for a tiny CNN to pick up in minutes.

# Clustered-dot (halftone) dither thresholds, low in the 2x2 centre of each 4x4 cell, high in the
# corners; mirror-symmetric, so the crosshatch survives horizontal-flip augmentation.
_EDGE4 = np.array([1, 0, 0, 1])
_DOT4 = np.array([0.2, 0.5, 0.8])[_EDGE4[:, None] + _EDGE4[None, :]]


def _resize(pixels: np.ndarray, side: int, resample: int = Image.BOX) -> np.ndarray:
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    return np.asarray(image.resize((side, side), resample), dtype=np.float32)


def _phase_gain(gains: np.ndarray, size: int) -> np.ndarray:
    """A separable gain map repeating `gains` along both axes from the origin (H x W x 1)."""
    line = np.tile(gains, size // len(gains) + 1)[:size]
    return np.outer(line, line)[..., None].astype(np.float32)


def gan_upsampler(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Stride-2 transposed convolution from half resolution. Its 4-tap kernel is a bilinear one
    whose even and odd taps are scaled apart, so the two output phases get gains 1 +/- d (the
    uneven-overlap checkerboard of learned deconvolutions), plus an alternating bias."""
    size = pixels.shape[0]
    low = _resize(pixels, size // 2)
    d = rng.uniform(0.10, 0.16)
    taps = np.array([0.25, 0.75, 0.75, 0.25]) * (1 + d * np.array([1, -1, 1, -1]))
    upsampled = np.zeros((size, size, 3), np.float32)
    upsampled[::2, ::2] = low
    kernel = np.outer(taps, taps)
    out = np.stack([ndimage.convolve(upsampled[..., c], kernel, mode="mirror")
                    for c in range(3)], axis=-1)
    bias = rng.uniform(3.0, 6.0) * _phase_gain(np.array([1.0, -1.0]), size)  # same sign as d^2
    return out + bias


def diffusion_decoder(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Over-smoothing (fine detail lost), a faint 8-pixel grid from the latent decoder's 8x
    upsampling, then re-noising with even Gaussian noise mostly shared by the channels."""
    size = pixels.shape[0]
    sigma = rng.uniform(1.3, 2.0)
    smooth = ndimage.gaussian_filter(pixels, sigma=(sigma, sigma, 0))
    ripple = 1 + rng.uniform(0.05, 0.08) * np.cos(2 * np.pi * (np.arange(8) + 0.5) / 8)
    level = rng.uniform(4.0, 7.0)
    noise = rng.normal(0.0, level, (size, size, 1)) + rng.normal(0.0, level * 0.35, pixels.shape)
    return smooth * _phase_gain(ripple, size) + noise.astype(np.float32)


def colour_banding(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A smooth rendering quantised to a few levels per channel with a weak clustered-dot ordered
    dither: flat bands with stepped contours, and the dither's fixed 4-pixel crosshatch."""
    size = pixels.shape[0]
    smooth = ndimage.gaussian_filter(pixels, sigma=(1.0, 1.0, 0))
    step = 255.0 / (int(rng.integers(6, 10)) - 1)
    threshold = 0.5 + 0.8 * (np.tile(_DOT4, (size // 4, size // 4)) - 0.5)
    return np.floor(smooth / step + threshold[..., None]) * step


def nearest_resample(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Made at a quarter of the resolution, then upsampled 4x by pixel replication through a
    fixed-point interpolator whose uneven weights brighten block borders: a 4-pixel grid."""
    size = pixels.shape[0]
    blocks = np.repeat(np.repeat(_resize(pixels, size // 4), 4, axis=0), 4, axis=1)
    e = rng.uniform(0.05, 0.08)
    return blocks * _phase_gain(np.array([1 + e, 1 - e, 1 - e, 1 + e]), size)


PIPELINES: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "gan": gan_upsampler,
    "diffusion": diffusion_decoder,
    "banding": colour_banding,
    "resample": nearest_resample,
}


# ---------------------------------------------------------------------------------------------
# The hard setting (`dx dataset demo --hard`): more photographs, camera variations on every crop,
# and each domain's trace blended in at a strength drawn per image, so that some fakes are nearly
# invisible and what one domain's detector learns only partly carries over to another's.

_SKIMAGE = "skimage/"
# scikit-image's photographs that ship inside its wheel (skimage/data/), read without pooch or
# the network; the grey ones are used as RGB.
HARD_PHOTOS = PHOTOS + tuple(_SKIMAGE + name for name in (
    "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
    "camera.png", "grass.png", "gravel.png", "brick.png", "coins.png"))


def _skimage_photo(name: str) -> Image.Image:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise DxError("the hard demo data needs scikit-image's sample photographs: "
                      "pip install scikit-image")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / name
    if not path.is_file():
        raise DxError(f"{path}: missing from the scikit-image install (reinstall scikit-image)")
    with Image.open(path) as image:
        return image.convert("RGB")


@lru_cache(maxsize=None)
def _photo_size(name: str) -> tuple[int, int]:
    return _photo(name).size


def _draw_hard_crop(rng: np.random.Generator, size: int, used: set[tuple]
                    ) -> tuple[str, tuple[int, int, int], bool]:
    """As `_draw_crop`, over `HARD_PHOTOS` and each photograph's own size."""
    low = max(_MIN_CROP, int(np.ceil(size * 4 / 3)))
    while True:
        photo = HARD_PHOTOS[int(rng.integers(len(HARD_PHOTOS)))]
        width, height = _photo_size(photo)
        side = int(round(np.exp(rng.uniform(np.log(low), np.log(min(width, height))))))
        left = int(rng.integers(0, width - side + 1))
        top = int(rng.integers(0, height - side + 1))
        flip = bool(rng.integers(2))
        key = (photo, left, top, side, flip)
        if key not in used:
            used.add(key)
            return photo, (left, top, side), flip


HARD_DEFOCUS, HARD_SENSOR_NOISE, HARD_JPEG = 0.35, 0.5, 0.25  # share of crops with each


def camera_variation(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What differs between real photographs besides their scene: exposure and tone curve,
    sometimes defocus, sometimes sensor noise (stronger in bright areas), sometimes JPEG
    compression. Applied to every crop, real or fake, before any generator trace."""
    gain, gamma = rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.2)
    out = 255.0 * np.clip(pixels / 255.0, 0, 1) ** gamma * gain
    if rng.random() < HARD_DEFOCUS:
        sigma = rng.uniform(0.4, 1.2)
        out = ndimage.gaussian_filter(out, sigma=(sigma, sigma, 0))
    if rng.random() < HARD_SENSOR_NOISE:
        level = rng.uniform(0.8, 3.5)
        scale = level * np.sqrt(np.clip(out, 0, 255) / 128.0 + 0.25)
        out = out + scale * (rng.normal(0, 1, out.shape[:2] + (1,)) * 0.7
                             + rng.normal(0, 0.5, out.shape))
    if rng.random() < HARD_JPEG:
        quality = int(rng.integers(85, 96))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8)).save(
            buffer, format="JPEG", quality=quality)
        with Image.open(buffer) as decoded:
            out = np.asarray(decoded.convert("RGB"), dtype=np.float32)
    return out.astype(np.float32)

# Per domain: (lowest, highest) trace strength; a fake is blended as crop + s * (trace - crop)
# with s = low + (high - low) * u ** shape, u uniform: a share of each domain's fakes sit near
# `low`, where the trace is hard to see.
HARD_STRENGTH: dict[str, tuple[float, float, float]] = {
    "gan": (0.1, 1.0, 1.0),
    "diffusion": (0.1, 1.0, 1.0),
    "banding": (0.1, 1.0, 1.0),
    "resample": (0.05, 0.75, 1.3),
}


def trace_strength(domain: str, rng: np.random.Generator) -> float:
    low, high, shape = HARD_STRENGTH[domain]
    return float(low + (high - low) * rng.random() ** shape)


def render_hard(job: DemoJob, rng: np.random.Generator) -> np.ndarray:
    """The hard setting's pixels for one job (float32 HxWx3)."""
    pixels = camera_variation(real_crop(job), rng)
    if job.label == "fake":
        strength = trace_strength(job.domain, rng)
        traced = HARD_PIPELINES[job.domain](pixels, rng)
        pixels = pixels + np.float32(strength) * (traced - pixels)
    return pixels


def _deconv2x(low: np.ndarray, d: float, bias: float) -> np.ndarray:
    """One stride-2 transposed convolution with phase gains 1 +/- d and an alternating bias
    (as in `gan_upsampler`): `low` at half the output side in, the output out."""
    size = low.shape[0] * 2
    taps = np.array([0.25, 0.75, 0.75, 0.25]) * (1 + d * np.array([1, -1, 1, -1]))
    upsampled = np.zeros((size, size, 3), np.float32)
    upsampled[::2, ::2] = low
    kernel = np.outer(taps, taps)
    out = np.stack([ndimage.convolve(upsampled[..., c], kernel, mode="mirror")
                    for c in range(3)], axis=-1)
    return out + bias * _phase_gain(np.array([1.0, -1.0]), size)


def hard_gan_upsampler(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Two stacked stride-2 transposed convolutions from quarter resolution, as GAN generators
    stack them: the inner one's checkerboard repeats every 4 output pixels, the outer one's
    every 2; weaker phase gains than the default demo's."""
    size = pixels.shape[0]
    low = _resize(pixels, size // 4)
    half = _deconv2x(low, rng.uniform(0.06, 0.12), rng.uniform(1.0, 3.0))
    return _deconv2x(half, rng.uniform(0.04, 0.08), rng.uniform(1.0, 2.5))


def hard_diffusion_decoder(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`diffusion_decoder` with lighter re-noising (the smoothing shows through the noise) and
    the decoder's last 2x stage leaving a weaker 4-pixel ripple beside the 8-pixel one."""
    size = pixels.shape[0]
    sigma = rng.uniform(1.2, 2.0)
    smooth = ndimage.gaussian_filter(pixels, sigma=(sigma, sigma, 0))
    amplitude = rng.uniform(0.05, 0.08)
    phase = np.arange(8) + 0.5
    ripple = 1 + amplitude * (np.cos(2 * np.pi * phase / 8) + 0.5 * np.cos(2 * np.pi * phase / 4))
    level = rng.uniform(1.5, 3.5)
    noise = rng.normal(0.0, level, (size, size, 1)) + rng.normal(0.0, level * 0.35, pixels.shape)
    return smooth * _phase_gain(ripple, size) + noise.astype(np.float32)


# gan and diffusion get their hard variants; banding and resample keep the default traces.
HARD_PIPELINES: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    **PIPELINES, "gan": hard_gan_upsampler, "diffusion": hard_diffusion_decoder}


# ---------------------------------------------------------------------------------------------
# Measurements on the saved image


@dataclass(frozen=True)
class Traces:
    checker: float  # relative brightness ripple alternating pixel by pixel (0.05: +/-5%)
    grid4: float  # ripple along rows/columns repeating every 4 pixels, beyond the 2-pixel one
    grid8: float  # ripple along rows/columns repeating every 8 pixels, beyond the 4-pixel one
    blockiness: float  # mean step across 4-pixel block borders / mean step inside blocks
    level_fill: float  # share of the values between each channel's min and max that occur
    noise_evenness: float  # 10th / 90th percentile of local fine-residual spread (1: noise only)
    noise: float  # noise sigma estimate (Immerkaer), grey levels
    detail: float  # mean gradient after a sigma-1 blur (edges rather than noise)
    brightness: float  # mean luminance, 0..255


def measure(image: np.ndarray) -> Traces:
    """Measure the traces on a uint8 HxWx3 image (square, side a multiple of 8)."""
    grey = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    profiles = {period: _phase_profile(grey, period) for period in (2, 4, 8)}
    lines = {period: _line_profiles(profile) for period, profile in profiles.items()}
    laplace = ndimage.convolve(grey, np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]]))[1:-1, 1:-1]
    fills = [len(np.unique(channel)) / (int(channel.max()) - int(channel.min()) + 1)
             for channel in np.moveaxis(image, -1, 0)]
    return Traces(
        checker=float(profiles[2].std()),
        grid4=float((lines[4] - np.tile(lines[2], 2)).std()),
        grid8=float((lines[8] - np.tile(lines[4], 2)).std()),
        blockiness=_blockiness(grey, 4),
        level_fill=float(np.mean(fills)),
        noise_evenness=_noise_evenness(grey),
        noise=float(np.abs(laplace).mean() * np.sqrt(np.pi / 2) / 6),
        detail=float(np.hypot(*np.gradient(ndimage.gaussian_filter(grey, 1.0))).mean()),
        brightness=float(grey.mean()),
    )


def _phase_profile(grey: np.ndarray, period: int) -> np.ndarray:
    """Mean relative brightness of each pixel phase (y mod period, x mod period) against its
    surroundings. Scene content averages out over the phases; a gain or bias pattern tied to
    the pixel grid does not."""
    local = ndimage.uniform_filter(grey, period, mode="reflect")
    relative = grey / np.maximum(local, 16.0) - 1.0
    cells = grey.shape[0] // period
    profile = relative.reshape(cells, period, cells, period).mean(axis=(0, 2))
    return profile - profile.mean()


def _line_profiles(profile: np.ndarray) -> np.ndarray:
    """The row-phase and column-phase means side by side: each averages a whole line of cells,
    so a ripple along one axis stands out of the scene far better than in the 2-D profile."""
    return np.stack([profile.mean(axis=1), profile.mean(axis=0)])


def _blockiness(grey: np.ndarray, block: int) -> float:
    """Mean step across block borders over mean step inside blocks, rows and columns together."""
    steps = np.concatenate([np.abs(np.diff(grey, axis=0)), np.abs(np.diff(grey, axis=1)).T], axis=1)
    border = steps[block - 1::block].mean()
    inner = np.delete(steps, np.s_[block - 1::block], axis=0).mean()
    return float(border / (inner + 1e-6))


def _noise_evenness(grey: np.ndarray) -> float:
    """Camera photos are clean in flat areas and busy in textured ones; re-noised images carry
    the same noise everywhere."""
    residual = grey - ndimage.gaussian_filter(grey, 1.0)
    cells = residual.shape[0] // 8
    spread = residual.reshape(cells, 8, cells, 8).std(axis=(1, 3))
    return float(np.percentile(spread, 10) / (np.percentile(spread, 90) + 1e-6))


# ---------------------------------------------------------------------------------------------
# Reasoning text. Each group's sentence is chosen from what was measured; wording alternatives
# are drawn with the image's seeded RNG. Real sentences carry real evidence of the PRPO lexicon
# (natural, consistent, authentic, realistic texture, fine detail, negated fake terms such as
# "no visible artifacts"); fake sentences carry fake evidence (artifact, synthetic, unnatural,
# overly smooth, blurry edges, inconsistent lighting, repetitive pattern) and name the trace
# (checkerboard, banding, grid), so every paragraph's label equals the answer.

GROUP_ORDER = ("Texture", "Lighting", "Edges", "Noise", "Frequency", "Colour")

# Trace thresholds from the measured spread over real crops at 96 px: the checkerboard and
# banding ones are never reached by a real crop, the grid ones rarely (regular roof tiles and
# windows); a real crop over any of them gets no Frequency paragraph.
CHECKER = 0.03  # reals <= 0.011, gan fakes >= 0.09
GRID4 = 0.03  # reals <= 0.025, resample fakes >= 0.04
GRID8 = 0.025  # reals: median 0.008, 1 in 14 above; diffusion fakes >= 0.026
BLOCKY = 1.3  # reals <= 1.25
BANDED_FILL = 0.45  # reals >= 0.52, banding fakes <= 0.37
EVEN_NOISE = 0.45  # reals: 1 in 17 above, all with noise < FAINT_NOISE; diffusion >= 0.48
CRISP_DETAIL = 6.0
FAINT_NOISE = 3.0  # diffusion fakes >= 3.9
BRIGHT = 110.0

Wordings = list[str]
Evidence = list[tuple[float, str, Wordings]]


def _pick(rng: np.random.Generator, options: Wordings) -> str:
    return options[int(rng.integers(len(options)))]


def fake_evidence(t: Traces) -> Evidence:
    """(strength, group, wordings) for each generator trace the measurements show, strongest
    first; strength is the measurement over its threshold (> 1)."""
    checker = t.checker / CHECKER
    banded = BANDED_FILL / max(t.level_fill, 1e-3)
    blocky = max(t.blockiness / BLOCKY, t.grid4 / GRID4) if banded <= 1 else 0.0
    renoised = max(checker, banded) <= 1 and t.noise > FAINT_NOISE
    even = t.noise_evenness / EVEN_NOISE if renoised else 0.0
    found: Evidence = []
    if checker > 1:
        found += _checkerboard_evidence(checker)
    if banded > 1:
        found += _banding_evidence(banded)
    if blocky > 1:
        found += _block_evidence(blocky)
    if t.grid8 > GRID8:
        found.append((t.grid8 / GRID8, "Frequency", [
            "A faint grid repeats every 8 pixels across the whole image, a decoder artifact.",
            "The spectrum holds an 8-pixel repetitive pattern, left by the image decoder.",
        ]))
    if even > 1:
        found += _renoise_evidence(even)
    return sorted(found, key=lambda item: -item[0])


def _checkerboard_evidence(strength: float) -> Evidence:
    return [
        (strength, "Frequency", [
            "Neighbouring pixels alternate in brightness, a checkerboard upsampling artifact.",
            "A periodic checkerboard sits at the pixel grid frequency, a typical upsampling "
            "artifact.",
        ]),
        (strength * 0.9, "Texture", [
            "Fine texture is overlaid by a faint checkerboard that looks synthetic.",
            "Surfaces carry a synthetic grid of alternating bright and dark pixels.",
        ]),
    ]


def _banding_evidence(strength: float) -> Evidence:
    return [
        (strength, "Colour", [
            "Gradients break into banding with only a few colour levels, a synthetic look.",
            "Colour banding replaces smooth gradients with flat steps, a clear artifact.",
        ]),
        (strength * 0.9, "Lighting", [
            "Shading jumps between flat plateaus instead of falling off, giving inconsistent "
            "lighting.",
            "Light falloff is stepped rather than smooth, an inconsistent lighting.",
        ]),
        (strength * 0.8, "Texture", [
            "Surfaces collapse into flat patches covered by a dotted, synthetic pattern.",
            "Texture is lost in posterised areas with a repetitive pattern of dots.",
        ]),
    ]


def _block_evidence(strength: float) -> Evidence:
    return [
        (strength, "Edges", [
            "Edges are jagged and stair-stepped in 4-pixel blocks, an upsampling artifact.",
            "Contours break into blocky steps, an unnatural resampling artifact.",
        ]),
        (strength * 0.9, "Frequency", [
            "Pixels repeat in 4-pixel blocks, a repetitive pattern left by resampling.",
            "A regular 4-pixel grid covers the image, a repetitive pattern from upsampling.",
        ]),
        (strength * 0.8, "Texture", [
            "Texture is blocky and coarse, as if synthetic pixels were duplicated.",
            "Fine structure is missing, replaced by a repetitive pattern of blocks.",
        ]),
    ]


def _renoise_evidence(strength: float) -> Evidence:
    return [
        (strength, "Texture", [
            "Surfaces look overly smooth, as if small structures were painted over.",
            "Texture is overly smooth, with small structures washed out.",
        ]),
        (strength * 0.9, "Noise", [
            "An even, synthetic noise covers flat and busy areas alike.",
            "The noise is uniform and synthetic, laid over a smooth base.",
        ]),
        (strength * 0.8, "Edges", [
            "Outlines show blurry edges, an unnatural softness for this scene.",
            "Contours are soft and smeared, with blurry edges throughout.",
        ]),
    ]


# For a fake whose measurements show fewer traces than the text needs (a flat, dark crop).
_FAKE_FALLBACK: dict[str, Wordings] = {
    "Lighting": ["The lighting looks flat and unnatural for this scene.",
                 "Light falloff looks synthetic, too even across the frame."],
    "Edges": ["Edges show a faint unnatural halo.",
              "Outlines look synthetic and slightly soft."],
    "Texture": ["Texture looks synthetic and uniform, without real variation.",
                "Surfaces have an unnatural sameness."],
}


def real_evidence(t: Traces) -> dict[str, Wordings]:
    """Real-evidence wordings per group, chosen by the measurements; a group whose measurement
    looks like a generator trace is left out, so the text never contradicts the image."""
    crisp = t.detail > CRISP_DETAIL
    groups: dict[str, Wordings] = {
        "Texture": [
            "Detail is dense and varied, a realistic texture with fine detail everywhere.",
            "Surfaces vary in a natural way, with realistic texture throughout.",
        ] if crisp else [
            "Surfaces are soft but keep a realistic texture with natural variation.",
            "Gentle surfaces still carry realistic texture, without any repetitive pattern.",
        ],
        "Lighting": [
            "Lighting is bright and consistent, with natural highlights and shadows.",
            "Highlights and shadows are consistent with one natural light source.",
        ] if t.brightness > BRIGHT else [
            "Lighting is dim but consistent, and the shadows fall in a natural way.",
            "Shadows are deep yet consistent, lit by one natural source.",
        ],
        "Edges": [
            "Edges are crisp and authentic, with no halo and no warping.",
            "Boundaries hold fine detail, with no blurry edges anywhere.",
        ] if crisp else [
            "Boundaries are soft from depth of field, with no visible artifacts.",
            "Edges are gentle but consistent, without any warping.",
        ],
        "Noise": [
            "Only faint, natural sensor noise is present, as a camera leaves it.",
            "Noise is low and consistent with a camera's sensor noise.",
        ] if t.noise < FAINT_NOISE else [
            "A fine natural grain follows the scene content, as sensor noise does.",
            "The grain is natural, stronger in busy areas than in flat ones.",
        ],
    }
    if max(t.checker / CHECKER, t.grid4 / GRID4, t.grid8 / GRID8, t.blockiness / BLOCKY) <= 1:
        groups["Frequency"] = [
            "The spectrum falls off smoothly, with no periodic artifacts from upsampling.",
            "High frequencies hold only natural detail, without any repetitive pattern.",
        ]
    if t.level_fill > BANDED_FILL:
        groups["Colour"] = [
            "Colours shift in natural, continuous gradients, free of banding.",
            "The palette is rich and natural, with no posterised steps.",
        ]
    return groups


def write_reasoning(traces: Traces, label: str, rng: np.random.Generator) -> str:
    """3-4 `**Group**: ...` paragraphs from the measurements, then `### Answer: <label>`."""
    count = 4 if rng.random() < 0.7 else 3
    paragraphs: dict[str, str] = {}
    if label == "real":
        groups = real_evidence(traces)
        for group in rng.choice(sorted(groups), size=min(count, len(groups)), replace=False):
            paragraphs[str(group)] = _pick(rng, groups[group])
    else:
        evidence = [(group, wordings) for _, group, wordings in fake_evidence(traces)]
        for group, wordings in evidence + list(_FAKE_FALLBACK.items()):
            if group not in paragraphs and len(paragraphs) < count:
                paragraphs[group] = _pick(rng, wordings)
    body = [f"**{group}**: {paragraphs[group]}" for group in GROUP_ORDER if group in paragraphs]
    return "\n\n".join(body + [f"### Answer: {label}"])
