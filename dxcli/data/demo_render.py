"""The demo data's pictures: crops of the sample photographs, the simulated generator traces of
each domain, and the hard setting's camera variations and graded strengths (see `dxcli.data.demo`)."""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from dxcli.base.errors import DxError

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
    return _latent_decoder(pixels, rng, sigma_low=1.3, noise=(4.0, 7.0), ripple4=0.0)


def _latent_decoder(pixels: np.ndarray, rng: np.random.Generator, *, sigma_low: float,
                    noise: tuple[float, float], ripple4: float) -> np.ndarray:
    """Smoothing with sigma in [sigma_low, 2], an 8-pixel ripple (plus `ripple4` times a 4-pixel
    one, the decoder's last 2x stage), and re-noising at a level drawn from `noise`; the
    diffusion traces differ only in these."""
    size = pixels.shape[0]
    sigma = rng.uniform(sigma_low, 2.0)
    smooth = ndimage.gaussian_filter(pixels, sigma=(sigma, sigma, 0))
    phase = np.arange(8) + 0.5
    ripple = 1 + rng.uniform(0.05, 0.08) * (np.cos(2 * np.pi * phase / 8) + ripple4 * np.cos(2 * np.pi * phase / 4))
    level = rng.uniform(*noise)
    grain = rng.normal(0.0, level, (size, size, 1)) + rng.normal(0.0, level * 0.35, pixels.shape)
    return smooth * _phase_gain(ripple, size) + grain.astype(np.float32)


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


def draw_hard_crop(rng: np.random.Generator, size: int, used: set[tuple]
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
# `low`, where the trace is faint.
HARD_STRENGTH: dict[str, tuple[float, float, float]] = {
    "gan": (0.3, 1.0, 1.0),
    "diffusion": (0.3, 1.0, 1.0),
    "banding": (0.3, 1.0, 1.0),
    "resample": (0.3, 1.0, 1.0),
}


def trace_strength(domain: str, rng: np.random.Generator) -> float:
    low, high, shape = HARD_STRENGTH[domain]
    return float(low + (high - low) * rng.random() ** shape)


# Share of each domain's fakes made by its generator's shared variant (with a 4x stage, whose
# period-4 trace all four domains have in common); the others come from its private variant,
# whose trace no other domain has. A detector trained on three domains finds the fourth's fakes
# only through the shared family, so this share bounds its held-out recall.
HARD_SHARED_SHARE = 0.6


def render_hard(job: DemoJob, rng: np.random.Generator) -> np.ndarray:
    """The hard setting's pixels for one job (float32 HxWx3)."""
    pixels = camera_variation(real_crop(job), rng)
    if job.label == "fake":
        variant, strength = _draw_trace(job.domain, rng)
        pipeline = (HARD_PIPELINES if variant == "shared" else HARD_PRIVATE_PIPELINES)[job.domain]
        traced = pipeline(pixels, rng)
        pixels = pixels + np.float32(strength) * (traced - pixels)
    return pixels


def _draw_trace(domain: str, rng: np.random.Generator) -> tuple[str, float]:
    strength = trace_strength(domain, rng)
    return ("shared" if rng.random() < HARD_SHARED_SHARE else "private"), strength


def hard_fake_trace(job: DemoJob) -> tuple[str, float]:
    """(variant, strength) that `render_hard` drew for a hard fake: the same draws replayed, so
    benches can split results by variant without the data having to record it."""
    if not (job.hard and job.label == "fake"):
        raise ValueError(f"{job.rel}: not a hard-setting fake")
    rng = np.random.default_rng(job.seed)
    camera_variation(real_crop(job), rng)
    return _draw_trace(job.domain, rng)


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
    return _latent_decoder(pixels, rng, sigma_low=1.2, noise=(1.5, 3.5), ripple4=0.5)


# gan and diffusion get their hard variants; banding and resample keep the default traces.
HARD_PIPELINES: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    **PIPELINES, "gan": hard_gan_upsampler, "diffusion": hard_diffusion_decoder}


# The private variants: the same generator kinds without a 4x stage, each leaving a trace of
# its own: gan a single period-2 checkerboard, diffusion an 8-pixel ripple only, banding flat
# undithered plateaus, resample a 1.5x bicubic upscale (softness, no fixed grid).


def private_gan_upsampler(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One stride-2 transposed convolution from half resolution: period 2 only."""
    low = _resize(pixels, pixels.shape[0] // 2)
    return _deconv2x(low, rng.uniform(0.08, 0.14), rng.uniform(2.0, 4.0))


def private_diffusion_decoder(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`hard_diffusion_decoder` without the 4-pixel ripple of its last 2x stage."""
    return _latent_decoder(pixels, rng, sigma_low=1.2, noise=(1.5, 3.5), ripple4=0.0)


def private_posterise(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`colour_banding` without the dither: flat plateaus and stepped contours, no crosshatch."""
    smooth = ndimage.gaussian_filter(pixels, sigma=(1.0, 1.0, 0))
    step = 255.0 / (int(rng.integers(6, 10)) - 1)
    return np.floor(smooth / step + 0.5) * step


def private_bicubic_upscale(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Made at two thirds of the resolution and upscaled 1.5x by bicubic interpolation, with a
    little sharpening: soft detail and halos, no grid aligned with the pixels."""
    size = pixels.shape[0]
    up = _resize(_resize(pixels, int(round(size * 2 / 3))), size, Image.BICUBIC)
    blurred = ndimage.gaussian_filter(up, sigma=(1.0, 1.0, 0))
    return up + rng.uniform(0.3, 0.6) * (up - blurred)


HARD_PRIVATE_PIPELINES: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "gan": private_gan_upsampler, "diffusion": private_diffusion_decoder,
    "banding": private_posterise, "resample": private_bicubic_upscale}


# ---------------------------------------------------------------------------------------------


def draw_crop(rng: np.random.Generator, size: int, used: set[tuple]
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
