"""LLaVA checkpoints in the formats dx does not write: reading them and mapping them onto DX-LLaVA.

Two folder formats (METHOD.md §2, "Importing the original code's checkpoints"):

- "original": LLaVA's own `LlavaLlamaForCausalLM` (config.json `model_type: llava_llama`), what the
  original project's `run_train_dx_llava.sh` writes and what `liuhaotian/llava-v1.5-7b` is. Tensors:
  the Llama LLM as `model.embed_tokens|layers|norm.*` and `lm_head.*`; the projector as
  `model.mm_projector.0|2.*` (`mlp2x_gelu`: Linear-GELU-Linear); the tower under
  `model.vision_tower.vision_tower.*` (DX-LLaVA: a whole open_clip CLIP whose ConvNeXt trunk is
  `visual.trunk.*`; LLaVA-1.5: a CLIP ViT); DX-LLaVA's head as `model.binary_classifier.fc1|fc3.*`.
  Side files `mm_projector.bin` and `clip_model.bin` repeat the projector and the tower.
- "llava-hf": transformers' `LlavaForConditionalGeneration` (`model_type: llava`), e.g.
  `llava-hf/llava-1.5-7b-hf`.

`.bin` files are pickles: they are read with `weights_only=True`, so a downloaded checkpoint can
never run code here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dxcli.base import template
from dxcli.base.errors import DxError, first_line
from dxcli.model.build import preview
from dxcli.model.vision_weights import OPEN_CLIP_TRUNK, timm_state_from_open_clip

log = logging.getLogger(__name__)

ORIGINAL_TYPE = "llava_llama"  # config.json model_type of LLaVA's own LlavaLlamaForCausalLM
LLAVA_HF_TYPE = "llava"  # transformers' LlavaForConditionalGeneration
SIDE_FILES = ("mm_projector.bin", "clip_model.bin")
ORIGINAL_TOWER = "model.vision_tower."
ORIGINAL_TRUNK = "model.vision_tower.vision_tower." + OPEN_CLIP_TRUNK
# the original head clamps the projected tokens to +-10 before pooling them (llava_arch.py,
# compute_binary_classification); dx records it as DxLlavaConfig.head_clamp
ORIGINAL_HEAD_CLAMP = 10.0
# original -> dx tensor-name prefixes (the tower is mapped through its timm trunk, see trunk_state)
LLM_PREFIXES = (("model.embed_tokens.", "model.language_model.embed_tokens."),
                ("model.layers.", "model.language_model.layers."),
                ("model.norm.", "model.language_model.norm."),
                ("lm_head.", "lm_head."))
PROJECTOR_PREFIXES = (("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
                      ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."))
HEAD_PREFIXES = (("model.binary_classifier.fc1.", "binary_head.0."),
                 ("model.binary_classifier.fc3.", "binary_head.2."))
DX_TRUNK = "model.vision_tower.timm_model."
# config.json keys LLaVA adds to the Llama config; the LLM's own config is what remains
LLAVA_CONFIG_KEYS = ("image_aspect_ratio", "image_grid_pinpoints", "tokenizer_model_max_length",
                     "tokenizer_padding_side", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter",
                     "unfreeze_mm_vision_tower", "use_mm_proj", "architectures", "model_type", "_name_or_path",
                     "transformers_version")


# ---------------------------------------------------------------- folders and files


def folder_format(path: Path) -> str | None:
    """"original", "llava-hf" or None (a folder in neither format, or no config.json)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    model_type = read_config(Path(path)).get("model_type")
    return {ORIGINAL_TYPE: "original", LLAVA_HF_TYPE: "llava-hf"}.get(model_type)


def read_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DxError(f"cannot read {path / 'config.json'}: {exc}") from None


def weight_files(path: Path) -> list[Path]:
    """The main weight files: safetensors when there are any (the same tensors as any .bin beside
    them), else `pytorch_model*.bin`; LoRA adapters and the side files are not among them."""
    safetensors = sorted(f for f in path.glob("*.safetensors") if not f.name.startswith("adapter"))
    return safetensors or sorted(path.glob("pytorch_model*.bin"))


def read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of `files` (safetensors, or .bin read with weights_only=True), on the CPU."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)) if file.suffix == ".safetensors" else _read_pickle(file))
    return state


def _read_pickle(file: Path) -> dict[str, torch.Tensor]:
    """A torch.save'd state dict, unpickled with weights_only=True: a file that needs anything but
    tensors and plain containers (i.e. could run code) is refused, in one line."""
    import pickle

    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # files from torch < 1.6 cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise DxError(f"cannot read {file} as plain tensors (read with weights_only=True, so it never runs "
                      f"code): {first_line(exc)}") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise DxError(f"{file} does not hold a state dict (name -> tensor)")
    return state


def renamed(state: dict[str, torch.Tensor], prefixes: tuple[tuple[str, str], ...]) -> dict[str, torch.Tensor]:
    """The tensors of `state` under one of `prefixes`' sources, renamed to its target."""
    out = {}
    for key, tensor in state.items():
        for source, target in prefixes:
            if key.startswith(source):
                out[target + key[len(source):]] = tensor
    return out


def is_unused(key: str) -> bool:
    """Tensors of the original format that nothing reads: RoPE's inverse frequencies (recomputed),
    and everything of the tower but its trunk (open_clip's text tower and visual head, CLIP's
    pooler): the original encodes images with the trunk's stem and stages only."""
    return key.endswith("rotary_emb.inv_freq") or (key.startswith(ORIGINAL_TOWER) and ORIGINAL_TRUNK not in key)


def unplaced(state: dict[str, torch.Tensor]) -> list[str]:
    """Tensors of an original-format state dict that fit nowhere in DX-LLaVA (an error to import)."""
    known = tuple(source for source, _ in LLM_PREFIXES + PROJECTOR_PREFIXES + HEAD_PREFIXES)
    return sorted(k for k in state if not k.startswith(known) and ORIGINAL_TRUNK not in k and not is_unused(k))


# ---------------------------------------------------------------- the parts


def text_config_of(config: dict[str, Any]) -> Any:
    """The LLM's LlamaConfig out of an original-format config.json (LLaVA's keys dropped)."""
    from transformers import LlamaConfig

    kept = {k: v for k, v in config.items() if not k.startswith("mm_") and k not in LLAVA_CONFIG_KEYS}
    return LlamaConfig(**kept)


def projector_state(state: dict[str, torch.Tensor], config: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """(FastVlm projector tensors, "" ) from an original state dict, or ({}, why not). dx's
    projector is Linear-GELU-Linear, the original's `mlp2x_gelu` (nn.GELU: the exact, erf GELU, as
    FastVlm's "gelu"; no norm in either)."""
    kind = config.get("mm_projector_type", "linear")
    found = renamed(state, PROJECTOR_PREFIXES)
    if kind != "mlp2x_gelu":
        return {}, f"its projector is '{kind}', dx's is mlp2x_gelu (Linear-GELU-Linear)"
    if not found:
        return {}, "it holds no projector tensors (model.mm_projector.*)"
    return {k.removeprefix("model.multi_modal_projector."): t for k, t in found.items()}, ""


def convnext_tower(trunk: dict[str, torch.Tensor]) -> tuple[str, dict[str, Any]]:
    """(timm architecture, model_args) that rebuild a ConvNeXt trunk from its tensors alone.

    The original's open_clip tower wraps `timm convnext_large` (convnext_large_d_320); depths,
    widths, MLP kind, layer scale and GRN are read from the tensors, so any open_clip ConvNeXt (and
    the tests' tiny ones) maps. The exact convnext_large shape is plain `convnext_large`; any other
    is timm's generic ConvNeXt (`convnext_tiny`) with every shape argument given."""
    if "stem.0.weight" not in trunk or "stages.0.blocks.0.conv_dw.weight" not in trunk:
        raise DxError("the tower is not a ConvNeXt (no stem.0 / stages.0.blocks.0.conv_dw tensors): dx imports "
                      "open_clip ConvNeXt towers")
    n_stages = 1 + max(int(k.split(".")[1]) for k in trunk if k.startswith("stages."))
    depths = [len({k.split(".")[3] for k in trunk if k.startswith(f"stages.{i}.blocks.")}) for i in range(n_stages)]
    dims = [int(trunk[f"stages.{i}.blocks.0.conv_dw.weight"].shape[0]) for i in range(n_stages)]
    block = "stages.0.blocks.0."
    args = {"depths": depths, "dims": dims, "conv_mlp": trunk[block + "mlp.fc1.weight"].dim() == 4,
            "ls_init_value": 1e-6 if block + "gamma" in trunk else None,
            "use_grn": any(".grn." in k for k in trunk), "kernel_sizes": int(trunk[block + "conv_dw.weight"].shape[-1]),
            "patch_size": int(trunk["stem.0.weight"].shape[-1])}
    large = {"depths": [3, 3, 27, 3], "dims": [192, 384, 768, 1536], "conv_mlp": False, "ls_init_value": 1e-6,
             "use_grn": False, "kernel_sizes": 7, "patch_size": 4}
    return ("convnext_large", {}) if args == large else ("convnext_tiny", args)


def trunk_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The timm trunk of the original's open_clip tower ({} when the checkpoint holds none)."""
    return timm_state_from_open_clip({k: t for k, t in state.items() if k.startswith(ORIGINAL_TOWER)}) or {}


# ---------------------------------------------------------------- tokenizer


@dataclass
class PromptCheck:
    matches: bool
    ours: list[int] = field(default_factory=list)
    original: list[int] = field(default_factory=list)


def original_prompt_ids(tokenizer: Any, prompt: str, image_token_id: int) -> list[int]:
    """The original's prompt ids (LLaVA's tokenizer_image_token): each piece between `<image>`s
    tokenised on its own, the BOS of every piece after the first dropped, the image id between."""
    pieces = [tokenizer(piece).input_ids for piece in prompt.split(template.IMAGE_TOKEN)]
    bos = 1 if pieces[0][:1] == [tokenizer.bos_token_id] else 0
    ids = pieces[0][:bos]
    for i, piece in enumerate(pieces):
        ids += ([image_token_id] if i else []) + piece[bos:]
    return ids


def match_original_prompt(tokenizer: Any) -> PromptCheck:
    """Make `tokenizer` give dx's prompt the ids the original gave it, and say whether it does.

    The original tokenises the text after `<image>` as a string of its own, so a Llama
    (SentencePiece-style) tokenizer puts its word-start mark `▁` before the "\\n" that follows the
    image; a tokenizer that reads the whole prompt (prepend_scheme "first", transformers' default
    for Llama, `legacy: false`) does not. Prepending `▁` to every piece between special tokens
    ("always", Llama's `legacy: true`, saved as such) gives the original's ids for dx's prompt."""
    from tokenizers import pre_tokenizers

    pre = tokenizer.backend_tokenizer.pre_tokenizer
    if isinstance(pre, pre_tokenizers.Metaspace) and pre.prepend_scheme == "first":
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=pre.replacement, prepend_scheme="always", split=pre.split)
        tokenizer.legacy = True  # what transformers saves, and rebuilds "always" from on load
        tokenizer.init_kwargs["legacy"] = True
    prompt = template.prompt(template.DEFAULT_QUESTION)
    image_id = tokenizer.convert_tokens_to_ids(template.IMAGE_TOKEN)
    ours, original = tokenizer(prompt).input_ids, original_prompt_ids(tokenizer, prompt, image_id)
    return PromptCheck(ours == original, ours, original)


def grow_vocab(state: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """Embedding and output rows for tokens dx added (`<image>`): the mean of the existing rows,
    LLaVA's own rule for new tokens (deterministic; `<image>` is never sampled and its embedding
    is always replaced by an image feature)."""
    out = dict(state)
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        if key in out and out[key].shape[0] < rows:
            table = out[key]
            extra = table.float().mean(dim=0, keepdim=True).to(table.dtype).expand(rows - table.shape[0], -1)
            out[key] = torch.cat([table, extra])
    return out


# ---------------------------------------------------------------- meta-built models


def finish_meta_model(model: torch.nn.Module, decoder: torch.nn.Module, text_config: Any, what: str,
                      original_names: bool = True) -> None:
    """After `load_state_dict(assign=True)` into a model built on the meta device: RoPE's buffers
    computed again on the CPU (checkpoints do not hold them), weights tied, and any tensor still
    without data named in one error line."""
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is not None and any(buffer.is_meta for buffer in rotary.buffers()):
        decoder.rotary_emb = type(rotary)(config=text_config)
    model.tie_weights()
    empty = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        names = [original_name(n) for n in empty] if original_names else empty
        raise DxError(f"{what} is incomplete: {len(empty)} tensors missing ({preview(names)})")


def original_name(dx_key: str) -> str:
    """The original format's name of a DX-LLaVA tensor (for error messages)."""
    if dx_key.startswith(DX_TRUNK):
        return ORIGINAL_TRUNK + dx_key[len(DX_TRUNK):]
    for source, target in LLM_PREFIXES + PROJECTOR_PREFIXES + HEAD_PREFIXES:
        if dx_key.startswith(target):
            return source + dx_key[len(target):]
    return dx_key


def saved_generation_config(folder: Path, default: Any) -> Any:
    """The folder's generation_config.json when it has one (the original saves it), else `default`."""
    from transformers import GenerationConfig

    if (folder / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(folder)
    return default


# ---------------------------------------------------------------- a LLaVA as the starting LLM


@dataclass
class LoadedLlm:
    """What composition starts from: a causal LM, with a LLaVA's projector when it came from one."""

    model: Any  # a transformers causal LM (LlamaForCausalLM for every LLaVA)
    notes: list[str] = field(default_factory=list)
    projector: dict[str, torch.Tensor] = field(default_factory=dict)  # FastVlm names: linear_1.*, linear_2.*
    no_projector: str = ""  # for a LLaVA without a usable projector: why


def load_llava_llm(source: str | Path, kind: str, dtype: torch.dtype, name: str | None = None) -> LoadedLlm:
    """The language model (and projector) of a LLaVA in `kind` "original" (a local folder) or
    "llava-hf" (a folder or hub id transformers loads); its vision tower is not used. `name`: what
    the user called it (a hub id whose cached folder is `source`)."""
    loaded = _original_llm(Path(source), dtype) if kind == "original" else _llava_hf_llm(str(source), dtype)
    note = f"model.llm {name or source}: the language model of a LLaVA ({kind} format); its vision tower is not used"
    log.info(note)
    loaded.notes.append(note)
    return loaded


def _original_llm(folder: Path, dtype: torch.dtype) -> LoadedLlm:
    """LlavaLlamaForCausalLM's Llama, rebuilt as transformers' LlamaForCausalLM (same tensor names)."""
    from transformers import AutoModelForCausalLM

    config, files = read_config(folder), weight_files(folder)
    if not files:
        raise DxError(f"model.llm {folder} holds no weights (*.safetensors or pytorch_model*.bin)")
    state = read_tensors(files)
    text_config = text_config_of(config)
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(text_config)
    llm_names = tuple(source for source, _ in LLM_PREFIXES)
    llm.load_state_dict({k: t.to(dtype) for k, t in state.items() if k.startswith(llm_names)}, strict=False,
                        assign=True)
    finish_meta_model(llm, llm.base_model, text_config, f"the LLM of model.llm {folder}", original_names=False)
    llm.generation_config = saved_generation_config(folder, llm.generation_config)
    projector, why = projector_state(state, config)
    return LoadedLlm(llm, projector={k: t.to(dtype) for k, t in projector.items()}, no_projector=why)


def _llava_hf_llm(source: str, dtype: torch.dtype) -> LoadedLlm:
    """transformers' LlavaForConditionalGeneration loaded whole, its language model and LM head
    moved into a causal LM of its text config."""
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    try:
        llava, info = LlavaForConditionalGeneration.from_pretrained(source, dtype=dtype, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise DxError(f"could not load the LLaVA model.llm '{source}': {first_line(exc)}") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise DxError(f"LLaVA model.llm '{source}' did not load completely: {len(missing)} missing "
                      f"({preview(missing)})")
    text_config = llava.config.text_config
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(text_config)
    llm.model, llm.lm_head = llava.model.language_model, llava.lm_head
    llm.generation_config = llava.generation_config
    finish_meta_model(llm, llm.model, text_config, f"the LLM of model.llm {source}", original_names=False)
    if llava.config.projector_hidden_act != "gelu" or not llava.config.multimodal_projector_bias:
        return LoadedLlm(llm, no_projector=f"its projector ({llava.config.projector_hidden_act}) is not dx's "
                                           "Linear-GELU-Linear with biases")
    return LoadedLlm(llm, projector=dict(llava.model.multi_modal_projector.state_dict()))
