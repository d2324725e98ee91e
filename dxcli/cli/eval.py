"""`dx eval ...`: infer, score, report, rewards, robust. One function per command; the work lives in the library."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dxcli.cli.common import console, err_console
from dxcli.cli.eval_infer import infer
from dxcli.cli.eval_rewards import rewards
from dxcli.cli.eval_robust import robust

app = typer.Typer(help="Evaluate a model: answer questions, score answers, write a report.",
                  no_args_is_help=True)


@app.command("score")
def score(
    answers: Annotated[list[Path], typer.Argument(help="Answer JSONL file(s) (docs/METHOD.md §4).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object only.")] = False,
    by: Annotated[str, typer.Option("--by", help="Answer field to group rows by.")] = "domain",
    plot: Annotated[Path | None, typer.Option("--plot", help="Write the head ROC curve and the "
                                              "confusion matrix to this PNG.")] = None,
) -> None:
    """Score answer files (F1 and more, per domain and overall).

    Fake is the positive class and an answer without a verdict counts as wrong; balanced
    accuracy, valid-only figures, invalid rate, confusion matrix and the binary head's ROC-AUC,
    average precision (AP) and equal error rate (EER) are shown too. Several files are shown
    side by side.

    Example: dx eval score runs/sft/answers.jsonl runs/prpo/answers.jsonl --plot roc.png
    """
    import json

    from dxcli.evaluation import score as scoring
    from rich.markup import escape

    from dxcli.evaluation.report import print_summary

    rows_by_file = scoring.load_files(answers)
    for name in rows_by_file:
        if scoring.torn_tail(Path(name)):
            err_console.print(f"[yellow]warning:[/] {escape(name)}: skipped a torn last line "
                              "(no newline; a crash mid-write?)")
    result = scoring.score_many(rows_by_file, by=by)
    # The scores come first, so a plot that cannot be written does not cost the user the table.
    if as_json:
        typer.echo(json.dumps(result))
    else:
        print_summary(result, console)
    if plot is not None:
        written = scoring.plot(rows_by_file, plot)
        err_console.print(f"plot written to {written}")


@app.command("report")
def report(
    answers: Annotated[list[Path], typer.Argument(help="Answer JSONL file(s); several are "
                                                  "compared side by side.")],
    out: Annotated[Path, typer.Option("--out", help="HTML file to write.")],
    images: Annotated[Path | None, typer.Option("--images", help="Image root the answers' "
                                                "image paths are relative to (thumbnails).")] = None,
    rewards: Annotated[list[Path] | None, typer.Option(
        "--rewards", help="`dx eval rewards --json` output: PCR/VCR per paragraph (repeatable).")
    ] = None,
    questions: Annotated[Path | None, typer.Option("--questions", help="Questions JSONL, to "
                                                   "show each mistake's question.")] = None,
    worst: Annotated[int, typer.Option("--worst", min=0, help="Mistakes shown per file.")] = 20,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --out.")] = False,
) -> None:
    """Write one self-contained HTML report: metrics, confusion matrices, head curves, mistakes.

    Per-domain and overall metrics of each file (side by side for several), ROC and
    precision-recall curves of the binary head, and the worst mistakes first with thumbnail,
    reasoning paragraphs, verdict, label and head probability. Images and plots are inlined:
    the file opens offline.

    Example: dx eval report runs/sft/answers.jsonl runs/prpo/answers.jsonl --images demo-data --out report.html
    """
    from rich.markup import escape

    from dxcli.evaluation.html_report import write_report

    result = write_report(answers, out, images_root=images, rewards=rewards or [],
                          questions=questions, worst=worst, force=force)
    if result.rewards_matched == 0 and result.mistakes_shown:
        err_console.print("[yellow]warning:[/] no shown mistake matched a --rewards response "
                          "(were they computed from these answer files?)", soft_wrap=True)
    # soft_wrap: a long path stays on one line, whole for copying
    console.print(f"report written to {escape(str(result.out))} "
                  f"({result.mistakes_shown} mistakes shown)", soft_wrap=True)


app.command("infer")(infer)
app.command("rewards")(rewards)
app.command("robust")(robust)
