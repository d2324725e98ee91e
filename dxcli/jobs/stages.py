"""Run one stage end to end from the parent process: inputs checked, run folder, records,
starting model, then the workers (in place or launched). The library entry points of
`dx train align|instruct|prpo` and `dx eval infer`."""

from __future__ import annotations

import functools
import json
import shutil
import sys
from pathlib import Path
from typing import Callable

from dxcli import config as cfgmod
from dxcli.base.errors import DxError, UsageError
from dxcli.base.jsonio import iter_jsonl
from dxcli.data.records import load_records
from dxcli.data.reason_check import reasoning_warning
from dxcli.evaluation.infer import InferJob, load_questions, merge_outputs
from dxcli.jobs import prepare
from dxcli.jobs.launch import LaunchSpec, join_run, launch, spec_for
from dxcli.jobs.memory import check_plan_fits
from dxcli.model.checkpoint import check_attention, resolve_model_path
from dxcli.model.checkpointing import check_deepspeed
from dxcli.model.kernels import check_kernels
from dxcli.rl.clip import check_clip_spec
from dxcli.training.prpo import PrpoJob
from dxcli.training.sft import SftJob


def preflight(stage: str) -> Callable[[cfgmod.DxConfig], None]:
    """Checks before anything is loaded or launched, each a one-line error: the attention kernel
    is available (and hardware.kernels' fused kernels), and the memory plan fits hardware.gpu_memory_gb (refused with a `--set` that fits;
    no-op when the capacity is 0, as on cpu-tiny, or with hardware.skip_memory_check=true), and
    PRPO's CLIP is on disk (fetched here once with model.download=true). Minutes of loading a 7B
    model would otherwise end in an ImportError, an OOM or a missing file. Settings that run but
    are probably not meant (config.stage_warnings) are printed as plain lines."""
    def check(config: cfgmod.DxConfig) -> None:
        check_attention(config.model.attn_implementation)
        check_kernels(config.hardware.kernels)  # liger: a CUDA GPU and the liger-kernel package
        check_plan_fits(config, stage)
        check_deepspeed(cfgmod.zero_stage_for(config, stage), config.train.grad_checkpointing)
        if stage == "prpo" and config.prpo.algo == "prpo" and config.prpo.clip:  # grpo loads no CLIP
            check_clip_spec(config.prpo.clip, download=config.model.download)
        for line in cfgmod.stage_warnings(config, stage):
            print(f"warning: {line}", file=sys.stderr, flush=True)
    return check


def run_sft_stage(stage: str, *, out: Path, resolved: cfgmod.Resolved, data: Path | None = None,
                  images: Path | None = None, model: str | None = None, resume: bool = False,
                  force: bool = False, skip_bad: bool = False, spec: LaunchSpec | None = None,
                  say: Callable[[str], None] = print) -> Path:
    """align or instruct; returns the saved model folder (RUN/model). On a node other than 0
    (`spec.node_rank`), only this node's workers run: node 0 prepares the shared RUN and saves it."""
    out = Path(out)
    if spec is not None and spec.joins_node0:
        return join_run(stage, out, spec_for(resolved.config, spec), say)
    config = prepare.open_run_dir(out, resolved, resume=resume, force=force, check=preflight(stage))
    records_file, images_root = prepare.run_records(out, "train-records.jsonl", resume=resume, say=say,
                                                    data=data, images=images, skip_bad=skip_bad)
    records = functools.cache(lambda: load_records(records_file))  # read once, and only if needed
    if stage == "instruct":  # align learns the projector; its answers are not what it is for
        missing = reasoning_warning(records(), data)
        if missing:  # a plain line: a rich console would wrap it
            print(f"warning: {missing}", file=sys.stderr, flush=True)
    start = prepare.starting_model(model, config, out, lambda: [r.answer for r in records()])
    job = SftJob(stage=stage, run_dir=str(out), config=str(out / "config.yaml"), records=str(records_file),
                 images=str(images_root), model=start, resume=resume)
    launch(stage, job, spec_for(config, spec))  # on --resume, the saved config's process counts
    warning = sft_head_warning(out) if stage == "instruct" else None  # align is short by design
    if warning:
        say(f"warning: {warning}")
    return out / "model"


HEAD_CHANCE_LOSS = 0.693  # ln 2: the binary head's loss when its P(fake) says nothing
HEAD_WARN_STEPS = 20  # shorter runs are smoke tests; their head has had no time to learn


def sft_head_warning(run_dir: Path, window: int = 5) -> str | None:
    """One plain line when the binary head ended an instruct run at chance: the mean `bin_loss` of
    the last `window` logged steps within 5% of ln 2. Such a model's P(fake) is noise, and its
    verdicts are often one label for every image (on the first hard demo design, 2 of 12
    leave-one-domain-out instruct runs ended so: tests/bench/README.md)."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = [r for r in iter_jsonl(path) if "bin_loss" in r] if path.is_file() else []
    if len(rows) < window or rows[-1].get("step", 0) < HEAD_WARN_STEPS:
        return None
    loss = sum(r["bin_loss"] for r in rows[-window:]) / window
    if loss < 0.95 * HEAD_CHANCE_LOSS:
        return None
    return (f"instruct: the binary head did not learn (bin_loss {loss:.3f} over the last {window} logged steps, "
            f"chance is {HEAD_CHANCE_LOSS}): its P(fake) is noise and the verdicts may all be one label; "
            "check the data's labels, or train again with another train.seed or more train.max_steps")


def run_prpo_stage(*, out: Path, resolved: cfgmod.Resolved, model: str | None, data: Path | None = None,
                   images: Path | None = None, split: str = "train", domains: list[str] | None = None,
                   resume: bool = False, force: bool = False, spec: LaunchSpec | None = None,
                   say: Callable[[str], None] = print) -> Path:
    """PRPO / GRPO from an SFT checkpoint; returns RUN/model (node 0 saves it; see run_sft_stage)."""
    out = Path(out)
    if spec is not None and spec.joins_node0:
        return join_run("prpo", out, spec_for(resolved.config, spec), say)
    config = prepare.open_run_dir(out, resolved, resume=resume, force=force, check=preflight("prpo"))
    start = resolve_model_path(model) or config.model.path
    if start is None:
        raise UsageError("--model is required: the instruct (SFT) checkpoint or run folder to start from")
    if config.prpo.algo == "grpo" and config.prpo.labels == "gt":
        say("grpo with --labels gt: rewards use ground-truth labels")
    records_file, images_root = prepare.run_records(
        out, "prompt-records.jsonl", resume=resume, say=say, data=data, images=images, split=split, domains=domains,
        require_labels=config.prpo.labels == "gt" and config.prpo.algo == "grpo")
    job = PrpoJob(run_dir=str(out), config=str(out / "config.yaml"), records=str(records_file),
                  images=str(images_root), model=start, resume=resume)
    launch("prpo", job, spec_for(config, spec))
    for warning in prpo_warnings(out):
        say(f"warning: {warning}")
    return out / "model"


def prpo_warnings(run_dir: Path) -> list[str]:
    """The plain lines a finished PRPO/GRPO run ends with, from the loop's RUN/summary.json (read
    once): no learning signal in any step, and the collapse guard's stop. None without a summary."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return []
    summary = json.loads(path.read_text(encoding="utf-8"))
    return [w for w in (_signal_warning(summary), _guard_warning(summary, Path(run_dir))) if w]


def _guard_warning(summary: dict, run_dir: Path) -> str | None:
    """When the collapse guard stopped the run: what drifted, and which weights RUN/model holds."""
    tripped = summary.get("stopped_by_guard")
    if not tripped:
        return None
    return (f"collapse guard: stopped at step {tripped['step']}: {tripped['reason']}; {run_dir / 'model'} "
            f"holds the weights of step {tripped['restored_step']} (the last healthy probe), the drifted ones are "
            f"in {tripped.get('drifted_model')}; lower prpo.lr or raise prpo.beta, or --set prpo.guard=false to "
            "train on regardless")


def _signal_warning(summary: dict) -> str | None:
    """When no step had a non-zero advantage: such a run returns a model that learned nothing from
    its rewards."""
    if not summary.get("steps") or summary.get("steps_with_signal", 1) > 0:
        return None
    if summary.get("steps_all_invalid") == summary["steps"]:
        hint = (f"no sampled response reached '### Answer:' within prpo.max_new_tokens="
                f"{summary.get('max_new_tokens')}: raise it (--set prpo.max_new_tokens=...)")
    else:
        varies = "a reward that varies (--clip adds VCR), " if summary.get("algo") == "prpo" else ""
        hint = (f"the rewards never differed within a group: try {varies}a larger prpo.group_size "
                "or a higher prpo.temperature")
    return (f"{summary.get('algo', 'prpo')}: no learning signal in any step (all advantages zero): "
            f"the model did not learn from the rewards; {hint}")


def run_infer(*, model: str, questions: Path, images: Path, out: Path, config: cfgmod.DxConfig,
              spec: LaunchSpec | None = None, skip_bad: bool = False) -> int:
    """Check inputs, run the workers (in place or launched), merge their parts. Returns answers written.

    Questions whose image could not be read are kept in OUT as rows with an `error` (scoring
    leaves them out); unless `skip_bad`, they make the command fail after the rest is answered.
    """
    checkpoint = resolve_model_path(model)
    if not Path(checkpoint).is_dir():
        raise UsageError(f"--model {model}: no such checkpoint folder")
    if not Path(questions).is_file():
        raise UsageError(f"--questions {questions}: no such file")
    load_questions(Path(questions))  # fail here, before any worker starts, on a bad file
    check_attention(config.model.attn_implementation)
    if not Path(images).is_dir():
        raise UsageError(f"--images {images}: no such folder")
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
    failed = [row for row in iter_jsonl(out) if row.get("error")]
    if failed and not skip_bad:
        listing = "; ".join(f"{row['image']} ({row['error']})" for row in failed[:3])
        more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
        raise DxError(f"{len(failed)} of {count} question(s) have an image that could not be read: {listing}{more}. "
                      f"The other answers are in {out}; pass --skip-bad to accept this")
    return count
