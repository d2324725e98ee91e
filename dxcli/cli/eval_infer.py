"""`dx eval infer` (registered on the `eval` group)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dxcli.cli.common import DEFAULT_PROFILE_NAME, ProfileOpt, set_option, console, resolve_config

SetOpt = set_option("eval.batch_size=8")


def infer(
    model: Annotated[str, typer.Option("--model", help="dx checkpoint folder (or a run folder).")],
    questions: Annotated[Path, typer.Option("--questions", help="Question JSONL (dx questions gen).")],
    images: Annotated[Path, typer.Option("--images", help="Image root the questions' paths are relative to.")],
    out: Annotated[Path, typer.Option("--out", help="Answers JSONL; rerun to resume.")],
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Images per generate call.")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help="Generation length cap.")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="0 = greedy (default); > 0 samples.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Sampling seed.")] = None,
    nproc_per_node: Annotated[Optional[int], typer.Option("--nproc-per-node", help="Processes (each takes a shard).")] = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Succeed even when some images cannot be read (they stay in OUT as error rows, left out of the scores).")] = False,
    profile: ProfileOpt = DEFAULT_PROFILE_NAME,
    sets: SetOpt = None,
) -> None:
    """Answer every question with batched generation; lines are appended as they come.

    Example: dx eval infer --model runs/instruct --questions q.jsonl --images demo-data --out answers.jsonl
    """
    from dxcli.jobs.stages import run_infer
    from dxcli.evaluation.report import print_summary
    from dxcli.evaluation.score import score_file

    resolved = resolve_config(profile, sets, {
        "eval.batch_size": batch_size, "eval.max_new_tokens": max_new_tokens, "eval.temperature": temperature,
        "eval.seed": seed, "hardware.nproc_per_node": nproc_per_node})
    count = run_infer(model=model, questions=questions, images=images, out=out, config=resolved.config,
                      skip_bad=skip_bad)
    console.print(f"[green]{count} answers[/] in {out}")
    print_summary(score_file(out), console)
