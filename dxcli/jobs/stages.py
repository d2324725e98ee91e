"""Run one stage end to end from the parent process: inputs checked, run folder, records,
starting model, then the workers (in place or launched). The library entry points of
`dx train align|instruct|prpo` and `dx eval infer`."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from dxcli import config as cfgmod
from dxcli.base.errors import DxError, UsageError
from dxcli.data.records import load_records
from dxcli.evaluation.infer import InferJob, load_questions, merge_outputs
from dxcli.jobs import prepare
from dxcli.jobs.launch import LaunchSpec, launch, spec_for
from dxcli.jobs.memory import check_plan_fits
from dxcli.model.checkpoint import check_attention, resolve_model_path
from dxcli.training.prpo import PrpoJob
from dxcli.training.sft import SftJob


def preflight(stage: str) -> Callable[[cfgmod.DxConfig], None]:
    """Checks before anything is loaded or launched, each a one-line error: the attention kernel
    is available, and the memory plan fits hardware.gpu_memory_gb (refused with a `--set` that fits;
    no-op when the capacity is 0, as on cpu-tiny, or with hardware.skip_memory_check=true). Minutes
    of loading a 7B model would otherwise end in an ImportError or an OOM."""
    def check(config: cfgmod.DxConfig) -> None:
        check_attention(config.model.attn_implementation)
        check_plan_fits(config, stage)
    return check


def run_sft_stage(stage: str, *, out: Path, resolved: cfgmod.Resolved, data: Path | None = None,
                  images: Path | None = None, model: str | None = None, resume: bool = False,
                  force: bool = False, skip_bad: bool = False, spec: LaunchSpec | None = None,
                  say: Callable[[str], None] = print) -> Path:
    """align or instruct; returns the saved model folder (RUN/model)."""
    out = Path(out)
    config = prepare.open_run_dir(out, resolved, resume=resume, force=force, check=preflight(stage))
    records_file, images_root = prepare.run_records(out, "train-records.jsonl", resume=resume, say=say,
                                                    data=data, images=images, skip_bad=skip_bad)
    start = prepare.starting_model(model, config, out, lambda: [r.answer for r in load_records(records_file)])
    job = SftJob(stage=stage, run_dir=str(out), config=str(out / "config.yaml"), records=str(records_file),
                 images=str(images_root), model=start, resume=resume)
    launch(stage, job, spec_for(config, spec))  # on --resume, the saved config's process counts
    return out / "model"


def run_prpo_stage(*, out: Path, resolved: cfgmod.Resolved, model: str | None, data: Path | None = None,
                   images: Path | None = None, split: str = "train", domains: list[str] | None = None,
                   resume: bool = False, force: bool = False, spec: LaunchSpec | None = None,
                   say: Callable[[str], None] = print) -> Path:
    """PRPO / GRPO from an SFT checkpoint; returns RUN/model."""
    out = Path(out)
    config = prepare.open_run_dir(out, resolved, resume=resume, force=force, check=preflight("prpo"))
    start = resolve_model_path(model) or config.model.path
    if start is None:
        raise UsageError("--model is required: the instruct (SFT) checkpoint or run folder to start from")
    if config.prpo.algo == "grpo" and config.prpo.labels == "gt":
        say("grpo with --labels gt: rewards use ground-truth labels")
    records_file, images_root = prepare.run_records(
        out, "prompt-records.jsonl", resume=resume, say=say, data=data, images=images, split=split, domains=domains,
        require_labels=config.prpo.labels == "gt" and config.prpo.algo == "grpo")
    if config.prpo.clip and not Path(config.prpo.clip).exists() and "/" not in config.prpo.clip:
        raise DxError(f"prpo.clip={config.prpo.clip}: not a folder nor a hub id")
    job = PrpoJob(run_dir=str(out), config=str(out / "config.yaml"), records=str(records_file),
                  images=str(images_root), model=start, resume=resume)
    launch("prpo", job, spec_for(config, spec))
    return out / "model"


def run_infer(*, model: str, questions: Path, images: Path, out: Path, config: cfgmod.DxConfig,
              spec: LaunchSpec | None = None) -> int:
    """Check inputs, run the workers (in place or launched), merge their parts. Returns answers written."""
    checkpoint = resolve_model_path(model)
    if not Path(checkpoint).is_dir():
        raise DxError(f"--model {model}: no such checkpoint folder")
    load_questions(Path(questions))  # fail here, before any worker starts, on a bad file
    check_attention(config.model.attn_implementation)
    if not Path(images).is_dir():
        raise DxError(f"--images {images}: no such folder")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".dx-infer-{out.name}"
    work.mkdir(exist_ok=True)
    cfgmod.save(config, work / "config.yaml")
    job = InferJob(run_dir=str(work), config=str(work / "config.yaml"), questions=str(questions),
                   images=str(images), out=str(out), model=checkpoint)
    launch("infer", job, spec_for(config, spec))
    count = merge_outputs(out)
    shutil.rmtree(work, ignore_errors=True)
    return count
