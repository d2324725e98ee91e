"""VCR's frozen CLIP (METHOD.md §10): transformers' CLIPModel or open_clip behind one scorer.

`prpo.clip` / `--clip` names it:
- a transformers CLIPModel folder (model, tokenizer and image processor saved together) or hub id;
- `open_clip:ARCH[:PRETRAINED_OR_FILE]`: an open_clip architecture, a built-in name (the paper's
  `convnext_large_d_320`) or a path to a model-config JSON, with its weights: an open_clip tag
  (`laion2b_s29b_b131k_ft_soup`) or a local weights file; without it the weights are random (tests
  only). Needs `pip install "dxcli[clip]"`. A tag's weights are read from the local cache (the
  Hugging Face hub cache, or ~/.cache/clip for open_clip's URL-hosted ones): nothing is downloaded
  while training, so a missing file fails in one line with the command that fetches it. With
  model.download=true the parent process fetches it once, before any worker starts. The same
  spec, file or tag serves as model.vision_weights, the DX-LLaVA tower (model/vision_weights.py).

Either way the embeddings are unit-norm float32, an image is embedded once and reused for every
keyword, and all keywords of a step go through one batched text pass.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dxcli.base.errors import DxError, first_line
from dxcli.model.hub import hub_access

# The spec and its cache lookup are shared with the vision tower, a layer down (one file serves both)
from dxcli.model.open_clip_spec import (OPEN_CLIP_INSTALL, cached_tag_file, check_open_clip_files,
                                        import_open_clip, is_weights_path, parse_open_clip, registered_arch)

if TYPE_CHECKING:
    import torch
    from PIL import Image


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
            raise DxError(f"cannot load a CLIP model from '{source}': {first_line(exc)}") from None
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
        open_clip = import_open_clip(f"--clip {spec}")
        arch = registered_arch(open_clip, parsed.arch)
        try:
            with hub_access(download):
                model, _, preprocess = open_clip.create_model_and_transforms(
                    arch, pretrained=parsed.local_pretrained(), device=device)
            tokenizer = open_clip.get_tokenizer(arch)
        except (RuntimeError, OSError, ValueError, KeyError) as exc:
            raise DxError(f"cannot load open_clip model '{spec}': {first_line(exc)}") from None
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
    check_open_clip_files(f"--clip {spec}", parsed)
    if parsed.pretrained and not is_weights_path(parsed.pretrained):  # a tag: its file must be cached
        import open_clip

        cached_tag_file(f"prpo.clip={spec}", registered_arch(open_clip, parsed.arch), parsed.pretrained, download)


def load_clip(spec: str | Path, device: Any = "cpu", download: bool = False) -> ClipScorer:
    """The scorer `prpo.clip` names: open_clip for `open_clip:...`, else transformers' CLIPModel.
    An open_clip tag loads from the local cache only, unless `download`."""
    check_clip_spec(str(spec), download)
    if parse_open_clip(str(spec)) is not None:
        return OpenClipScorer.load(spec, device, download)
    return ClipScorer.load(spec, device)



def _unit(features: Any) -> torch.Tensor:
    """Normalise CLIP features (transformers 5 returns an output object with `pooler_output`)."""
    import torch

    tensor = features if isinstance(features, torch.Tensor) else features.pooler_output
    return torch.nn.functional.normalize(tensor.float(), dim=-1)
