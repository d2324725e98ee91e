"""open_clip model specs, `open_clip:ARCH[:TAG_OR_FILE]`, and where a tag's weights live in the
local cache: shared by the DX-LLaVA tower (`model.vision_weights`, model/vision_weights.py) and
VCR's CLIP (`--clip`, rl/clip.py, a higher layer), so one spec and one file serve both. Importing
this module loads neither torch nor transformers: rl.clip stays light for `dx eval rewards`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dxcli.base.errors import DxError, first_line
from dxcli.model.hub import cached_hub_file

OPEN_CLIP_PREFIX = "open_clip:"
OPEN_CLIP_INSTALL = 'pip install "dxcli[clip]"'
WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".npz")


@dataclass(frozen=True)
class OpenClipSpec:
    arch: str  # a built-in open_clip name or a path to a model-config JSON
    pretrained: str | None  # an open_clip tag or a local weights file; None: random weights

    def local_pretrained(self) -> str | None:
        """`pretrained` with a file path expanded (open_clip takes a tag or an existing file)."""
        if self.pretrained and is_weights_path(self.pretrained):
            return str(Path(self.pretrained).expanduser())
        return self.pretrained


def parse_open_clip(spec: str, where: str = "--clip ") -> OpenClipSpec | None:
    """The parts of `open_clip:ARCH[:PRETRAINED_OR_FILE]`; None for anything else. `where` starts
    an error message: the key or flag the spec came from."""
    if not spec.startswith(OPEN_CLIP_PREFIX):
        return None
    arch, _, pretrained = spec[len(OPEN_CLIP_PREFIX):].partition(":")
    if not arch:
        raise DxError(f"{where}{spec}: name the architecture: open_clip:ARCH[:PRETRAINED_OR_FILE]")
    return OpenClipSpec(arch, pretrained or None)


def check_open_clip_files(where: str, parsed: OpenClipSpec) -> None:
    """The spec's local files exist: its model-config JSON and its weights file, when it names them."""
    if parsed.arch.endswith(".json") and not Path(parsed.arch).expanduser().is_file():
        raise DxError(f"{where}: no such open_clip model config: {parsed.arch}")
    weights = parsed.local_pretrained()
    if weights and is_weights_path(weights) and not Path(weights).is_file():
        raise DxError(f"{where}: no such weights file: {weights}")


def registered_arch(open_clip: Any, arch: str) -> str:
    """The open_clip model name of `arch`; a config JSON of one's own is registered under its stem."""
    if arch.endswith(".json"):
        open_clip.add_model_config(Path(arch).expanduser())
        return Path(arch).stem
    return arch


def import_open_clip(where: str) -> Any:
    try:
        import open_clip
    except ImportError:
        raise DxError(f"{where} needs open_clip: {OPEN_CLIP_INSTALL}") from None
    return open_clip


def is_weights_path(value: str) -> bool:
    """A weights file rather than an open_clip tag (tags have no slashes nor file suffixes)."""
    return "/" in value or value.startswith(("~", ".")) or value.endswith(WEIGHT_SUFFIXES)


# ---------------------------------------------------------------- open_clip tags in the local cache


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

        repo, filename = os.path.split(cfg["hf_hub"])  # 'org/name/' names the repo's default file
        filename = filename or registry.HF_WEIGHTS_NAME
        twins = getattr(registry, "_get_safe_alternatives", lambda name: ())(filename)
        found = [hit for name in (*twins, filename) if (hit := cached_hub_file(repo, name)) is not None]
        return TagWeights(found[0] if found else None, f"the Hugging Face cache {hub.HF_HUB_CACHE}",
                          f"hf download {repo} {filename}")
    target = Path("~/.cache/clip").expanduser() / os.path.basename(cfg["url"])  # open_clip's URL cache
    fetch = f"python -c \"import open_clip; open_clip.create_model('{arch}', pretrained='{tag}')\""
    return TagWeights(str(target) if target.is_file() else None, str(target.parent), fetch)


def cached_tag_file(where: str, arch: str, tag: str, download: bool) -> str:
    """The local file of an open_clip tag's weights (`arch` as open_clip registers it); fetched here,
    once, when `download`, else one line naming the command that fetches it."""
    import open_clip

    found = tag_weights(arch, tag)
    if found.cached:
        return found.cached
    if not download:
        raise DxError(f"{where}: its weights are not in {found.where} and dx downloads nothing while "
                      f"training; fetch them once: {found.fetch} (or let dx train fetch them: --set model.download=true)")
    from open_clip import pretrained as registry

    try:  # in the parent process, once: workers then read the cache
        return registry.download_pretrained(open_clip.get_pretrained_cfg(arch, tag))
    except Exception as exc:  # noqa: BLE001 - any failed fetch ends the same way, in one line
        raise DxError(f"{where}: could not download its weights ({first_line(exc)}); "
                      f"fetch them by hand: {found.fetch}") from None
