"""`dx eval ...`: scoring (and, later, inference). One function per command; the work lives in
dxcli.evaluation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dxcli.cli.common import console, err_console

app = typer.Typer(help="Evaluate a model: answer questions, score answers.", no_args_is_help=True)


@app.command("score")
def score(
    answers: Annotated[list[Path], typer.Argument(help="Answer JSONL file(s) (SPEC section 3).")],
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


from dxcli.cli.eval_infer import infer  # noqa: E402  (light: typer only)

app.command("infer")(infer)

from dxcli.cli.eval_rewards import rewards  # noqa: E402

app.command("rewards")(rewards)
