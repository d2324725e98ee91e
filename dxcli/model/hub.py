"""The Hugging Face hub cache, offline unless a run asks for downloads: shared by composition
(`model.llm`, `model.vision_weights`), open_clip tags and VCR's CLIP. Imports neither torch nor
transformers, so light modules (rl.clip for `dx eval rewards`) may use it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def hub_access(download: bool) -> Iterator[None]:
    """Without `download`, the hub is offline for transformers, timm and open_clip alike: a missing
    file is an immediate error rather than a minute of connection retries on a machine without
    network."""
    import huggingface_hub.constants as hub

    previous = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = previous or not download
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = previous


def cached_hub_file(repo: str, filename: str) -> str | None:
    """The local path of `repo`'s `filename` in the hub cache, None when it is not there (nor when
    the cache only records that the file does not exist)."""
    import huggingface_hub.constants as hub
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo, filename, cache_dir=hub.HF_HUB_CACHE)
    return hit if isinstance(hit, str) else None
