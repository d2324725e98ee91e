"""`dx dataset check|split|demo`: parse arguments and print; the work is in dxcli.data."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from dxcli.cli.common import DEFAULT_PROFILE_NAME, ProfileOpt, set_option, console, err_console, is_tty

SetOpt = set_option("dataset.workers=2")

app = typer.Typer(help="Check, split and generate image datasets (ROOT/<domain>/<split>/<label>/<file>, "
                       "or the ForenSynths, GenImage and Chameleon layouts).",
                  no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")]
MAX_PROBLEM_ROWS = 40  # the table stays readable; --json has them all


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar on stderr when it is a terminal; otherwise no callback at all."""
    if not is_tty():
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=err_console, transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def print_json(obj: dict[str, Any]) -> None:
    typer.echo(json.dumps(obj, ensure_ascii=False))


def counts_table(counts: dict[str, dict[str, dict[str, int]]], title: str = "images"):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in ("domain", "split", "real", "fake", "total"):
        table.add_column(column, justify="left" if column in ("domain", "split") else "right")
    for domain, splits in counts.items():
        for split, labels in splits.items():
            table.add_row(domain, split, str(labels["real"]), str(labels["fake"]),
                          str(labels["real"] + labels["fake"]))
    return table


def print_layout(layout: dict[str, Any], notes: bool = True) -> None:
    """The layout a tree was read in (`Layout.to_json()`), and what that reading decided."""
    from rich.markup import escape

    console.print(f"layout: [bold]{escape(layout['title'])}[/] {escape(layout['pattern'])}")
    for note in layout["notes"] if notes else ():
        console.print(f"  {escape(note)}")


def _problems_table(problems: list[dict[str, str]]):
    from rich.table import Table

    table = Table(title="problems", title_justify="left")
    for column in ("", "kind", "path", "detail"):
        table.add_column(column, overflow="fold")
    for problem in problems[:MAX_PROBLEM_ROWS]:
        error = problem["severity"] == "error"
        table.add_row("[red]error[/]" if error else "[yellow]warn[/]", problem["kind"],
                      problem["path"], problem["detail"])
    return table


@app.command()
def check(
    root: Annotated[Path, typer.Argument(help="Dataset tree: ROOT/<domain>/<split>/<label>/<file>, or a ForenSynths, GenImage or Chameleon tree.")],
    json_out: JsonOpt = False,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Decoding processes (0 = all cores).")] = None,
    profile: ProfileOpt = DEFAULT_PROFILE_NAME,
    sets: SetOpt = None,
) -> None:
    """Recognise the layout, decode every image, count per domain x split x label, report problems.

    Layouts: <domain>/<split>/<label> (dx); <domain>/[<category>/]<label> (no split folders: all
    test); [<split>/]<label> (Chameleon: one domain named after ROOT); ForenSynths
    train|val/<category>/<label> (domain progan) and test/<generator>/[<category>/]<label>;
    GenImage <generator>/<subset>/<split>/<label>. Labels real|0_real|nature, fake|1_fake|ai.
    An ambiguous tree is an error that says what to rename. --json adds "layout" for a non-dx tree.

    Errors (exit 1): corrupt, empty, not_image, too_large, unexpected_dir, duplicate (same bytes
    twice in one split, any domains), leak (same bytes in two splits). Warnings (exit 0):
    too_small, imbalance, stray_file. Config keys: dataset.min_side, dataset.max_pixels,
    dataset.imbalance_ratio, dataset.workers.

    Example: dx dataset check demo-data --json
    """
    from dxcli.cli.common import resolve_config
    from dxcli.data.check import check_tree

    settings = resolve_config(profile, sets, {"dataset.workers": workers}, show=False).config.dataset
    with progress_bar("decoding") as progress:
        report = check_tree(root, min_side=settings.min_side, max_pixels=settings.max_pixels,
                            imbalance_ratio=settings.imbalance_ratio, workers=settings.workers,
                            progress=progress)
    if json_out:
        print_json(report.to_json())
    else:
        print_layout(report.layout.to_json())
        console.print(counts_table(report.counts, f"{root}: {report.images} images"))
        if report.problems:
            console.print(_problems_table(report.problems))
            if len(report.problems) > MAX_PROBLEM_ROWS:
                console.print(f"... and {len(report.problems) - MAX_PROBLEM_ROWS} more (see --json)")
        verdict = "[green]ok[/]" if report.ok else "[red]not ok[/]"
        console.print(f"{verdict}: {len(report.errors)} error(s), {len(report.warnings)} warning(s)")
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def split(
    source: Annotated[Path, typer.Argument(help="POOL/<domain>/<label>/<file>, a ForenSynths, GenImage or Chameleon tree, or with --records a tree.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (split tree, or record files with --records).")],
    ratios: Annotated[Optional[str], typer.Option("--ratios", help="train,val,test fractions (default: 0.8,0.1,0.1).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Shuffle seed: the same seed gives the same split.")] = 0,
    link: Annotated[bool, typer.Option("--link", help="Hard-link a dx pool's images instead of copying them (same filesystem); other layouts are always hard-linked unless --copy.")] = False,
    copy: Annotated[bool, typer.Option("--copy", help="Copy the images of a ForenSynths, GenImage, Chameleon or no-split tree instead of hard-linking them.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier split tree / record files in --out.")] = False,
    records: Annotated[bool, typer.Option("--records", help="Write OUT/{train,val,test}.json conversation records from a split tree.")] = False,
    reasoning: Annotated[Optional[Path], typer.Option("--reasoning", help="Reasoning: JSONL {image, reasoning} or the original train.json (default: ROOT/reasoning.jsonl if present).")] = None,
    holdout: Annotated[Optional[str], typer.Option("--holdout", help="Leave-one-domain-out: test records from this domain, train/val from the others.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Split a pool into a train/val/test tree, turn another layout into a dx tree, or write
    conversation records from a tree.

    The source is never modified; content-identical files of a pool are kept once (never in two
    splits). A ForenSynths, GenImage or Chameleon tree becomes a dx tree of hard links keeping the
    splits it is read with (test where it has no split folders; --ratios re-splits such a tree);
    categories and subsets fold into the domain and prefix the file names. Every command also
    reads such a tree in place. Images without reasoning get the short answer '### Answer: real|fake'.

    Example: dx dataset split pool --out data --ratios 0.8,0.1,0.1 --seed 1 --link

    Example: dx dataset split CNNDetection --out forensynths-dx

    Example: dx dataset split data --records --out records --holdout sd
    """
    from dxcli.base.errors import UsageError

    if records:
        if ratios is not None or link or copy:
            raise UsageError("--ratios, --link and --copy split a tree; they do not apply with --records "
                             "(records point at the images where they are)")
        _write_records(source, out, reasoning, holdout, force, json_out)
        return
    if reasoning is not None or holdout is not None:
        raise UsageError("--reasoning and --holdout write records: add --records (SOURCE is then a split tree)")
    from dxcli.data.split import split_pool

    with progress_bar("splitting") as progress:
        summary = split_pool(source, out, ratios, seed, link, force, progress, copy=copy)
    if json_out:
        print_json(summary)
        return
    _print_split_summary(summary, out)


def _print_split_summary(summary: dict[str, Any], out: Path) -> None:
    # notes say how the tree reads as it is (e.g. all test): they would mislead once splits are assigned
    print_layout(summary["layout"], notes=summary["splits"] == "kept")
    how = (f"seed {summary['seed']}, ratios {','.join(f'{r:g}' for r in summary['ratios'])}"
           if summary["splits"] == "assigned" else "splits kept as read")
    mode = "hard links" if summary["mode"] == "link" else "copies"
    console.print(counts_table(summary["counts"], f"{out} ({mode}, {how})"))
    skipped = summary["duplicates_skipped"]
    if skipped:
        console.print(f"[yellow]{len(skipped)} content-identical file(s) skipped[/], e.g. "
                      f"{skipped[0]['path']} = {skipped[0]['same_as']}")
    console.print(f"[green]{summary['images']} images[/] -> {out} ({mode}"
                  f"{', no image copied' if summary['mode'] == 'link' else ''})")


def _write_records(tree: Path, out: Path, reasoning: Path | None, holdout: str | None,
                   force: bool, json_out: bool) -> None:
    from rich.table import Table

    from dxcli.data.split import records_from_tree_files

    summary = records_from_tree_files(tree, out, reasoning, holdout=holdout, force=force)
    source = summary["reasoning"]
    if json_out:
        print_json(summary)
        return
    if summary["layout"]["name"] != "dx":  # how the tree was read decides every record's domain and split
        print_layout(summary["layout"])
    table = Table(title=f"records{f' (holdout {holdout})' if holdout else ''}", title_justify="left")
    for column in ("split", "file", "records", "real", "fake", "with reasoning", "domains"):
        table.add_column(column, overflow="fold")
    for split_name, info in summary["files"].items():
        table.add_row(split_name, info["path"], str(info["records"]), str(info["real"]),
                      str(info["fake"]), str(info["with_reasoning"]), ",".join(info["domains"]))
    console.print(table)
    console.print(f"reasoning: {source or 'none (short answers only)'}")
    if summary["reasoning_unmatched"]:
        console.print(f"[yellow]{summary['reasoning_unmatched']} reasoning annotation(s) name no "
                      "image of the tree[/]")


@app.command()
def demo(
    out: Annotated[Path, typer.Argument(help="Folder for the demo tree (created).")],
    seed: Annotated[int, typer.Option("--seed", help="The same seed gives byte-identical files.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Write into a non-empty OUT (replaces the demo's domain folders).")] = False,
    hard: Annotated[bool, typer.Option("--hard", help="The harder setting: more photographs (scikit-image's too), camera variations, traces of graded strength, and in each domain a private generator variant no other domain shares, so SFT on the other domains misses part of a held-out one.")] = False,
) -> None:
    """Write the built-in demo data: a small DF-R5-style tree with reasoning, offline, in seconds.

    A pipeline check, not a deepfake benchmark. With --hard, a setting where a held-out domain is
    only partly detected after SFT on the others (room for RL to improve; needs scikit-image).

    Example: dx dataset demo demo-data && dx dataset check demo-data

    Example: dx dataset demo hard-data --hard --seed 1
    """
    from rich.table import Table

    from dxcli.base.errors import refuse_nonempty_out
    from dxcli.data.demo import make_demo

    refuse_nonempty_out(out, force)
    with progress_bar("rendering") as progress:
        summary = make_demo(out, seed=seed, progress=progress, overwrite=force, hard=hard)
    counts = summary.get("counts")
    if isinstance(counts, dict):
        console.print(counts_table(counts, f"{out}: demo images"))
    table = Table(show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    for key, value in summary.items():
        if key != "counts":
            table.add_row(key, ", ".join(map(str, value)) if isinstance(value, list) else str(value))
    console.print(table)


@app.command()
def reason(
    root: Annotated[Path, typer.Argument(help="Dataset tree ROOT/<domain>/<split>/<label>/<file>.")],
    teacher: Annotated[str, typer.Option("--teacher", help="Base URL of an OpenAI-compatible endpoint (vLLM, SGLang, Ollama, a hosted API, dx serve), e.g. http://127.0.0.1:8000/v1.")],
    model: Annotated[str, typer.Option("--model", help="The model name the endpoint serves.")],
    api_key_env: Annotated[Optional[str], typer.Option("--api-key-env", help="Environment variable holding the endpoint's API key (default: no key).")] = None,
    split: Annotated[Optional[list[str]], typer.Option("--split", help="Split to annotate, repeatable (default: train).")] = None,
    domain: Annotated[Optional[list[str]], typer.Option("--domain", help="Only this domain, repeatable (default: all).")] = None,
    prompt: Annotated[Optional[Path], typer.Option("--prompt", help="Prompt file: {label}, {min_paragraphs} and {max_paragraphs} are filled in (default: the shipped dxcli/data/reason_prompt.txt).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Reasoning file (default: ROOT/reasoning.jsonl, which dx train reads); rejected replies go beside it, to NAME-rejected.jsonl.")] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", help="Requests in flight at once.")] = 4,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds per request before it is retried.")] = 120.0,
    retries: Annotated[int, typer.Option("--retries", help="Retries of a request after an error or timeout (exponential backoff).")] = 3,
    reask: Annotated[int, typer.Option("--reask", help="Asks again when a reply fails the check.")] = 1,
    min_paragraphs: Annotated[int, typer.Option("--min-paragraphs", help="Fewest reasoning paragraphs a reply may have.")] = 2,
    max_paragraphs: Annotated[int, typer.Option("--max-paragraphs", help="Most reasoning paragraphs a reply may have.")] = 8,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Token limit of a reply (a reply cut off is rejected).")] = 1024,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature of the teacher.")] = 0.7,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Ask for at most N images (try a prompt on a few first).")] = None,
    redo: Annotated[bool, typer.Option("--redo", help="Ask again for images that already have reasoning (an accepted reply replaces the old one).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Write label-conditioned reasoning for a tree's images with a teacher model.

    Each image of the chosen splits goes to the endpoint with its label; a reply is kept only
    in dx's format: bold-titled paragraphs, then '### Answer: <label>' matching the label.
    Accepted replies are appended to ROOT/reasoning.jsonl as they arrive; a rerun asks only for
    the images not there yet. Rejected replies are logged with their reason. Exit 1 when no
    reply was accepted.

    Example: dx dataset reason data --teacher http://127.0.0.1:8000/v1 --model Qwen/Qwen2.5-VL-7B-Instruct

    Example: OPENAI_API_KEY=... dx dataset reason data --teacher https://api.openai.com/v1 --model gpt-4o --api-key-env OPENAI_API_KEY --limit 20
    """
    from dxcli.data.reason import ReasonJob, ReplyRules, Teacher, reason_tree

    job = ReasonJob(root=root, out=out, splits=tuple(split or ("train",)),
                    domains=tuple(domain) if domain else None, prompt_file=prompt, concurrency=concurrency,
                    reask=reask, limit=limit, redo=redo)
    teacher_spec = Teacher(url=teacher, model=model, api_key_env=api_key_env, timeout=timeout, retries=retries,
                           max_tokens=max_tokens, temperature=temperature)
    with progress_bar("reasoning") as progress:
        summary = reason_tree(job, teacher_spec, ReplyRules(min_paragraphs, max_paragraphs), progress)
    if json_out:
        print_json(summary.to_json())
    else:
        _print_reason_summary(summary)
    if summary.asked and not summary.accepted:
        from dxcli.base.errors import DxError

        raise DxError(f"no reply passed the check ({summary.asked} asked): see the reasons in "
                      f"{summary.rejected_log}; try another --prompt or teacher")


def _print_reason_summary(summary) -> None:
    from rich.markup import escape

    console.print(f"{summary.images} images: {summary.already} had reasoning, {summary.asked} asked in "
                  f"{summary.seconds:.0f} s: [green]{summary.accepted} accepted[/], "
                  f"{summary.retried} retried ({summary.retries} extra requests), "
                  f"{'[red]' if summary.rejected else ''}{summary.rejected} rejected{'[/]' if summary.rejected else ''}")
    if summary.rejected:
        kinds = ", ".join(f"{kind} {count}" for kind, count in summary.reasons.most_common())
        console.print(f"rejected by kind: {escape(kinds)}; replies logged in {escape(summary.rejected_log)}")
        for example in summary.examples:
            console.print(f"  {escape(example['image'])}: {escape(example['reason'])}")
    if summary.accepted:
        console.print(f"reasoning -> {escape(summary.out)}")
