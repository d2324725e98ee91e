"""The demo data's reasoning texts: properties measured on each saved image (grid ripples,
blockiness, colour-level coverage, noise, detail, brightness) written up in the evidence vocabulary
of the PRPO lexicon (METHOD.md §9), so every text agrees with what the image shows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


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

