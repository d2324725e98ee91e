"""Run one training stage end to end from the parent process: run folder, records, model, workers."""

from __future__ import annotations

from pathlib import Path

from dxcli import config as cfgmod
from dxcli.training import prepare
from dxcli.training.launch import LaunchSpec, launch, spec_for


def launch_spec(config: cfgmod.DxConfig, node_rank: int = 0, master_addr: str = "127.0.0.1",
                master_port: int | None = None, hostfile: str | None = None) -> LaunchSpec:
    return LaunchSpec(config.hardware.nproc_per_node, config.hardware.nnodes, node_rank, master_addr,
                      master_port, hostfile)


def run_sft_stage(stage: str, *, out: Path, resolved: cfgmod.Resolved, data: Path | None = None,
                  images: Path | None = None, model: str | None = None, resume: bool = False,
                  force: bool = False, skip_bad: bool = False, spec: LaunchSpec | None = None,
                  say=print) -> Path:
    """align or instruct; returns the saved model folder (RUN/model)."""
    from dxcli.data.records import load_records

    out = Path(out)
    config = prepare.open_run_dir(out, resolved, resume=resume, force=force)
    records_file, images_root = prepare.run_records(out, "train-records.jsonl", resume=resume, say=say,
                                                    data=data, images=images, skip_bad=skip_bad)
    start = prepare.starting_model(model, config, out, lambda: [r.answer for r in load_records(records_file)])
    job = {"stage": stage, "run_dir": str(out), "records": str(records_file), "images": str(images_root),
           "model": start, "resume": resume}
    launch(stage, job, out, spec_for(config, spec))  # on --resume, the saved config's process counts
    return out / "model"


def run_prpo_stage(*, out: Path, resolved: cfgmod.Resolved, model: str | None, data: Path | None = None,
                   images: Path | None = None, split: str = "train", domains: list[str] | None = None,
                   resume: bool = False, force: bool = False, spec: LaunchSpec | None = None, say=print) -> Path:
    """PRPO / GRPO from an SFT checkpoint; returns RUN/model."""
    from dxcli.errors import DxError, UsageError

    out = Path(out)
    config = prepare.open_run_dir(out, resolved, resume=resume, force=force)
    start = prepare.resolve_model_path(model) or config.model.path
    if start is None:
        raise UsageError("--model is required: the instruct (SFT) checkpoint or run folder to start from")
    if config.prpo.algo == "grpo" and config.prpo.labels == "gt":
        say("grpo with --labels gt: rewards use ground-truth labels")
    records_file, images_root = prepare.run_records(
        out, "prompt-records.jsonl", resume=resume, say=say, data=data, images=images, split=split, domains=domains,
        require_labels=config.prpo.labels == "gt" and config.prpo.algo == "grpo")
    if config.prpo.clip and not Path(config.prpo.clip).exists() and "/" not in config.prpo.clip:
        raise DxError(f"prpo.clip={config.prpo.clip}: not a folder nor a hub id")
    job = {"run_dir": str(out), "records": str(records_file), "images": str(images_root), "model": start,
           "resume": resume}
    launch("prpo", job, out, spec_for(config, spec))
    return out / "model"
