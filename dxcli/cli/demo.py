"""`dx demo`: the one-command quickstart."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dxcli.cli.common import set_option, console, err_console

SetOpt = set_option("instruct.epochs=2")


def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for every step's output.")] = Path("dx-demo"),
    force: Annotated[bool, typer.Option("--force", help="Delete OUT and start over (default: resume).")] = False,
    sets: SetOpt = None,
) -> None:
    """Run the whole pipeline on the built-in demo data (cpu-tiny profile, offline, minutes on a CPU).

    demo data -> align -> instruct -> questions -> eval infer -> prpo -> eval infer -> eval score
    (instruct and prpo side by side) -> detect.
    The demo data is a pipeline check, not a deepfake benchmark.

    Example: dx demo --out dx-demo
    """
    from rich.markup import escape

    from dxcli.base.errors import DxError
    from dxcli.evaluation.report import print_summary
    from dxcli.pipeline import AUC_BAR, F1_BAR, run_demo

    result = run_demo(out, sets=sets, force=force, say=err_console.print)
    print_summary({"files": {"instruct": result.score, "prpo": result.score_prpo}}, console)
    d = result.detection
    console.print(f"detect {d['image']}: [bold]{d['verdict']}[/] (head P(fake) {d['head_prob']:.3f})")
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}")
    line = "; ".join(
        f"{name} F1 {score['overall']['f1'] or 0:.3f}, head ROC-AUC {score['overall'].get('head_auc') or 0:.3f}"
        for name, score in (("instruct", result.score), ("prpo", result.score_prpo)))
    line += f" (bars: F1 {F1_BAR} or ROC-AUC {AUC_BAR}, each model)"
    if not result.passed:
        raise DxError(f"demo below the bar: {line}")
    console.print(f"[green]demo passed[/]: {line}; outputs in {result.out}")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
