"""`dx model ...`: model folders. `import` turns a checkpoint of the original code into a dx model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dxcli.cli.common import console, err_console, set_option

app = typer.Typer(help="Model folders: import checkpoints of the original code.", no_args_is_help=True)

SetOpt = set_option("model.vision_weights=open_clip_pytorch_model.bin")


@app.command("import")
def import_(
    src: Annotated[Path, typer.Argument(help="Checkpoint folder of the original code (LlavaLlamaForCausalLM: "
                                             "config.json model_type llava_llama).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="dx model folder to write (safetensors).")],
    pad: Annotated[Optional[bool], typer.Option("--pad/--crop", help="Pad images to a square with the mean colour, "
                                                "or resize and centre-crop them (default: what the original ran "
                                                "for this checkpoint: crop, open_clip's preprocessing).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Write into a non-empty --out.")] = False,
    sets: SetOpt = None,
) -> None:
    """Import a DX-LLaVA checkpoint written by the original code as a dx model folder.

    Reads sharded .bin (as plain tensors only: never runs code from the file) or safetensors, with
    or without the side files mm_projector.bin and clip_model.bin. The imported model computes what
    the original did: its tokenizer (plus <image>), open_clip's image preprocessing and the head's
    clamp of the projected tokens to +-10. Every dx command and plain transformers open the result.
    Keys (code defaults; no profile): model.image_size (320, the original's), model.vision_weights
    (the tower, for a checkpoint without one).

    Example: dx model import checkpoints/dx-llava-binary-ddim --out models/dx-llava-ddim
    """
    from dxcli.cli.common import resolve_config
    from dxcli.jobs.import_model import import_model

    resolved = resolve_config(None, sets, show=False)  # the original's shape, not a profile's (cpu-tiny: 96 px)
    imported = import_model(src, out, resolved.config, pad=pad, force=force)
    for note in imported.notes:
        err_console.print(f"[dim]{note}[/]", soft_wrap=True)
    console.print(f"imported {src} -> {imported.out} (open it with --model {imported.out})", soft_wrap=True)
