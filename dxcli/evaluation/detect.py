"""`detect`: one model load, then verdict + head probability + reasoning per image."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

from dxcli.base.answer import head_verdict, parse_answer
from dxcli.base.errors import DxError
from dxcli.base.images import load_rgb
from dxcli.base.template import DEFAULT_QUESTION
from dxcli.config import DxConfig
from dxcli.evaluation.detections import Detection
from dxcli.model.build import ModelBundle
from dxcli.model.checkpoint import load_checkpoint, load_image_side, resolve_model_path
from dxcli.model.generate import encode_images, generate
from dxcli.runtime import env
from dxcli.runtime.dist import from_env


def open_detector(model: str | None, config: DxConfig, reasoning: bool = True) -> ModelBundle:
    """The model `detect` runs: `model` (a checkpoint or run folder) or the profile's model.path,
    on this machine's GPU when it has one, with the profile's thread count.

    Without reasoning only the image side is loaded (tower, projector, head; no LLM weights, no
    tokenizer): the head's probability needs nothing else.
    """
    checkpoint = resolve_model_path(model) or config.model.path
    if checkpoint is None:
        raise DxError("pass --model CHECKPOINT (a dx checkpoint or run folder)")
    env.set_threads(config.hardware.threads)
    env.quiet_libraries()  # transformers' weight-loading bar is noise before a one-line verdict
    if reasoning:
        bundle = load_checkpoint(checkpoint, attn_implementation=config.model.attn_implementation)
        bundle.model.to(from_env().device)
    else:
        bundle = load_image_side(checkpoint)
        for module in bundle.model.image_side():  # the LLM may be on the meta device: it stays there
            module.to(from_env().device)
    bundle.model.eval()
    return bundle


def detect(bundle, paths: list[Path], *, max_new_tokens: int, reasoning: bool = True,
           question: str = DEFAULT_QUESTION) -> Iterator[Detection]:
    """Yield one Detection per path; unreadable files give an error Detection and the loop goes on.

    Without reasoning, only the binary head runs (no text generation), and the verdict is the head's.
    """
    for path in paths:
        started = time.time()
        try:
            image = load_rgb(path)
        except Exception as exc:  # a corrupt or non-image file: report, keep going
            yield Detection(str(path), None, None, None, time.time() - started, f"{type(exc).__name__}: {exc}")
            continue
        if reasoning:
            # the dynamic cache, whatever hardware.compiled_decode says: a short-lived process answering
            # a few images, one call each, would spend longer compiling (~37 s at 7B) than it saves
            # (~20 ms per token); many images belong to `dx eval infer`, which honours the key
            gen = generate(bundle, [image], [question], max_new_tokens=max_new_tokens)
            text, prob = gen.texts[0], gen.head_probs[0]
            verdict = parse_answer(text)
        else:
            prob = encode_images(bundle, [image])[1][0]
            text, verdict = None, head_verdict(prob)
        yield Detection(str(path), verdict, prob, text, time.time() - started)
