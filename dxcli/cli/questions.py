"""`dx questions gen`: build an evaluation question set (JSONL) from a tree or records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from dxcli.cli.common import console, err_console

app = typer.Typer(help="Evaluation question sets (question JSONL).", no_args_is_help=True)
MAX_MISMATCH_LINES = 20


@app.command()
def gen(
    source: Annotated[Path, typer.Argument(help="A tree ROOT/<domain>/<split>/<label>/<file> or a records file (JSON/JSONL).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Question JSONL to write.")],
    n: Annotated[Optional[int], typer.Option("--n", help="Number of questions (default: all).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed: same seed, byte-identical file.")] = 0,
    balanced: Annotated[bool, typer.Option("--balanced", help="Equal numbers of real and fake.")] = False,
    split: Annotated[str, typer.Option("--split", help="train, val or test.")] = "test",
    domain: Annotated[Optional[str], typer.Option("--domain", help="Only this domain.")] = None,
    images: Annotated[Optional[Path], typer.Option("--images", help="Image root of a records file (paths are checked to stay inside).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print exactly one JSON summary object on stdout.")] = False,
) -> None:
    """Write question JSONL lines {question_id, image, text, label, domain}.

    Labels come from the label folders; with records they are cross-checked against each
    answer's '### Answer:' marker and binary_label, and disagreements are reported.

    Example: dx questions gen demo-data --out questions.jsonl --n 100 --balanced --seed 0
    """
    from dxcli.base.jsonio import write_jsonl_atomic
    from dxcli.data.questions import counts_by_domain, generate_questions

    questions, mismatches = generate_questions(source, n=n, seed=seed, balanced=balanced,
                                               split=split, domain=domain, images_root=images)
    write_jsonl_atomic(out, questions)
    counts = counts_by_domain(questions)
    if json_out:
        typer.echo(json.dumps({"out": str(out), "questions": len(questions), "counts": counts,
                               "mismatches": mismatches}, ensure_ascii=False))
        return
    from rich.table import Table

    table = Table(title=f"{out}: {len(questions)} questions", title_justify="left")
    for column in ("domain", "real", "fake"):
        table.add_column(column, justify="left" if column == "domain" else "right")
    for name, per_label in sorted(counts.items()):
        table.add_row(name, str(per_label["real"]), str(per_label["fake"]))
    console.print(table)
    if mismatches:
        err_console.print(f"[yellow]{len(mismatches)} label mismatch(es):[/]")
        for line in mismatches[:MAX_MISMATCH_LINES]:
            err_console.print(f"  {line}", markup=False)
        if len(mismatches) > MAX_MISMATCH_LINES:
            err_console.print(f"  ... and {len(mismatches) - MAX_MISMATCH_LINES} more (see --json)")
