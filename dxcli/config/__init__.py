"""The one config system: a dataclass schema, YAML profiles, `--set key.sub=value`, flags.

Precedence: code defaults < profile < --set < explicit flags. Every resolved value remembers
where it came from, so `dx profiles show` and the run folder's `config.yaml` can say so.
The schema itself is `dxcli.config.schema`; its classes are importable from here too.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from dxcli.base.errors import UsageError
# the schema, importable from here as before
from dxcli.config.schema import (  # noqa: F401
    AlignConfig,
    DEFAULT_PROFILE,
    DatasetConfig,
    DxConfig,
    EvalConfig,
    HardwareConfig,
    InstructConfig,
    LoraConfig,
    ModelConfig,
    PrpoConfig,
    Resolved,
    TinyModelConfig,
    TrainConfig,
)

# ---------------------------------------------------------------- schema walking


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _resolved_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def leaf_keys(cls: type = DxConfig, prefix: str = "") -> list[str]:
    keys = []
    for name in _fields(cls):
        kind = _resolved_type(cls, name)
        if dataclasses.is_dataclass(kind):
            keys += leaf_keys(kind, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _suggest(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(key: str, kind: Any, value: Any) -> Any:
    """Check `value` against the annotation `kind`; ints are accepted where floats belong."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, option, value)
            except UsageError as exc:
                errors.append(str(exc))
        raise UsageError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        (item,) = typing.get_args(kind)
        if item is str and isinstance(value, str):  # --set train.report_to=tensorboard,wandb
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise UsageError(f"{key}: expected true/false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UsageError(f"{key}: expected an integer, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads "1e-4" (no dot) as a string
        raise UsageError(f"{key}: expected a number, got {value!r}")
    if kind is str:
        if isinstance(value, str):
            return value
        raise UsageError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {kind} for {key}")


def _apply(config: Any, data: dict[str, Any], source: str, sources: dict[str, str], prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise UsageError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    cls = type(config)
    known = _fields(cls)
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in known:
            raise UsageError(f"unknown config key '{key}'{_suggest(key, leaf_keys() + _sections())}")
        kind = _resolved_type(cls, name)
        if dataclasses.is_dataclass(kind):
            _apply(getattr(config, name), value, source, sources, key + ".")
        else:
            setattr(config, name, _coerce(key, kind, value))
            sources[key] = source
    _validate_choices(config, prefix)


def _sections() -> list[str]:
    return [f.name for f in dataclasses.fields(DxConfig)]


_CHOICES = {
    "precision": ("fp32", "bf16", "fp16"),
    "preset": ("compose", "tiny"),
    "algo": ("prpo", "grpo"),
    "labels": ("gt", "majority", "none"),
    "loss_agg": ("token_mean", "seq_mean"),
    "final_credit": ("paragraph", "verdict"),
    "report_to": ("tensorboard", "wandb"),  # a list: each item is checked
    "attn_implementation": ("sdpa", "eager", "flash_attention_2"),
    "kernels": ("none", "liger"),  # hardware.kernels (dxcli.model.kernels.KERNELS)
}


def _validate_choices(section: Any, prefix: str = "") -> None:
    for name, allowed in _CHOICES.items():
        value = getattr(section, name, None)
        for item in value if isinstance(value, list) else [value]:
            if item is not None and item not in allowed:
                raise UsageError(f"{prefix}{name}: must be one of {', '.join(allowed)}, got {item!r}")


# Counts and sizes that only make sense in a range: (lowest allowed, whether that bound itself is
# excluded). A negative step count would otherwise train "-3 steps" and report success.
_RANGES: dict[str, tuple[float, bool]] = {
    **dict.fromkeys(["hardware.nproc_per_node", "hardware.nnodes", "hardware.micro_batch", "hardware.grad_accum",
                     "train.keep_checkpoints", "train.log_every", "train.max_length", "prpo.images_per_step",
                     "prpo.max_new_tokens", "prpo.updates_per_rollout", "prpo.guard_every", "prpo.guard_probe_size", "eval.batch_size", "eval.max_new_tokens",
                     "model.image_size", "model.head_hidden"], (1, False)),
    **dict.fromkeys(["hardware.num_workers", "hardware.threads", "hardware.zero_stage", "align.zero_stage", "train.max_steps",
                     "train.save_every", "train.save_every_minutes", "train.warmup_ratio", "train.weight_decay",
                     "train.max_grad_norm", "prpo.beta", "prpo.eps_low", "prpo.eps_high", "prpo.vcr_weight",
                     "prpo.pcr_weight", "eval.temperature", "align.bin_alpha", "instruct.bin_alpha"], (0, False)),
    **dict.fromkeys(["train.epochs", "align.lr", "instruct.lr", "prpo.lr", "align.epochs", "instruct.epochs",
                     "instruct.vision_lr", "prpo.epochs", "prpo.temperature", "prpo.top_p", "eval.top_p", "prpo.adv_eps",
                     "hardware.checkpoint_write_gbps"], (0, True)),
    "prpo.group_size": (2, False),  # advantages compare samples of one image: one sample has none
}


def _validate_ranges(config: "DxConfig") -> None:
    known = set(leaf_keys())
    for key, (lowest, strict) in _RANGES.items():
        if key not in known:
            continue
        value = get_value(config, key)
        if value is None:
            continue
        if value < lowest or (strict and value == lowest):
            bound = f"> {lowest}" if strict else f">= {lowest}"
            raise UsageError(f"{key} must be {bound}, got {value}")
    for key in ("hardware.zero_stage", "align.zero_stage"):
        if (get_value(config, key) or 0) > 3:
            raise UsageError(f"{key} must be 0, 1, 2 or 3, got {get_value(config, key)}")
    if config.instruct.vision_lr is not None and not config.instruct.unfreeze_vision:
        raise UsageError("instruct.vision_lr needs instruct.unfreeze_vision=true (a frozen tower does not learn)")
    for key in ("prpo.pcr_no_majority", "prpo.majority_min_share", "prpo.guard_min_class_share", "prpo.guard_max_invalid_rise"):
        if not 0 <= get_value(config, key) <= 1:
            raise UsageError(f"{key} must be between 0 and 1, got {get_value(config, key)}")


def _nest(dotted: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in dotted.items():
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


# ---------------------------------------------------------------- profiles


def profiles_dir() -> Path:
    return Path(str(resources.files("dxcli") / "profiles"))


def list_profiles() -> dict[str, Path]:
    return {p.stem: p for p in sorted(profiles_dir().glob("*.yaml"))}


def profile_path(name_or_path: str) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.is_file():
            raise UsageError(f"profile file not found: {candidate}")
        return candidate
    known = list_profiles()
    if name_or_path not in known:
        raise UsageError(f"unknown profile '{name_or_path}'{_suggest(name_or_path, list(known))}; "
                         f"known: {', '.join(known)}")
    return known[name_or_path]


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a profile must be a mapping of sections")
    return data


def parse_set(item: str) -> tuple[str, Any]:
    """`key.sub=value`; the value is read as YAML, so numbers, booleans and lists work."""
    if "=" not in item:
        raise UsageError(f"--set expects key.sub=value, got '{item}'")
    key, raw = item.split("=", 1)
    key = key.strip()
    if key not in leaf_keys():
        raise UsageError(f"unknown config key '{key}'{_suggest(key, leaf_keys())}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def resolve(profile: str | None = DEFAULT_PROFILE, sets: list[str] | None = None,
            flags: dict[str, Any] | None = None) -> Resolved:
    """Build the config: defaults < profile < --set < flags (flags given as dotted keys)."""
    config = DxConfig()
    sources = {key: "default" for key in leaf_keys()}
    if profile:
        path = profile_path(profile)
        label = f"profile {path.stem}" if path.parent == profiles_dir() else f"profile {path}"
        _apply(config, _read_yaml(path), label, sources)
    for item in sets or []:
        key, value = parse_set(item)
        _apply(config, _nest({key: value}), "--set", sources)
    explicit = {k: v for k, v in (flags or {}).items() if v is not None}
    for key in explicit:
        if key not in leaf_keys():
            raise TypeError(f"flag mapped to unknown config key {key}")
    _apply(config, _nest(explicit), "flag", sources)
    _validate_combinations(config)
    return Resolved(config, sources, profile)


def _validate_combinations(config: DxConfig) -> None:
    """Checks across keys, run once on the final config (so the order of --set items never matters)."""
    _validate_ranges(config)
    hw = config.hardware
    if hw.offload_params and hw.zero_stage != 3:
        raise UsageError(f"hardware.offload_params needs hardware.zero_stage=3 (got {hw.zero_stage}): "
                         "only ZeRO-3 partitions parameters")
    if hw.offload_optimizer and hw.zero_stage < 2:
        raise UsageError(f"hardware.offload_optimizer needs hardware.zero_stage 2 or 3 (got {hw.zero_stage})")
    lora = config.model.lora
    if lora.r < 0 or lora.alpha <= 0 or not 0 <= lora.dropout < 1 or not lora.target_modules:
        raise UsageError(f"model.lora: r must be >= 0 (0 = off), alpha > 0, dropout in [0, 1) and target_modules "
                         f"not empty; got r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, "
                         f"target_modules={lora.target_modules}")
    if not set(lora.stages) <= {"instruct", "prpo"}:
        raise UsageError(f"model.lora.stages: only instruct and prpo train the LLM, got {lora.stages}")
    if hw.gpu_memory_gb < 0:
        raise UsageError(f"hardware.gpu_memory_gb must be >= 0 (0 = unknown), got {hw.gpu_memory_gb}")
    if config.prpo.updates_per_rollout < 1:
        raise UsageError(f"prpo.updates_per_rollout must be >= 1, got {config.prpo.updates_per_rollout}")


def zero_stage_for(config: DxConfig, stage: str) -> int:
    """The ZeRO stage `stage` trains under: align.zero_stage when set, else hardware.zero_stage.
    DeepSpeed's config, the final save and the memory planner all read it here, so they agree."""
    if stage == "align" and config.align.zero_stage is not None:
        return config.align.zero_stage
    return config.hardware.zero_stage


# LoRA learns at about 10x the full-fine-tuning rate, roughly whatever its rank ("LoRA Without
# Regrets", Thinking Machines 2025; TRL's GRPO docs: 1e-6 full vs 1e-5 LoRA). The paper's full-FT
# PRPO rate is 3e-7: as a LoRA rate it leaves the adapters barely moving. Below this a LoRA run warns.
LORA_MIN_LR = 1e-6


def stage_warnings(config: DxConfig, stage: str) -> list[str]:
    """Plain lines to show before `stage` starts: settings that run but are probably not meant."""
    rank = config.model.lora.rank_for(stage)  # 0 for align: validation keeps it out of lora.stages
    lr = get_value(config, f"{stage}.lr")
    if rank and lr < LORA_MIN_LR:
        return [f"{stage} trains LoRA adapters (model.lora.r={rank}) at {stage}.lr={lr:g}, below {LORA_MIN_LR:g}: "
                f"LoRA needs about 10x the full-fine-tuning rate (LoRA Without Regrets, 2025), "
                f"e.g. --set {stage}.lr={10 * lr:.3g}"]
    return []


def to_dict(config: DxConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def get_value(config: DxConfig, key: str) -> Any:
    """The value at a dotted key such as `train.max_steps`."""
    node: Any = config
    for part in key.split("."):
        node = getattr(node, part)
    return node


def flat_items(config: DxConfig) -> list[tuple[str, Any]]:
    return [(key, get_value(config, key)) for key in leaf_keys()]


def with_overrides(base: DxConfig, resolved: Resolved) -> DxConfig:
    """`base` (a run's saved config) with the values `resolved` took from --set and flags on top."""
    for key, source in resolved.sources.items():
        if source in ("--set", "flag"):
            _apply(base, _nest({key: get_value(resolved.config, key)}), source, {})
    return base


def save(config: DxConfig, path: Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")


def load(path: Path) -> DxConfig:
    """Read a resolved config (a run folder's config.yaml); validated like a profile."""
    config = DxConfig()
    _apply(config, _read_yaml(Path(path)), str(path), {})
    _validate_combinations(config)
    return config
