"""Training state on disk: resumable DeepSpeed checkpoints (model, optimizer, scheduler, loop
position, each rank's RNG) and the final `save_pretrained` folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

from dxcli.base.errors import DxError, Interrupted
from dxcli.config import to_dict
from dxcli.model.checkpoint import save_checkpoint
from dxcli.model.lora import is_lora, save_merged
from dxcli.runtime.dist import Dist, barrier
from dxcli.runtime.env import STOP_AFTER_ENV, rng_state, set_rng_state, stop_after_step
from dxcli.runtime.interrupt import StopRequest
from dxcli.runtime.metrics import MetricsLog
from dxcli.runtime.progress import ProgressView


def checkpoint_tags(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).glob("step-*") if p.is_dir())


def has_frozen(module) -> bool:
    """Whether some weights do not train (and so are left out of resumable checkpoints)."""
    return any(not p.requires_grad for p in module.parameters())


def save_training_state(engine, folder: Path, step: int, state: dict[str, Any], keep: int, dist: Dist) -> None:
    """DeepSpeed checkpoint (model, optimizer, scheduler) + loop position + this rank's RNG.

    Every rank must call it. Older checkpoints beyond `keep` are removed: they are superseded.
    One process removes them, global rank 0, which is right because a run on several nodes has
    one run folder that every node shares (dx checks that before starting the workers).
    """
    import torch

    tag = f"step-{step:07d}"
    # only what learns is saved: frozen weights (align's whole LLM, a frozen tower, a LoRA run's
    # base) are the starting checkpoint's, loaded again by setup on --resume. For h100x2's align
    # that is 0.3 GB a checkpoint instead of 28 GB (ZeRO-2 writes frozen weights twice)
    engine.save_checkpoint(str(folder), tag=tag, client_state={**state, "step": step, "tag": tag},
                           exclude_frozen_parameters=has_frozen(engine.module))
    torch.save(rng_state(), Path(folder) / tag / f"rng-rank{dist.rank}.pt")
    barrier(dist)
    if dist.main:
        for old in checkpoint_tags(folder)[:-keep]:
            shutil.rmtree(Path(folder) / old, ignore_errors=True)
    barrier(dist)


def load_training_state(engine, folder: Path, dist: Dist) -> dict[str, Any] | None:
    """Restore the newest checkpoint into `engine`; returns the loop state saved with it, or None."""
    import torch

    if not checkpoint_tags(folder):
        return None
    # a checkpoint holds the trainable tensors only; the frozen rest is already loaded
    _, client = engine.load_checkpoint(str(folder), load_module_strict=not has_frozen(engine.module))
    if client is None:  # DeepSpeed found no `latest` (written by global rank 0) and loaded nothing
        raise DxError(f"rank {dist.rank}: no resumable checkpoint in {folder} (DeepSpeed's 'latest' file is "
                      "missing): with several nodes, --out must be one folder that every node shares")
    rng_file = Path(folder) / client["tag"] / f"rng-rank{dist.rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client


def save_final_model(engine, bundle, out_dir: Path, zero_stage: int, dist: Dist) -> None:
    """The final `save_pretrained` folder; under ZeRO-3 the weights are gathered first (all ranks).
    With LoRA, the adapters are merged into it and also kept alone in `out_dir`'s sibling adapter/."""
    state = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else None
    if dist.main:
        bundle.model = engine.module
        if is_lora(engine.module):
            save_merged(bundle, out_dir, Path(out_dir).parent / "adapter", state)
        else:
            save_checkpoint(bundle, out_dir, state_dict=state)
    barrier(dist)


def run_recipe(job: Any, setup: Callable[[Any], Any], resume: Callable[[Any, MetricsLog], None],
               train_loop: Callable[[Any, MetricsLog], None], save: Callable[[Any], Path]) -> Path:
    """The shape every training recipe runs in: set up, resume when asked, train while the metrics
    sink (and its trackers) is open, save."""
    state = setup(job)
    with MetricsLog(Path(job.run_dir) / "metrics.jsonl", state.dist.main, state.cfg.train.report_to,
                    to_dict(state.cfg)) as log:
        if job.resume:
            resume(state, log)
        train_loop(state, log)
    return save(state)


def finish(engine, bundle, run_dir: Path, zero_stage: int, dist: Dist, label: str) -> Path:
    """RUN/model, the `save_pretrained` folder the next stage starts from; says where it is."""
    out_dir = Path(run_dir) / "model"
    save_final_model(engine, bundle, out_dir, zero_stage, dist)
    if dist.main:
        print(f"[{label}] saved {out_dir}", flush=True)
    return out_dir


INTERRUPTED_FILE = "interrupted.json"  # rank 0 leaves it when a signal stopped the run after a checkpoint


def interruption(run_dir: Path, step: int, signal_name: str | None, dist: Dist) -> Interrupted:
    """The exception that ends an interrupted loop, its checkpoint saved; rank 0 also leaves a
    note so the launching process can tell the user (workers then exit quietly)."""
    checkpoint = Path(run_dir) / "checkpoints" / f"step-{step:07d}"
    message = (f"{signal_name or 'signal'} at step {step}: checkpoint saved in {checkpoint}; "
               f"continue with the same command and --resume")
    if dist.main:
        (Path(run_dir) / INTERRUPTED_FILE).write_text(json.dumps({"step": step, "message": message}))
    return Interrupted(message)


def pending_interruption(run_dir: Path, forget: bool = True) -> Interrupted | None:
    """The Interrupted a launched run's workers left behind (and, with `forget`, delete the note:
    node 0's business when several nodes share the run folder), else None."""
    note = Path(run_dir) / INTERRUPTED_FILE
    try:
        message = json.loads(note.read_text())["message"]
    except (OSError, ValueError, KeyError):  # none, or node 0 deleted it as we read
        return None
    if forget:
        note.unlink(missing_ok=True)
    return Interrupted(message)


def checkpoint_or_stop(*, step: int, save_every: int, run_dir: Path, label: str, dist: Dist,
                       save: Callable[[], None], progress: ProgressView, stop: StopRequest) -> None:
    """After an optimizer step: checkpoint when due (every `save_every` steps, every N minutes, or
    because a signal asked to stop), then stop when asked. Every rank calls it after every step."""
    halt, due = stop.after_step()
    crash_test = step == stop_after_step()
    if due or crash_test or (save_every and step % save_every == 0):
        save()
        stop.saved()
    if halt or crash_test:
        progress.close()
        if crash_test:
            raise SystemExit(f"[{label}] stopped after step {step} ({STOP_AFTER_ENV})")
        raise interruption(run_dir, step, stop.signal_name, dist)
