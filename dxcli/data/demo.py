"""The built-in demo data: a small SPEC section 3 tree with reasoning, made offline in seconds.

Real images are crops, at varied positions and scales, of the two photographs scikit-learn ships
(`china.jpg`, `flower.jpg`). Fake images are other crops of the same photographs passed through a
simulated generator pipeline, one per domain, each leaving a trace real generators leave:

- `gan`: a transposed-convolution (stride 2) upsampler whose kernel phases have unequal gains,
  which prints a periodic checkerboard (spectral peaks at the Nyquist frequency);
- `diffusion`: a decoder that over-smooths and then re-noises (detail gone, uniform noise added);
- `banding`: smooth output quantised to a few colour levels per channel (banding, flat plateaus);
- `resample`: a low-resolution image brought up by nearest-neighbour upsampling (3x3 blocks).

Every image gets a DF-R5-style reasoning text written from properties measured on the saved image
(periodic spectral peaks, noise level, detail, colour-level coverage, flat pixels), in the
evidence vocabulary of the PRPO lexicons (SPEC section 4). This is a pipeline check, not a
deepfake benchmark: the traces are deliberately strong so tiny models learn them in minutes.
"""

from __future__ import annotations

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

from dxcli.data.tree import LABELS, SPLITS
from dxcli.errors import UsageError
from dxcli.jsonio import write_jsonl_atomic

DOMAINS = ("gan", "diffusion", "banding", "resample")
PHOTOS = ("china.jpg", "flower.jpg")
REASONING_FILE = "reasoning.jsonl"
MIN_SIZE, MAX_SIZE = 32, 256
_MIN_CROP = 128  # crops are always downscaled (>= 1.33x), which erases the photos' JPEG grid
_PHOTO_SIDE = 427  # both photos are 427 x 640


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
) -> dict:
    """Write the demo tree and `OUT/reasoning.jsonl`; return a summary.

    `n_*` count images per domain (half real, half fake). A non-empty OUT is refused unless
    `overwrite`, which first removes the demo's own domain folders (nothing else). The same seed
    gives byte-identical files, whatever the number of `workers` (default: all cores).
    """
    started = time.perf_counter()
    out = Path(out)
    counts_per_split = _validate(out, n_train=n_train, n_val=n_val, n_test=n_test, size=size,
                                 overwrite=overwrite)
    if overwrite:
        for domain in DOMAINS:
            shutil.rmtree(out / domain, ignore_errors=True)
    jobs = plan_jobs(seed=seed, counts_per_split=counts_per_split, size=size)
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
        "domains": list(DOMAINS),
        "counts": counts,
        "images": len(jobs),
        "bytes": sum(nbytes for _, nbytes, _ in results) + (out / REASONING_FILE).stat().st_size,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _validate(out: Path, *, n_train: int, n_val: int, n_test: int, size: int,
              overwrite: bool) -> dict[str, int]:
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


def plan_jobs(*, seed: int, counts_per_split: dict[str, int], size: int) -> list[DemoJob]:
    rng = np.random.default_rng(seed)
    used: set[tuple] = set()
    jobs = []
    for domain in DOMAINS:
        for split in SPLITS:
            per_label = counts_per_split[split] // 2
            for label in LABELS:
                for index in range(per_label):
                    photo, box, flip = _draw_crop(rng, size, used)
                    name = f"{domain}-{split}-{label}-{index:04d}.png"
                    jobs.append(DemoJob(domain, split, label, f"{domain}/{split}/{label}/{name}",
                                        photo, box, flip, size, int(rng.integers(2**62))))
    return jobs


def _draw_crop(rng: np.random.Generator, size: int, used: set[tuple]
               ) -> tuple[str, tuple[int, int, int], bool]:
    """A square crop (log-uniform side) not used before; height 427, width 640."""
    low = max(_MIN_CROP, int(np.ceil(size * 4 / 3)))
    while True:
        side = int(round(np.exp(rng.uniform(np.log(low), np.log(_PHOTO_SIDE)))))
        photo = PHOTOS[int(rng.integers(len(PHOTOS)))]
        left = int(rng.integers(0, 640 - side + 1))
        top = int(rng.integers(0, _PHOTO_SIDE - side + 1))
        flip = bool(rng.integers(2))
        key = (photo, left, top, side, flip)
        if key not in used:
            used.add(key)
            return photo, (left, top, side), flip


# ---------------------------------------------------------------------------------------------
# Rendering


@lru_cache(maxsize=None)
def _photo(name: str) -> Image.Image:
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image(name))


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
    pixels = real_crop(job)
    if job.label == "fake":
        pixels = PIPELINES[job.domain](pixels, rng)
    image = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    path = Path(out) / job.rel
    Image.fromarray(image).save(path, format="PNG", compress_level=9)
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
    bias = rng.uniform(3.0, 6.0) * _phase_gain(np.array([1.0, -1.0]), size)
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
    threshold = 0.5 + 0.6 * (np.tile(_DOT4, (size // 4, size // 4)) - 0.5)
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
# Measurements on the saved image


@dataclass(frozen=True)
class Traces:
    peak_ratio: float  # strongest high-frequency spectral peak / median high-frequency power
    peak_period: float  # period in pixels of that peak
    noise: float  # Immerkaer noise sigma estimate (grey levels)
    detail: float  # mean gradient magnitude after a sigma-1 blur (edges, not noise)
    level_fill: float  # share of grey levels used between each channel's min and max
    flat_share: float  # share of neighbour pairs with exactly equal RGB values
    brightness: float  # mean luminance, 0..255


def measure(image: np.ndarray) -> Traces:
    pixels = image.astype(np.float64)
    grey = pixels @ np.array([0.299, 0.587, 0.114])
    peak_ratio, peak_period = _spectral_peak(grey)
    laplace = ndimage.convolve(grey, np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]]))[1:-1, 1:-1]
    noise = float(np.abs(laplace).mean() * np.sqrt(np.pi / 2) / 6)
    blurred = ndimage.gaussian_filter(grey, 1.0)
    detail = float(np.hypot(*np.gradient(blurred)).mean())
    fills = []
    for channel in np.moveaxis(image, -1, 0):
        span = int(channel.max()) - int(channel.min()) + 1
        fills.append(len(np.unique(channel)) / span)
    equal_x = np.all(image[:, 1:] == image[:, :-1], axis=-1).mean()
    equal_y = np.all(image[1:] == image[:-1], axis=-1).mean()
    return Traces(peak_ratio, peak_period, noise, detail, float(np.mean(fills)),
                  float((equal_x + equal_y) / 2), float(grey.mean()))


def _spectral_peak(grey: np.ndarray) -> tuple[float, float]:
    """Periodic traces show as isolated peaks in the high-frequency power spectrum."""
    size = grey.shape[0]
    highpass = grey - ndimage.uniform_filter(grey, 5, mode="reflect")
    power = np.abs(np.fft.fft2(highpass)) ** 2
    freq = np.fft.fftfreq(size)
    radius = np.hypot(freq[:, None], freq[None, :])
    band = radius >= 0.25
    values = power[band]
    index = int(np.argmax(values))
    ratio = float(values[index] / (np.median(values) + 1e-9))
    return ratio, float(1.0 / radius[band][index])


# ---------------------------------------------------------------------------------------------
# Reasoning text. Each group picks a sentence from what was measured; wording alternatives are
# drawn with the image's seeded RNG. Real sentences carry real evidence (natural, consistent,
# realistic texture, sharp detail, natural noise, negated fake terms); fake sentences carry fake
# evidence (artifact, synthetic, checkerboard, banding, overly smooth, ...), so the paragraphs'
# majority label always equals the answer.

GROUP_ORDER = ("Texture", "Lighting", "Edges", "Noise", "Frequency", "Colour")

# thresholds from the measured spread of real crops (see tests/test_demo.py)
PERIODIC_RATIO = 60.0
BANDED_FILL = 0.3
FLAT_SHARE = 0.3
SMOOTH_DETAIL_PER_NOISE = 2.5


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _real_sentences(t: Traces, rng: np.random.Generator) -> dict[str, str]:
    sharp = t.detail > 6.0
    return {
        "Texture": _pick(rng, [
            "Fine detail is dense and irregular, a realistic texture with sharp detail.",
            "Surfaces vary in an irregular, natural way, a realistic texture throughout.",
        ] if sharp else [
            "Surfaces are soft but keep a realistic texture with natural variation.",
            "Gentle surfaces still carry a realistic texture, free of repetitive pattern.",
        ]),
        "Lighting": _pick(rng, [
            "Lighting is bright and consistent, with natural highlights.",
            "Highlights and shadows are consistent with one natural light source.",
        ] if t.brightness > 110 else [
            "Lighting is dim but consistent, and the shadows fall in a natural way.",
            "Shadows are deep yet consistent, lit by one natural source.",
        ]),
        "Edges": _pick(rng, [
            "Edges are crisp and authentic, without any warping.",
            "Boundaries show sharp detail with no blurry edges.",
        ] if sharp else [
            "Boundaries are soft from focus, yet authentic, with no visible artifacts.",
            "Edges are gentle but consistent, without any warping.",
        ]),
        "Noise": _pick(rng, [
            "Only faint natural noise is present, even across the frame.",
            "Noise is low and consistent, the natural noise of a camera.",
        ] if t.noise < 3.0 else [
            "A fine grain of natural noise follows the scene content.",
            "The grain is natural noise, consistent across the frame.",
        ]),
        "Frequency": _pick(rng, [
            "The spectrum falls off smoothly with no checkerboard peaks.",
            "High frequencies hold natural noise, without any repetitive pattern.",
        ]),
        "Colour": _pick(rng, [
            "Colours shift in natural, continuous gradients, free of banding.",
            "The palette is rich and natural with no banding.",
        ]),
    }


def _fake_sentences(t: Traces) -> list[tuple[float, str, list[str]]]:
    """(strength, group, wordings) for each trace the measurements show, strongest first."""
    found: list[tuple[float, str, list[str]]] = []
    periodic = t.peak_ratio / PERIODIC_RATIO
    if periodic > 1 and t.peak_period < 2.5:
        found += [
            (periodic, "Frequency", [
                "A periodic checkerboard grid shows in the spectrum, an upsampling artifact.",
                "Spectral peaks at the pixel grid reveal a checkerboard artifact.",
            ]),
            (periodic * 0.9, "Texture", [
                "Fine texture carries a faint checkerboard that looks synthetic.",
                "Surfaces are covered by a synthetic grid of alternating pixels.",
            ]),
        ]
    elif periodic > 1:
        found += [
            (periodic, "Frequency", [
                "Strong periodic peaks form a repetitive pattern left by resampling.",
                "The spectrum shows a repetitive pattern, a resampling artifact.",
            ]),
        ]
    flat = t.flat_share / FLAT_SHARE
    if flat > 1 and t.level_fill >= BANDED_FILL:
        found += [
            (flat, "Edges", [
                "Edges are jagged and stair-stepped, an upsampling artifact.",
                "Contours break into blocky steps, an unnatural artifact.",
            ]),
            (flat * 0.8, "Texture", [
                "Texture is blocky, a repetitive pattern of duplicated pixels.",
                "Pixels repeat in small blocks, a synthetic, repetitive pattern.",
            ]),
        ]
    banded = BANDED_FILL / max(t.level_fill, 1e-3)
    if banded > 1:
        found += [
            (banded, "Colour", [
                "Gradients break into visible banding with few colour levels.",
                "Colour banding replaces smooth gradients with flat steps.",
            ]),
            (banded * 0.9, "Lighting", [
                "Shading jumps between flat plateaus, an inconsistent lighting.",
                "Light falloff is stepped, giving inconsistent lighting.",
            ]),
            (banded * 0.8, "Texture", [
                "Surfaces collapse into flat, synthetic patches.",
                "Texture is lost in overly smooth, posterised areas.",
            ]),
        ]
    smooth = SMOOTH_DETAIL_PER_NOISE / max(t.detail / max(t.noise, 0.5), 1e-3)
    if smooth > 1:
        found += [
            (smooth, "Texture", [
                "Surfaces look overly smooth, with fine detail washed out.",
                "Texture is overly smooth, as if painted over.",
            ]),
            (smooth * 0.9, "Noise", [
                "The noise is uniform and synthetic, laid over a smooth base.",
                "An even synthetic noise covers everything, unrelated to the content.",
            ]),
            (smooth * 0.8, "Edges", [
                "Blurry edges: contours are soft and smeared.",
                "Object outlines show blurry edges, an unnatural softness.",
            ]),
        ]
    return sorted(found, key=lambda item: -item[0])


_FAKE_FALLBACK = {
    "Lighting": ["The lighting looks flat and unnatural.", "Light falloff looks synthetic."],
    "Edges": ["Edges show a faint unnatural halo.", "Outlines look synthetic and slightly soft."],
    "Texture": ["Texture looks synthetic and uniform.", "Surfaces have an unnatural sameness."],
}


def write_reasoning(traces: Traces, label: str, rng: np.random.Generator) -> str:
    """3-4 `**Group**: ...` paragraphs from the measurements, then `### Answer: <label>`."""
    count = 3 + int(rng.integers(2))
    if label == "real":
        sentences = _real_sentences(traces, rng)
        chosen = rng.choice(GROUP_ORDER, size=count, replace=False)
        paragraphs = {group: sentences[group] for group in chosen}
    else:
        paragraphs = {}
        for _, group, wordings in _fake_sentences(traces):
            if group not in paragraphs and len(paragraphs) < count:
                paragraphs[group] = _pick(rng, wordings)
        for group, wordings in _FAKE_FALLBACK.items():
            if group not in paragraphs and len(paragraphs) < count:
                paragraphs[group] = _pick(rng, wordings)
    body = [f"**{group}**: {paragraphs[group]}" for group in GROUP_ORDER if group in paragraphs]
    return "\n\n".join(body + [f"### Answer: {label}"])
