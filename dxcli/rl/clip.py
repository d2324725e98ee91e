"""VCR's frozen CLIP (METHOD.md §10): transformers' CLIPModel or open_clip behind one scorer.

`prpo.clip` / `--clip` names it:
- a transformers CLIPModel folder (model, tokenizer and image processor saved together) or hub id;
- `open_clip:ARCH[:PRETRAINED_OR_FILE]`: an open_clip architecture, a built-in name (the paper's
  `convnext_large_d_320`) or a path to a model-config JSON, with its weights: an open_clip tag
  (`laion2b_s29b_b131k_ft_soup`) or a local weights file; without it the weights are random (tests
  only). Needs `pip install "dxcli[clip]"`. A tag's weights are read from the local cache (the
  Hugging Face hub cache, or ~/.cache/clip for open_clip's URL-hosted ones): nothing is downloaded
  while training, so a missing file fails in one line with the command that fetches it. With
  model.download=true the parent process fetches it once, before any worker starts.

Either way the embeddings are unit-norm float32, an image is embedded once and reused for every
keyword, and all keywords of a step go through one batched text pass.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dxcli.base.errors import DxError

if TYPE_CHECKING:
    import torch
    from PIL import Image

OPEN_CLIP_PREFIX = "open_clip:"
OPEN_CLIP_INSTALL = 'pip install "dxcli[clip]"'
WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".npz")


class ClipScorer:
    """A frozen CLIP (`CLIPModel`) scoring keyword phrases against images."""

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, device: Any = "cpu",
                 name: str = "CLIPModel") -> None:
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.device = device
        self.name = name  # what the run's first line calls it
        self.max_text_length = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def load(cls, name_or_path: str | Path, device: Any = "cpu") -> ClipScorer:
        """From a local folder (model + tokenizer + image processor saved together) or a hub id."""
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        source = str(name_or_path)
        if source.startswith((".", "/", "~")):  # a local folder, never a hub id
            source = str(Path(source).expanduser())
            if not Path(source).is_dir():
                raise DxError(f"no such CLIP model folder: {source}")
        try:
            model = CLIPModel.from_pretrained(source)
            tokenizer = AutoTokenizer.from_pretrained(source)
            image_processor = AutoImageProcessor.from_pretrained(source)
        except (OSError, ValueError, KeyError) as exc:
            raise DxError(f"cannot load a CLIP model from '{source}': {_first_line(exc)}") from None
        return cls(model, tokenizer, image_processor, device, name=f"CLIPModel {source}")

    def image_embeddings(self, images: list[Image.Image]) -> torch.Tensor:
        """[N, D] unit-norm embeddings; compute once per image and reuse for every keyword."""
        import torch

        if not images:
            return torch.empty(0, self.model.config.projection_dim, device=self.device)
        pixels = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        with torch.no_grad():
            out = self.model.get_image_features(pixel_values=pixels["pixel_values"].to(self.device))
        return _unit(out)

    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """[K, D] unit-norm embeddings from one batched text forward."""
        import torch

        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_text_length,
                               return_tensors="pt")
        with torch.no_grad():
            out = self.model.get_text_features(input_ids=batch["input_ids"].to(self.device),
                                               attention_mask=batch["attention_mask"].to(self.device))
        return _unit(out)

    def vcr(self, image_emb: torch.Tensor, keywords: list[str]) -> torch.Tensor:
        """(cos + 1) / 2 per keyword, in [0, 1], all keywords in one text pass.

        `image_emb` is one embedding [D] (or [1, D]) shared by all keywords, or [K, D]: the
        image of each keyword (index the per-image embeddings to batch a whole step).
        """
        import torch

        if not keywords:
            return torch.empty(0, device=image_emb.device)
        text = self.text_embeddings(keywords)
        image = image_emb.to(text).reshape(-1, text.shape[-1])
        if image.shape[0] not in (1, text.shape[0]):
            raise ValueError(f"{image.shape[0]} image embeddings for {text.shape[0]} keywords")
        return ((image * text).sum(-1).clamp(-1.0, 1.0) + 1.0) / 2.0

    def group_vcr(self, image_embs: torch.Tensor, groups: list[list[Any]]) -> list[list[list[float]]]:
        """VCR of every paragraph of every response of every image, in ONE text pass.

        `image_embs[n]` is image n's embedding and `groups[n]` its scored responses (each with
        `keywords`, as `rewards.ResponseScore`); the result is indexed [image][response][paragraph].
        """
        keywords, owners = [], []
        for n, group in enumerate(groups):
            for score in group:
                keywords += score.keywords
                owners += [n] * len(score.keywords)
        if not keywords:
            return [[[] for _ in group] for group in groups]
        values = self.vcr(image_embs[owners], keywords).tolist()
        result, cursor = [], 0
        for group in groups:
            per_image = []
            for score in group:
                per_image.append(values[cursor : cursor + len(score.keywords)])
                cursor += len(score.keywords)
            result.append(per_image)
        return result


class OpenClipScorer(ClipScorer):
    """The same scorer on an open_clip model: only the two encoders and their inputs differ."""

    def __init__(self, model: Any, tokenizer: Any, preprocess: Any, device: Any = "cpu",
                 name: str = "open_clip") -> None:
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = tokenizer  # open_clip's: pads and truncates to the model's context length
        self.preprocess = preprocess  # open_clip's inference transform for one PIL image
        self.device = device
        self.name = name

    @classmethod
    def load(cls, spec: str | Path, device: Any = "cpu", download: bool = False) -> OpenClipScorer:
        """From `open_clip:ARCH[:PRETRAINED_OR_FILE]` (see the module's docstring); a tag's weights
        come from the local cache unless `download` (the hub is offline for open_clip otherwise)."""
        spec = str(spec)
        parsed = parse_open_clip(spec)
        open_clip = _import_open_clip(spec)
        arch = registered_arch(open_clip, parsed.arch)
        try:
            with _hub_offline() if not download else nullcontext():
                model, _, preprocess = open_clip.create_model_and_transforms(
                    arch, pretrained=parsed.local_pretrained(), device=device)
            tokenizer = open_clip.get_tokenizer(arch)
        except (RuntimeError, OSError, ValueError, KeyError) as exc:
            raise DxError(f"cannot load open_clip model '{spec}': {_first_line(exc)}") from None
        return cls(model, tokenizer, preprocess, device,
                   name=f"open_clip {arch} ({parsed.pretrained or 'random weights'})")

    def image_embeddings(self, images: list[Image.Image]) -> torch.Tensor:
        import torch

        if not images:
            return torch.empty(0, 0, device=self.device)  # nothing to score; the width is never read
        pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)
        with torch.no_grad():
            return _unit(self.model.encode_image(pixels))

    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        import torch

        with torch.no_grad():
            return _unit(self.model.encode_text(self.tokenizer(texts).to(self.device)))


@dataclass(frozen=True)
class OpenClipSpec:
    arch: str  # a built-in open_clip name or a path to a model-config JSON
    pretrained: str | None  # an open_clip tag or a local weights file; None: random weights

    def local_pretrained(self) -> str | None:
        """`pretrained` with a file path expanded (open_clip takes a tag or an existing file)."""
        if self.pretrained and _is_path(self.pretrained):
            return str(Path(self.pretrained).expanduser())
        return self.pretrained


def parse_open_clip(spec: str) -> OpenClipSpec | None:
    """The parts of `open_clip:ARCH[:PRETRAINED_OR_FILE]`; None for a transformers CLIP."""
    if not spec.startswith(OPEN_CLIP_PREFIX):
        return None
    arch, _, pretrained = spec[len(OPEN_CLIP_PREFIX):].partition(":")
    if not arch:
        raise DxError(f"--clip {spec}: name the architecture: open_clip:ARCH[:PRETRAINED_OR_FILE]")
    return OpenClipSpec(arch, pretrained or None)


def check_clip_spec(spec: str, download: bool = False) -> None:
    """What can be checked before any worker starts, without loading a model: the spec's form, the
    open_clip extra, local files, and that an open_clip tag's weights are in the local cache
    (fetched here, once, when `download`: model.download=true)."""
    parsed = parse_open_clip(spec)
    if parsed is None:
        if not Path(spec).expanduser().exists() and "/" not in spec:
            raise DxError(f"prpo.clip={spec}: not a folder, a hub id nor open_clip:ARCH[:PRETRAINED_OR_FILE]")
        return
    if importlib.util.find_spec("open_clip") is None:
        raise DxError(f"--clip {spec} needs open_clip: {OPEN_CLIP_INSTALL}")
    if parsed.arch.endswith(".json") and not Path(parsed.arch).expanduser().is_file():
        raise DxError(f"--clip {spec}: no such open_clip model config: {parsed.arch}")
    weights = parsed.local_pretrained()
    if weights and _is_path(weights) and not Path(weights).is_file():
        raise DxError(f"--clip {spec}: no such weights file: {weights}")
    if weights and not _is_path(weights):
        _check_cached_tag(spec, parsed, download)


def load_clip(spec: str | Path, device: Any = "cpu", download: bool = False) -> ClipScorer:
    """The scorer `prpo.clip` names: open_clip for `open_clip:...`, else transformers' CLIPModel.
    An open_clip tag loads from the local cache only, unless `download`."""
    check_clip_spec(str(spec), download)
    if parse_open_clip(str(spec)) is not None:
        return OpenClipScorer.load(spec, device, download)
    return ClipScorer.load(spec, device)


@dataclass(frozen=True)
class TagWeights:
    """Where an open_clip tag's weights live once fetched, and the one command that fetches them."""

    cached: str | None  # the local file, None when not fetched yet
    where: str  # what was looked at (the cache folder)
    fetch: str  # a shell command that fetches exactly what open_clip reads


def tag_weights(arch: str, tag: str) -> TagWeights:
    """Look up `tag`'s weights as open_clip's own download would, without any network access: a
    Hugging Face repo file in the hub cache (open_clip prefers its .safetensors twin), or a URL
    file in ~/.cache/clip."""
    import open_clip
    from open_clip import pretrained as registry

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        known = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
        raise DxError(f"open_clip:{arch}:{tag}: open_clip knows no such weights (tags for {arch}: {known})")
    if cfg.get("file"):  # registered with a local file: open_clip reads it as is
        file = Path(cfg["file"])
        return TagWeights(str(file) if file.is_file() else None, str(file.parent), f"restore {file}")
    if cfg.get("hf_hub"):
        import huggingface_hub.constants as hub
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(cfg["hf_hub"])  # 'org/name/' names the repo's default file
        filename = filename or registry.HF_WEIGHTS_NAME
        twins = getattr(registry, "_get_safe_alternatives", lambda name: ())(filename)
        found = [hit for name in (*twins, filename)
                 if isinstance(hit := try_to_load_from_cache(repo, name, cache_dir=hub.HF_HUB_CACHE), str)]
        return TagWeights(found[0] if found else None, f"the Hugging Face cache {hub.HF_HUB_CACHE}",
                          f"hf download {repo} {filename}")
    target = Path("~/.cache/clip").expanduser() / os.path.basename(cfg["url"])  # open_clip's URL cache
    fetch = f"python -c \"import open_clip; open_clip.create_model('{arch}', pretrained='{tag}')\""
    return TagWeights(str(target) if target.is_file() else None, str(target.parent), fetch)


def _check_cached_tag(spec: str, parsed: OpenClipSpec, download: bool) -> None:
    """One line naming the fetch command when a tag's weights are not local (or fetch them)."""
    import open_clip

    arch = registered_arch(open_clip, parsed.arch)
    found = tag_weights(arch, parsed.pretrained)
    if found.cached:
        return
    if not download:
        raise DxError(f"prpo.clip={spec}: its weights are not in {found.where} and dx downloads nothing while "
                      f"training; fetch them once: {found.fetch} (or let dx train fetch them: --set model.download=true)")
    from open_clip import pretrained as registry

    try:  # here, in the parent process, once: the workers then read the cache
        registry.download_pretrained(open_clip.get_pretrained_cfg(arch, parsed.pretrained))
    except Exception as exc:  # noqa: BLE001 - any failed fetch ends the same way, in one line
        raise DxError(f"prpo.clip={spec}: could not download its weights ({_first_line(exc)}); "
                      f"fetch them by hand: {found.fetch}") from None


def registered_arch(open_clip: Any, arch: str) -> str:
    """The open_clip model name of `arch`; a config JSON of one's own is registered under its stem."""
    if arch.endswith(".json"):
        open_clip.add_model_config(Path(arch).expanduser())
        return Path(arch).stem
    return arch


@contextmanager
def _hub_offline() -> Iterator[None]:
    """The Hugging Face hub offline for what runs inside (open_clip fetches through it): a cached
    file loads, a missing one fails at once. model.compose.hub_access does the same for the model;
    importing it here would load torch with this module."""
    import huggingface_hub.constants as hub

    previous, hub.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = previous


def _import_open_clip(spec: str) -> Any:
    try:
        import open_clip
    except ImportError:
        raise DxError(f"--clip {spec} needs open_clip: {OPEN_CLIP_INSTALL}") from None
    return open_clip


def _is_path(value: str) -> bool:
    """A weights file rather than an open_clip tag (tags have no slashes nor file suffixes)."""
    return "/" in value or value.startswith(("~", ".")) or value.endswith(WEIGHT_SUFFIXES)


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _unit(features: Any) -> torch.Tensor:
    """Normalise CLIP features (transformers 5 returns an output object with `pooler_output`)."""
    import torch

    tensor = features if isinstance(features, torch.Tensor) else features.pooler_output
    return torch.nn.functional.normalize(tensor.float(), dim=-1)
