"""Parent-side preparation of a run: the run folder, its config, the records, the starting model.

Done once, before any worker starts, so problems (bad images, an existing run) stop the command early.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dxcli import config as cfgmod
from dxcli.base.errors import DxError, UsageError
from dxcli.base.jsonio import write_jsonl_atomic
from dxcli.data.records import default_reasoning, find_bad_images, load_records, records_from_tree
from dxcli.jobs.nodes import forget_ready
from dxcli.model.checkpoint import build_model, resolve_model_path, save_checkpoint
from dxcli.model.compose import check_sources
from dxcli.runtime.env import quiet_libraries
from dxcli.training.state import checkpoint_tags
from dxcli.runtime.trackers import check_installed


def open_run_dir(run_dir: Path, resolved: cfgmod.Resolved, *, resume: bool, force: bool,
                 check: Callable[[cfgmod.DxConfig], None] | None = None) -> cfgmod.DxConfig:
    """Create (or, with resume, reopen) RUN_DIR and write its resolved config.yaml.

    A run that has something to lose (a checkpoint or a model) is never overwritten silently: it
    needs --resume (continue) or --force (start over). A folder whose run stopped before its first
    checkpoint holds nothing to lose and is reused. On --resume the run's own config is used;
    --set / flags given again are applied on top. The final config is checked before anything is
    written or deleted (trackers installed, `check`: the memory plan), so a refused run leaves
    nothing behind.
    """
    run_dir = Path(run_dir)
    saved = run_dir / "config.yaml"
    if resume:
        if not saved.is_file():
            raise DxError(f"--resume: {run_dir} holds no run (no config.yaml)")
        if not has_progress(run_dir):
            raise DxError(f"--resume: {run_dir} has no checkpoint yet (the run stopped before its first save); "
                          "run the same command without --resume to start it")
        config = cfgmod.with_overrides(cfgmod.load(saved), resolved)
        _check_before_writing(config, check)
        forget_ready(run_dir)  # no other node may start on the last launch's job while this one prepares
        cfgmod.save(config, saved)
        return config
    if run_dir.is_file():
        raise DxError(f"--out {run_dir} is a file, not a folder")
    _check_before_writing(resolved.config, check)
    if run_dir.exists() and any(run_dir.iterdir()):
        if has_progress(run_dir) and not force:
            raise DxError(f"{run_dir} holds a run with a checkpoint or model; pass --resume to continue it "
                          f"or --force to start it over")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfgmod.save(resolved.config, saved)
    return resolved.config


def _check_before_writing(config: cfgmod.DxConfig, check: Callable[[cfgmod.DxConfig], None] | None) -> None:
    check_installed(config.train.report_to)
    if check is not None:
        check(config)


def has_progress(run_dir: Path) -> bool:
    """Whether a run folder holds work that would be lost: a resumable checkpoint or a saved model."""
    return bool(checkpoint_tags(Path(run_dir) / "checkpoints")) or (Path(run_dir) / "model" / "config.json").is_file()


@dataclass
class PreparedData:
    records_file: Path
    images_root: Path
    n_records: int
    skipped: list[tuple[str, str]]


def prepare_records(data: Path | None, images: Path | None, run_dir: Path, *, split: str = "train",
                    skip_bad: bool = False, name: str = "train-records.jsonl",
                    require_labels: bool = False, domains: list[str] | None = None) -> PreparedData:
    """Records from a dataset tree (built, with ROOT/reasoning.jsonl when present) or a records file.

    Images that are missing or unreadable stop the run (listed), or are skipped with --skip-bad.
    """
    if data is None:
        raise UsageError("--data is required: a dataset tree (ROOT/<domain>/<split>/<label>/...) or a records "
                         "file with --images ROOT (try `dx dataset demo demo-data` for the built-in demo data)")
    data = Path(data)
    if not data.exists():
        raise UsageError(f"--data {data}: no such file or folder")
    if data.is_dir():
        images_root = data
        records = records_from_tree(data, splits=(split,), domains=domains, reasoning=default_reasoning(data))
    else:
        if images is None:
            raise UsageError(f"--data {data} is a records file: pass --images ROOT (the folder its paths are relative to)")
        images_root = Path(images)
        if not images_root.is_dir():
            raise UsageError(f"--images {images_root}: no such folder")
        records = load_records(data, images_root)
    if not records:
        hint = (f" (a tree without split folders is a published test set, all `test`: make a {split} split "
                f"with `dx dataset split {data} --out DIR --ratios 0.8,0.1,0.1`)") if data.is_dir() and split != "test" else ""
        raise DxError(f"no {split} records found in {data}{hint}")
    if require_labels and any(r.binary_label is None for r in records):
        raise DxError("some records have no label (binary_label or an answer marker)")
    bad = find_bad_images(records, images_root)
    if bad and not skip_bad:
        listing = "; ".join(f"{path} ({why})" for path, why in bad[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise DxError(f"{len(bad)} record(s) have missing or unreadable images: {listing}{more}. "
                      f"Fix them or pass --skip-bad to train without them")
    bad_set = {path for path, _ in bad}
    records = [r for r in records if r.image not in bad_set]
    out = Path(run_dir) / name
    write_jsonl_atomic(out, (r.to_json() for r in records))
    return PreparedData(out, images_root, len(records), bad)


def run_records(out: Path, name: str, *, resume: bool, say=print, **prepare_kwargs) -> tuple[Path, Path]:
    """(records file, image root) of a run: reused on --resume, otherwise prepared (and checked) now."""
    records_file = Path(out) / name
    root_note = Path(out) / "images-root.txt"
    if resume and records_file.is_file() and root_note.is_file():
        return records_file, Path(root_note.read_text().strip())
    prepared = prepare_records(run_dir=out, name=name, **prepare_kwargs)
    root_note.write_text(str(prepared.images_root.resolve()))
    if prepared.skipped:
        say(f"skipped {len(prepared.skipped)} record(s) with missing or unreadable images")
    say(f"{prepared.n_records} records -> {records_file}")
    return records_file, prepared.images_root


def starting_model(model: str | None, config: cfgmod.DxConfig, run_dir: Path, texts: Callable[[], list[str]]) -> str | None:
    """The checkpoint workers start from. The tiny preset is built here once (its tokenizer is trained
    on the records' text), so every rank starts from identical weights and vocabulary."""
    model = resolve_model_path(model) or config.model.path
    if model is not None:
        return model
    if config.model.preset != "tiny":
        check_sources(config.model)  # here, once: a missing file is one line before any worker starts
        return None  # composed inside the workers from config.model
    base = Path(run_dir) / "base-model"
    if not (base / "config.json").is_file():
        quiet_libraries()  # no per-file saving bars before dx's own output
        save_checkpoint(build_model(config.model, texts()), base)
    return str(base)
