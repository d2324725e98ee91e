"""`dx model import`: a checkpoint of the original code written out as a dx model folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dxcli.base.errors import UsageError, refuse_nonempty_out
from dxcli.config import DxConfig
from dxcli.model.checkpoint import save_checkpoint
from dxcli.model.import_original import import_original


@dataclass
class Imported:
    out: Path
    notes: list[str] = field(default_factory=list)  # what the import decided, one line each


def import_model(src: str | Path, out: str | Path, config: DxConfig, *, pad: bool | None = None,
                 force: bool = False) -> Imported:
    """Import `src` (original format) into `out` (a dx model folder, safetensors). `pad` None: the
    preprocessing the original used; True/False: pad to a square / centre-crop. An existing
    non-empty `out` is refused unless `force`. Everything is read and checked before `out` is touched."""
    src, out = Path(src), Path(out)
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise UsageError("--out must be another folder than SRC (the original checkpoint is never modified)")
    refuse_nonempty_out(out, force)
    aspect_ratio = None if pad is None else ("pad" if pad else "crop")
    bundle = import_original(src, config.model, aspect_ratio=aspect_ratio)
    save_checkpoint(bundle, out)
    return Imported(out, bundle.notes)
