"""Rich tables for a score result (the output of `score.score_many`). Imports only rich.

`print_summary(result, console)` is what `dx eval score` prints, and what `dx eval infer` prints
at the end of a run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich import box
from rich.columns import Columns
from rich.console import Console
from rich.markup import escape
from rich.table import Table

OVERALL = "overall"
# (metrics key, header): the full set for one file, a compact set per file when side by side.
FULL_COLUMNS = [
    ("n", "n"), ("accuracy", "acc"), ("balanced_accuracy", "bal\nacc"), ("precision", "prec"),
    ("recall", "rec"), ("f1", "F1"), ("invalid", "inv"), ("f1_valid", "F1\nvalid"),
    ("head_auc", "head\nAUC"), ("ap", "head\nAP"), ("eer", "head\nEER"),
    ("head_accuracy", "head\nacc"), ("agreement", "agree"),
]
COMPACT_COLUMNS = [("n", "n"), ("f1", "F1"), ("balanced_accuracy", "bal acc"), ("invalid", "inv"),
                   ("f1_valid", "F1 val"), ("head_auc", "AUC"), ("ap", "AP"), ("eer", "EER")]
MINIMAL_COLUMNS = [("f1", "F1"), ("invalid", "inv"), ("head_auc", "AUC")]  # 3+ files
# Dropped in this order, first to last, while the table is wider than the terminal.
DROP_ORDER = ("agreement", "head_accuracy", "precision", "recall", "f1_valid", "accuracy", "ap",
              "n")
COUNT_KEYS = {"n", "invalid"}


def print_summary(result: Mapping[str, Any], console: Console) -> None:
    """Per-group rows and the overall row, then the overall confusion matrix (per file)."""
    files = _files(result)
    console.print(metrics_table(files, console))
    for letter, name in zip(files, result.get("files", {})):  # several files: the letter legend
        console.print(f"  [bold]{letter}[/] = {escape(name)}", highlight=False)
    matrices = [confusion_table(res["overall"]["confusion"],
                                title=" ".join(filter(None, ["confusion", letter, "(overall)"])))
                for letter, res in files.items()]
    console.print(Columns(matrices, padding=(0, 4)))
    for letter, res in files.items():
        if res.get("errors"):
            console.print(f"[yellow]{' '.join(filter(None, [letter, str(res['errors'])]))} answer line(s) with an "
                          "error (image not read) left out of the figures[/]")


def metrics_table(files: Mapping[str, Mapping[str, Any]], console: Console | None = None) -> Table:
    """One row per group plus overall; one column group per file, headed by its letter.

    Rates are percentages (positive class fake; a null verdict counts as wrong). With a
    `console`, the least telling figures are left out until the table fits its width, rather
    than letting rich squeeze every number into an ellipsis.
    """
    columns = _columns_for(len(files))
    table = _build_table(files, columns)
    while console is not None and _width(table, console) > console.width:
        droppable = [key for key in DROP_ORDER if any(key == k for k, _ in columns)]
        if not droppable or len(columns) == 1:
            break
        columns = [(key, header) for key, header in columns if key != droppable[0]]
        table = _build_table(files, columns)
        table.caption = "narrow terminal: some figures left out (--json has them all)"
        table.caption_justify = "left"
    return table


def _width(table: Table, console: Console) -> int:
    from rich.measure import Measurement

    # Measured without the console's limit, which would clamp the answer to the width itself.
    unlimited = console.options.update(max_width=10_000)
    return Measurement.get(console, unlimited, table).maximum


def _build_table(files: Mapping[str, Mapping[str, Any]], columns: list[tuple[str, str]]) -> Table:
    several = len(files) > 1
    table = Table(title="scores in % (positive: fake; no verdict = wrong)", title_justify="left",
                  box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    table.add_column("group", no_wrap=True)
    for letter in files:
        for _, header in columns:
            table.add_column(f"{letter}\n{header}" if several else header, justify="right")
    groups = sorted({g for res in files.values() for g in res["domains"]})
    for group in [*groups, OVERALL]:
        cells = []
        for res in files.values():
            metrics = res["overall"] if group == OVERALL else res["domains"].get(group)
            cells += [cell_text(metrics, key) for key, _ in columns]
        style = "bold" if group == OVERALL else None
        table.add_row(group, *cells, style=style, end_section=bool(groups) and group == groups[-1])
    return table


def confusion_table(confusion: list[list[int]], title: str) -> Table:
    """2x2 counts, rows = true label, columns = predicted (real, fake)."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("true \\ pred")
    table.add_column("real", justify="right")
    table.add_column("fake", justify="right")
    for name, row in zip(("real", "fake"), confusion):
        table.add_row(name, *(str(count) for count in row))
    return table


def _files(result: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """`{column letter: single-file result}`: A, B, ... for several files, "" for one."""
    if "files" not in result:
        return {"": result}
    return {_letter(i): res for i, res in enumerate(result["files"].values())}


def _letter(index: int) -> str:
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("A") + rest) + letters
    return letters


def _columns_for(n_files: int) -> list[tuple[str, str]]:
    """Fewer figures per file as files are added, so the table fits a terminal."""
    if n_files == 1:
        return FULL_COLUMNS
    return COMPACT_COLUMNS if n_files == 2 else MINIMAL_COLUMNS


def cell_text(metrics: Mapping[str, Any] | None, key: str) -> str:
    if metrics is None:
        return ""
    value = metrics.get(key)
    if value is None:
        return "-"
    return str(value) if key in COUNT_KEYS else f"{100 * value:.1f}"


def print_rewards(explained: list[dict[str, Any]], summary: Mapping[str, Any], console: Console) -> None:
    """`dx eval rewards`: one paragraph table per response in `explained` (may be empty), then the summary."""
    for row in explained:
        for index, response in enumerate(row["responses"]):
            table = Table(title=escape(f"{row['image'] or '(no image)'} - response {index + 1}: answer "
                                       f"{response['answer'] or 'none'}"), title_justify="left")
            for column in ("paragraph", "keyword", "label", "VCR", "PCR", "reward", "adv"):
                table.add_column(column)
            for p in response["paragraphs"]:
                text = p["text"] if len(p["text"]) <= 60 else p["text"][:57] + "..."
                vcr = "-" if p["vcr"] is None else f"{p['vcr']:.3f}"
                table.add_row(escape(text), escape(p["keyword"]), p["label"] or "-", vcr, f"{p['pcr']:.0f}",
                              f"{p['reward']:.3f}", f"{p['advantage']:+.2f}")
            console.print(table)
    table = Table(title="summary", title_justify="left")
    table.add_column("measure")
    table.add_column("value")
    for key, value in summary.items():
        table.add_row(key, "-" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value)))
    console.print(table)



ROBUST_METRICS = [("f1", "F1"), ("head_auc", "head AUC")]


def robust_tables(scores: Mapping[str, Mapping[str, Any]], clean: str = "clean") -> list[Table]:
    """`dx eval robust`: per metric (F1, head AUC), one row per perturbation (the clean images
    first), one column per domain and overall; under each perturbed figure, its change from clean.
    A table per metric keeps a five-domain result within a terminal's width."""
    groups = sorted({g for res in scores.values() for g in res["domains"]})
    base = scores.get(clean)
    tables = []
    for key, header in ROBUST_METRICS:
        table = Table(title=f"{header} % (positive: fake), below: change vs {clean}", title_justify="left",
                      box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
        table.add_column("images", no_wrap=True)
        for group in [*groups, OVERALL]:
            table.add_column(group, justify="right", style="bold" if group == OVERALL else None)
        for name, res in scores.items():
            cells = [_robust_cell(_group(res, group), None if base is None or name == clean else _group(base, group),
                                  key) for group in [*groups, OVERALL]]
            table.add_row(name, *cells, end_section=name == clean)
        tables.append(table)
    return tables


def _group(result: Mapping[str, Any], group: str) -> Mapping[str, Any] | None:
    return result["overall"] if group == OVERALL else result["domains"].get(group)


def _robust_cell(metrics: Mapping[str, Any] | None, reference: Mapping[str, Any] | None, key: str) -> str:
    text = cell_text(metrics, key)
    value = None if metrics is None else metrics.get(key)
    before = None if reference is None else reference.get(key)
    if value is None or before is None:
        return text
    return f"{text}\n[dim]{100 * (value - before):+.1f}[/]"
