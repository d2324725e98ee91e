"""Run one training stage end to end from the parent process: run folder, records, model, workers."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from dxcli import config as cfgmod
from dxcli.training import prepare
from dxcli.training.launch import LaunchSpec, launch


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
    records_file = out / "train-records.jsonl"
    root_note = out / "images-root.txt"
    if resume and records_file.is_file() and root_note.is_file():
        images_root = Path(root_note.read_text().strip())
    else:
        prepared = prepare.prepare_records(data, images, out, skip_bad=skip_bad)
        images_root = prepared.images_root
        root_note.write_text(str(images_root.resolve()))
        if prepared.skipped:
            say(f"skipped {len(prepared.skipped)} record(s) with missing or unreadable images")
        say(f"{prepared.n_records} training records -> {records_file}")
    start = prepare.starting_model(model, config, out, lambda: [r.answer for r in load_records(records_file)])
    job = {"stage": stage, "run_dir": str(out), "records": str(records_file), "images": str(images_root),
           "model": start, "resume": resume}
    # process counts come from the run's own config (on --resume, the saved one)
    spec = replace(spec or LaunchSpec(), nproc_per_node=config.hardware.nproc_per_node, nnodes=config.hardware.nnodes)
    launch(stage, job, out, spec)
    return out / "model"


def run_prpo_stage(*, out: Path, resolved: cfgmod.Resolved, model: str | None, data: Path | None = None,
                   images: Path | None = None, split: str = "train", domains: list[str] | None = None, resume: bool = False, force: bool = False,
                   spec: LaunchSpec | None = None, say=print) -> Path:
    """PRPO / GRPO from an SFT checkpoint; returns RUN/model."""
    from dxcli.errors import DxError, UsageError

    out = Path(out)
    config = prepare.open_run_dir(out, resolved, resume=resume, force=force)
    start = prepare.resolve_model_path(model) or config.model.path
    if start is None:
        raise UsageError("--model is required: the instruct (SFT) checkpoint or run folder to start from")
    if config.prpo.algo == "grpo" and config.prpo.labels == "gt":
        say("grpo with --labels gt: rewards use ground-truth labels")
    records_file = out / "prompt-records.jsonl"
    root_note = out / "images-root.txt"
    if resume and records_file.is_file() and root_note.is_file():
        images_root = Path(root_note.read_text().strip())
    else:
        prepared = prepare.prepare_records(data, images, out, split=split, name=records_file.name, domains=domains,
                                           require_labels=config.prpo.labels == "gt" and config.prpo.algo == "grpo")
        images_root = prepared.images_root
        root_note.write_text(str(images_root.resolve()))
        say(f"{prepared.n_records} prompts ({split}) -> {records_file}")
    if config.prpo.clip and not Path(config.prpo.clip).exists() and "/" not in config.prpo.clip:
        raise DxError(f"prpo.clip={config.prpo.clip}: not a folder nor a hub id")
    job = {"run_dir": str(out), "records": str(records_file), "images": str(images_root), "model": start,
           "resume": resume}
    spec = replace(spec or LaunchSpec(), nproc_per_node=config.hardware.nproc_per_node, nnodes=config.hardware.nnodes)
    launch("prpo", job, out, spec)
    return out / "model"
