"""`dx eval robust` (registered on the `eval` group)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dxcli.cli.common import DEFAULT_PROFILE_NAME, ProfileOpt, SetOpt, console, err_console, resolve_config


def robust(
    model: Annotated[str, typer.Option("--model", help="dx checkpoint folder (or a run folder).")],
    questions: Annotated[Path, typer.Option("--questions", help="Question JSONL (dx questions gen).")],
    images: Annotated[Path, typer.Option("--images", help="Image root the questions' paths are relative to.")],
    perturb: Annotated[Optional[str], typer.Option(
        "--perturb", help="Comma-separated perturbations: jpeg95, jpeg75, jpeg50, downscale (0.5x and back), "
                          "blur (Gaussian, radius 1.5), noise (Gaussian, sigma 8/255). Default: all.")] = None,
    work: Annotated[Optional[Path], typer.Option(
        "--work", help="Folder for the perturbed copies and answers (rerun to resume); default: a temporary "
                       "folder, removed at the end.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Discard the answers already in --work.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object: scores per perturbation.")] = False,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Images per generate call.")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help="Generation length cap.")] = None,
    nproc_per_node: Annotated[Optional[int], typer.Option("--nproc-per-node", help="Processes (each takes a shard).")] = None,
    profile: ProfileOpt = DEFAULT_PROFILE_NAME,
    sets: SetOpt = None,
) -> None:
    """How do F1 and the head's AUC hold up under JPEG, resizing, blur and noise?

    Answers the questions on the clean images and on perturbed copies of them (made in --work,
    never beside the originals), then prints one row per perturbation with F1 and AUC per domain
    and overall, and the change from clean.

    Example: dx eval robust --model runs/instruct --questions q.jsonl --images demo-data --work robust/ --perturb jpeg50,blur
    """
    import json

    from dxcli.evaluation.report import robust_tables
    from dxcli.jobs.robust import run_robust

    resolved = resolve_config(profile, sets, {"eval.batch_size": batch_size, "eval.max_new_tokens": max_new_tokens,
                                              "hardware.nproc_per_node": nproc_per_node}, show=not as_json)
    result = run_robust(model=model, questions=questions, images=images, config=resolved.config,
                        perturbations=perturb, work=work, force=force,
                        say=lambda line: err_console.print(line, markup=False, soft_wrap=True))
    if as_json:
        typer.echo(json.dumps({"work": str(work) if work else None, "scores": result.scores}))
        return
    for table in robust_tables(result.scores):
        console.print(table)
    if work:
        reused = f" (reused: {', '.join(result.resumed)})" if result.resumed else ""
        console.print(f"answers in {work}/<images>/answers.jsonl{reused}", soft_wrap=True, markup=False)
