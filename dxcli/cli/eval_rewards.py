"""`dx eval rewards` (registered on the `eval` group): what the PRPO reward sees."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from dxcli.cli.common import DEFAULT_PROFILE_NAME, ProfileOpt, set_option, console, resolve_config

SetOpt = set_option("prpo.vcr_weight=0.3")


def rewards(
    file: Annotated[Path, typer.Argument(help="Rollouts JSONL ({image, responses}) or an eval-infer answers file.")],
    clip: Annotated[Optional[str], typer.Option("--clip", help="CLIP for VCR: a CLIPModel folder or hub id, or open_clip:ARCH[:PRETRAINED_OR_FILE]; default: prpo.clip.")] = None,
    images: Annotated[Optional[Path], typer.Option("--images", help="Image root for the rows' image paths.")] = None,
    no_clip: Annotated[bool, typer.Option("--no-clip", help="Skip VCR (PCR only).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON list, one object per input row.")] = False,
    every_row: Annotated[bool, typer.Option("--rows", help="Also print every response's paragraph table (long).")] = False,
    profile: ProfileOpt = DEFAULT_PROFILE_NAME,
    sets: SetOpt = None,
) -> None:
    """Explain the PRPO reward: paragraphs with keyword, evidence label, VCR, PCR, reward and advantage.

    Also the reasoning-consistency measure of eval answers (final-answer consistency rate).

    Prints the summary; --rows adds one table per response, --json everything as JSON.

    Example: dx eval rewards answers.jsonl --images demo-data --no-clip
    """
    from dxcli.evaluation.report import print_rewards
    from dxcli.rl.explain import explain_file, summarize

    config = resolve_config(profile, sets, {"prpo.clip": clip}, show=False).config
    explained = explain_file(file, images_root=images, prpo=config.prpo, use_clip=not no_clip)
    if as_json:
        typer.echo(json.dumps(explained))
        return
    print_rewards(explained if every_row else [], summarize(explained), console)
