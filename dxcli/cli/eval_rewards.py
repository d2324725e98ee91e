"""`dx eval rewards` (registered on the `eval` group): what the PRPO reward sees."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from dxcli.cli.common import DEFAULT_PROFILE_NAME, ProfileOpt, SetOpt, console, resolve_config


def rewards(
    file: Annotated[Path, typer.Argument(help="Rollouts JSONL ({image, responses}) or an eval-infer answers file.")],
    clip: Annotated[Optional[str], typer.Option("--clip", help="CLIPModel folder or hub id (VCR); default: prpo.clip.")] = None,
    images: Annotated[Optional[Path], typer.Option("--images", help="Image root for the rows' image paths.")] = None,
    no_clip: Annotated[bool, typer.Option("--no-clip", help="Skip VCR (PCR only).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON list, one object per input row.")] = False,
    profile: ProfileOpt = DEFAULT_PROFILE_NAME,
    sets: SetOpt = None,
) -> None:
    """Explain the PRPO reward: paragraphs with keyword, evidence label, VCR, PCR, reward and advantage.

    Also the reasoning-consistency measure of eval answers (final-answer consistency rate).

    Example: dx eval rewards answers.jsonl --images demo-data --no-clip
    """
    from rich.table import Table

    from dxcli.rl.explain import explain, rows_from_file, summarize
    from dxcli.rl.rewards import ClipScorer, load_lexicon

    config = resolve_config(profile, sets, {"prpo.clip": clip}, show=False).config
    scorer = None if no_clip or not config.prpo.clip else ClipScorer.load(config.prpo.clip)
    lexicon = load_lexicon(Path(config.prpo.lexicon) if config.prpo.lexicon else None)
    explained = explain(rows_from_file(file), images_root=images, clip=scorer, lexicon=lexicon,
                        a=config.prpo.vcr_weight, b=config.prpo.pcr_weight, eps=config.prpo.adv_eps)
    if as_json:
        typer.echo(json.dumps(explained))
        return
    for row in explained:
        for index, response in enumerate(row["responses"]):
            table = Table(title=f"{row['image'] or '(no image)'} - response {index + 1}: answer "
                                f"{response['answer'] or 'none'}", title_justify="left")
            for column in ("paragraph", "keyword", "label", "VCR", "PCR", "reward", "adv"):
                table.add_column(column)
            for p in response["paragraphs"]:
                text = p["text"] if len(p["text"]) <= 60 else p["text"][:57] + "..."
                vcr = "-" if p["vcr"] is None else f"{p['vcr']:.3f}"
                table.add_row(text, p["keyword"], p["label"] or "-", vcr, f"{p['pcr']:.0f}",
                              f"{p['reward']:.3f}", f"{p['advantage']:+.2f}")
            console.print(table)
    summary = Table(title="summary", title_justify="left")
    summary.add_column("measure")
    summary.add_column("value")
    for key, value in summarize(explained).items():
        summary.add_row(key, "-" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value)))
    console.print(summary)
