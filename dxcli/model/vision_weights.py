"""Vision-tower weights in the formats they arrive in: timm's own, and open_clip's, whose ConvNeXt
towers wrap a timm model as `visual.trunk` (the original project's tower and the paper's VCR CLIP
are such models), so one file serves both the tower and VCR's CLIP.

`model.vision_weights` names:
- nothing: timm's own weights of `model.vision`; or a hub id `ORG/NAME` of timm weights;
- a local file or folder: timm keys, a transformers TimmWrapper folder (`timm_model.*`), or an
  open_clip model (`visual.trunk.*`; in a folder open_clip's `open_clip_model.safetensors` or
  `open_clip_pytorch_model.bin`, with its `open_clip_config.json` when there);
- `open_clip:ARCH:TAG_OR_FILE` (what `--clip` takes) or `hf-hub:ORG/NAME` (an open_clip repo): a
  tag or repo is read from the local Hugging Face cache only, unless model.download=true.
Where open_clip's model config is known, the timm model it wraps must be `model.vision`'s.
The open_clip spec and its cache lookup are model/open_clip_spec.py's, shared with VCR's CLIP.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dxcli.base.errors import DxError, first_line
from dxcli.model.build import VISION_WEIGHT_FILES, preview, unexpected_note
from dxcli.model.hub import cached_hub_file
from dxcli.model.open_clip_spec import (OPEN_CLIP_PREFIX, WEIGHT_SUFFIXES, cached_tag_file, check_open_clip_files,
                                        import_open_clip, is_weights_path, parse_open_clip, registered_arch)

log = logging.getLogger(__name__)

KEY = "model.vision_weights"
OPEN_CLIP_TRUNK = "visual.trunk."
# open_clip's MLP projection starts with the layer timm's `*_mlp` ConvNeXts keep as
# `head.pre_logits.fc` (timm's convnext_large_mlp.clip_* weights are these very tensors); its second
# layer, the CLIP projection, is timm's classifier, which the tower (num_classes=0) has no slot for.
OPEN_CLIP_MLP_IN = "visual.head.mlp.fc1."
TIMM_MLP_IN = "head.pre_logits.fc."
HF_HUB_PREFIX = "hf-hub:"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's preference


def timm_state_from_open_clip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The timm trunk's state dict out of any state dict that holds an open_clip visual tower
    (`visual.trunk.<timm key>`, under any prefix such as `model.vision_tower.vision_tower.`);
    None when it holds none."""
    found = {}
    for key, tensor in state.items():
        _, mark, rest = key.partition(OPEN_CLIP_TRUNK)
        if mark:
            found[rest] = tensor
    return found or None


# ---------------------------------------------------------------- model.vision_weights


def vision_state_dict(arch: str, weights: str | None, image_size: int,
                      download: bool = False) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(timm state dict of the tower `arch`, notes worth showing) from `model.vision_weights` (see
    the module's docstring); an open_clip tower is checked to wrap `arch` before it is read."""
    if weights is None or _is_timm_hub_id(weights):
        return _timm_pretrained(arch, weights), []
    file, vision_cfg = _weights_file(weights, download)
    if vision_cfg is not None:
        check_tower_arch(arch, vision_cfg, weights)
    state = timm_tower_state(read_state_file(file), weights)
    return state, _image_size_note(vision_cfg, image_size, weights) if vision_cfg is not None else []


def locate_vision_weights(weights: str | None, download: bool) -> None:
    """Find (with `download`, fetch) an open_clip `model.vision_weights` file once, in the parent
    process before any worker starts: a missing file is one line there, not one per rank, and
    with model.download=true one process fetches it while the workers only read the cache."""
    if weights is not None and not _is_timm_hub_id(weights):
        _weights_file(weights, download)


def check_tower_arch(arch: str, vision_cfg: Mapping[str, Any], source: str) -> None:
    """`arch` (model.vision) must be the timm model open_clip wraps: its very name, or timm's
    `NAME_mlp` when open_clip adds its MLP projection (timm publishes the paper CLIP's tower,
    open_clip's convnext_large_d_320, as convnext_large_mlp.clip_laion2b_ft_soup_320: dx's default)."""
    import timm

    wrapped = str(vision_cfg.get("timm_model_name") or "").partition(".")[0]
    if not wrapped:
        raise DxError(f"{KEY}={source}: open_clip's own vision transformer, not a timm model; dx's tower "
                      "takes open_clip models whose vision_cfg names a timm_model_name (its ConvNeXt CLIPs)")
    with_mlp = f"{wrapped}_mlp" if vision_cfg.get("timm_proj") == "mlp" and timm.is_model(f"{wrapped}_mlp") else None
    same = [wrapped, with_mlp] if with_mlp else [wrapped]
    if arch.partition(".")[0] not in same:  # timm names may carry a pretrained tag after the dot
        raise DxError(f"{KEY}={source} wraps timm's {wrapped} but model.vision is {arch}; "
                      f"set --set model.vision={' or '.join(same)}")


def read_state_file(file: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file; torch files load tensors only (weights_only),
    so a downloaded checkpoint never runs code."""
    from timm.models import load_state_dict

    try:
        return load_state_dict(str(file), weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        if any(isinstance(e, pickle.UnpicklingError) for e in (exc, exc.__cause__)):  # timm re-raises torch's
            raise DxError(f"vision weights {file} hold more than tensors (pickled objects, which dx never "
                          "runs); save the state dict alone, or as .safetensors") from None
        raise DxError(f"could not read vision weights {file}: {first_line(exc)}") from None


def load_tower(timm_model: Any, state: Mapping[str, torch.Tensor], source: str, arch: str) -> list[str]:
    """Load `state` into the tower's timm model. A missing tensor or one of another shape (another
    model's weights) is a one-line error; unused tensors come back as a note."""
    own = timm_model.state_dict()
    missing = [key for key in own if key not in state]
    reshaped = [f"{key} {_shape(tensor)} in the file, {_shape(own[key])} in the tower"
                for key, tensor in state.items() if key in own and tensor.shape != own[key].shape]
    if missing or reshaped:
        raise DxError(f"vision weights '{source}' do not fit {arch}: {len(missing)} missing ({preview(missing)}), "
                      f"{len(reshaped)} of other shapes ({preview(reshaped, 2)})")
    _, unexpected = timm_model.load_state_dict(state, strict=False)
    return unexpected_note(f"vision weights '{source}'", unexpected)


def _is_timm_hub_id(weights: str) -> bool:
    """`ORG/NAME` that is no local path: timm's hub weights (an open_clip repo needs `hf-hub:`)."""
    return (weights.count("/") == 1 and not weights.startswith((OPEN_CLIP_PREFIX, HF_HUB_PREFIX, ".", "/", "~"))
            and not weights.endswith(WEIGHT_SUFFIXES) and not Path(weights).exists())


def _weights_file(weights: str, download: bool) -> tuple[Path, dict[str, Any] | None]:
    """(the file to read, open_clip's vision_cfg when known) of a non-timm-hub `model.vision_weights`."""
    if weights.startswith(OPEN_CLIP_PREFIX):
        return _open_clip_spec_file(weights, download)
    if weights.startswith(HF_HUB_PREFIX):
        return _hf_hub_file(weights, download)
    local = Path(weights).expanduser()
    if not local.exists():
        raise DxError(f"vision weights not found: '{weights}' is neither a local file/folder, a hub id, "
                      "open_clip:ARCH:TAG_OR_FILE nor hf-hub:ORG/NAME")
    if local.is_file():
        file = local
    else:
        names = OPEN_CLIP_WEIGHT_FILES + VISION_WEIGHT_FILES
        file = next((local / name for name in names if (local / name).is_file()), None)
        if file is None:
            raise DxError(f"no weights file ({', '.join(names)}) in {local}")
    config = file.parent / OPEN_CLIP_CONFIG  # open_clip's repo layout: its config beside its weights
    known = file.name in OPEN_CLIP_WEIGHT_FILES and config.is_file()
    return file, _vision_cfg_of(config) if known else None


def _open_clip_spec_file(spec: str, download: bool) -> tuple[Path, dict[str, Any]]:
    """`open_clip:ARCH:TAG_OR_FILE`: the weights file (a tag's from the cache) and ARCH's vision_cfg."""
    where = f"{KEY}={spec}"
    parsed = parse_open_clip(spec, f"{KEY}=")
    if not parsed.pretrained:
        raise DxError(f"{where}: name its weights, open_clip:ARCH:TAG_OR_FILE (without them the tower is random)")
    check_open_clip_files(where, parsed)
    open_clip = import_open_clip(where)
    arch = registered_arch(open_clip, parsed.arch)
    model_cfg = open_clip.get_model_config(arch)
    if not model_cfg:
        raise DxError(f"{where}: open_clip knows no model '{arch}' (a built-in name or a model-config JSON)")
    weights = parsed.local_pretrained()
    file = weights if is_weights_path(weights) else cached_tag_file(where, arch, weights, download)
    return Path(file), model_cfg.get("vision_cfg", {})


def _hf_hub_file(spec: str, download: bool) -> tuple[Path, dict[str, Any]]:
    """`hf-hub:ORG/NAME`, an open_clip repo: its weights and config from the Hugging Face cache."""
    import huggingface_hub.constants as hub

    where, repo = f"{KEY}={spec}", spec[len(HF_HUB_PREFIX):].strip("/")
    if repo.count("/") != 1:
        raise DxError(f"{where}: name an open_clip repo, hf-hub:ORG/NAME")
    config = _hub_file(where, repo, (OPEN_CLIP_CONFIG,), download)
    file = _hub_file(where, repo, OPEN_CLIP_WEIGHT_FILES, download)
    if config is not None and file is not None:
        return file, _vision_cfg_of(config)
    if download:
        raise DxError(f"{where}: {repo} has no {OPEN_CLIP_CONFIG} with {' or '.join(OPEN_CLIP_WEIGHT_FILES)}")
    raise DxError(f"{where}: not in the Hugging Face cache {hub.HF_HUB_CACHE} and dx downloads nothing unless "
                  f"asked; fetch it once: hf download {repo} {OPEN_CLIP_WEIGHT_FILES[1]} {OPEN_CLIP_CONFIG} "
                  "(or --set model.download=true)")


def _hub_file(where: str, repo: str, names: tuple[str, ...], download: bool) -> Path | None:
    """The first of `names` in the local cache; with `download`, the first the repo has, fetched."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    for name in names:
        if (hit := cached_hub_file(repo, name)) is not None:
            return Path(hit)
    for name in names if download else ():
        try:
            return Path(hf_hub_download(repo, name))
        except EntryNotFoundError:
            continue
        except Exception as exc:  # noqa: BLE001 - network and hub failures come in many types
            raise DxError(f"{where}: could not download {name} ({first_line(exc)})") from None
    return None


def _vision_cfg_of(config: Path) -> dict[str, Any]:
    """vision_cfg of an open_clip_config.json (the model config sits under `model_cfg`)."""
    try:
        raw = json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise DxError(f"could not read open_clip's model config {config}: {first_line(exc)}") from None
    return raw.get("model_cfg", raw).get("vision_cfg", {})


def timm_tower_state(state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """timm keys out of any format `read_state_file` returns (open_clip's, with its MLP projection's
    first layer as timm's `*_mlp` ConvNeXts name it)."""
    trunk = timm_state_from_open_clip(state)
    if trunk is not None:
        head = {TIMM_MLP_IN + key.partition(OPEN_CLIP_MLP_IN)[2]: tensor
                for key, tensor in state.items() if OPEN_CLIP_MLP_IN in key}
        return trunk | head
    if any(key.startswith("visual.") for key in state):
        raise DxError(f"vision weights '{source}' hold open_clip's own vision transformer (visual.*), not a "
                      "timm model (visual.trunk.*); dx's tower is a timm model")
    # HF TimmWrapper folders prefix every key with `timm_model.`
    return {key.removeprefix("timm_model."): tensor for key, tensor in state.items()}


def _image_size_note(vision_cfg: Mapping[str, Any], image_size: int, source: str) -> list[str]:
    """A ConvNeXt takes any multiple of its stride, so another size is no error; but its features
    are then not the ones open_clip trained, which is worth a line."""
    trained = vision_cfg.get("image_size")
    sides = set(trained) if isinstance(trained, (list, tuple)) else {trained}
    if trained is None or sides == {image_size}:
        return []
    note = (f"{KEY}={source}: open_clip ran this tower at {trained} px, model.image_size is {image_size}; "
            "its features at that size are not open_clip's")
    log.warning(note)
    return [note]


def _timm_pretrained(arch: str, weights: str | None) -> dict[str, torch.Tensor]:
    """timm's own weights of `arch`, or those of the timm hub repo `weights`."""
    import timm

    overlay = {"hf_hub_id": weights, "source": "hf-hub"} if weights else None
    try:
        return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay).state_dict()
    except Exception as exc:  # noqa: BLE001 - network/hub failures come in many types
        name, where = weights or _timm_hub_repo(arch), weights or "timm's default source"
        open_clip_repo = f" (for an open_clip repo write hf-hub:{weights})" if weights else ""
        raise DxError(f"could not load vision weights for {arch} from {where}{open_clip_repo}: "
                      f"{first_line(exc)}. Give a local file with {KEY}, or fetch it once (`hf download "
                      f"{name}`), point the key at a local folder, or allow downloads with --set "
                      "model.download=true") from None


def _timm_hub_repo(arch: str) -> str:
    """The hub repo timm fetches `arch`'s default weights from (what `hf download` needs)."""
    import timm

    try:
        return timm.models.get_pretrained_cfg(arch).hf_hub_id or arch
    except (AttributeError, RuntimeError):  # no pretrained weights registered: name the model
        return arch


def _shape(tensor: Any) -> str:
    return "x".join(str(side) for side in tensor.shape)

