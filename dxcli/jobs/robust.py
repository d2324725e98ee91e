"""`dx eval robust`: inference on the clean images and on perturbed copies, scored side by side.

One folder per perturbation in the work folder (`--work DIR`, else a temporary one): its images,
its questions and its answers file. Each inference is `run_infer`, with its resume: a rerun skips
a perturbation whose answers are complete and finishes one that stopped midway.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dxcli import config as cfgmod
from dxcli.base.errors import DxError, UsageError
from dxcli.base.jsonio import write_jsonl_atomic
from dxcli.evaluation.infer import answered_ids, load_questions, part_files
from dxcli.evaluation.robust import CLEAN, make_perturbed_set, parse_perturbations
from dxcli.evaluation.score import load_answers, score_rows
from dxcli.jobs.stages import run_infer
from dxcli.model.checkpoint import resolve_model_path

MANIFEST = "robust.json"  # what the work folder's answers were made from


@dataclass
class RobustResult:
    work: Path | None  # None: a temporary folder, removed at the end
    scores: dict[str, dict[str, Any]]  # "clean", then each perturbation: score.score_rows output
    inferred: list[str] = field(default_factory=list)  # those whose inference ran this time
    resumed: list[str] = field(default_factory=list)  # those whose answers were complete already


def manifest(checkpoint: str, questions: Path, images: Path, config: cfgmod.DxConfig) -> dict[str, Any]:
    ev = config.eval
    return {"model": str(Path(checkpoint).resolve()), "questions": str(Path(questions).resolve()),
            "images": str(Path(images).resolve()),
            "eval": {"max_new_tokens": ev.max_new_tokens, "temperature": ev.temperature, "top_p": ev.top_p,
                     "seed": ev.seed}}


def open_work(work: Path, images: Path, wanted: dict[str, Any], names: list[str], force: bool) -> None:
    """Create WORK, or reopen it when it holds answers of the same model, questions and settings
    (reusing another model's answers would print a wrong table). `force` clears what dx made."""
    if work.resolve().is_relative_to(Path(images).resolve()):
        raise UsageError(f"--work {work} is inside the image root {images}: perturbed copies never go "
                         "beside the originals; pick a folder outside it")
    saved = work / MANIFEST
    if force:
        for name in [CLEAN, *names]:
            shutil.rmtree(work / name, ignore_errors=True)
        saved.unlink(missing_ok=True)
    if saved.is_file():
        found = json.loads(saved.read_text(encoding="utf-8"))
        differ = [key for key in wanted if found.get(key) != wanted[key]]
        if differ:
            raise DxError(f"--work {work} holds answers made with another {', '.join(differ)}; "
                          "pass --force to start over there, or another --work")
    work.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(wanted, indent=2), encoding="utf-8")


def complete(out: Path, ids: set[str]) -> bool:
    """Every question answered in OUT itself (no part files left to merge)."""
    return out.is_file() and not part_files(out) and ids <= answered_ids(out)


def run_robust(*, model: str, questions: Path, images: Path, config: cfgmod.DxConfig,
               perturbations: str | Sequence[str] | None = None, work: Path | None = None,
               force: bool = False, say: Callable[[str], None] = print) -> RobustResult:
    """Answer the questions on the clean images and on each perturbed copy; score each by domain."""
    names = parse_perturbations(perturbations)
    checkpoint = resolve_model_path(model)
    if not Path(checkpoint).is_dir():
        raise DxError(f"--model {model}: no such checkpoint folder")
    rows = load_questions(Path(questions))
    if not rows:
        raise DxError(f"--questions {questions}: no questions")
    if not Path(images).is_dir():
        raise DxError(f"--images {images}: no such folder")
    folder = Path(work) if work else Path(tempfile.mkdtemp(prefix="dx-robust-"))
    try:
        open_work(folder, images, manifest(checkpoint, questions, images, config), names, force)
        result = RobustResult(Path(work) if work else None, {})
        for index, name in enumerate([CLEAN, *names], start=1):
            say(f"[robust] {name} ({index}/{len(names) + 1})")
            out = folder / name / "answers.jsonl"
            if complete(out, {str(r["question_id"]) for r in rows}):
                result.resumed.append(name)
            else:
                infer_one(name, rows, Path(questions), Path(images), folder / name, checkpoint, config, say)
                result.inferred.append(name)
            result.scores[name] = score_rows(load_answers(out))
        return result
    finally:
        if not work:
            shutil.rmtree(folder, ignore_errors=True)


def infer_one(name: str, rows: list[dict[str, Any]], questions: Path, images: Path, folder: Path,
              checkpoint: str, config: cfgmod.DxConfig, say: Callable[[str], None]) -> None:
    """`run_infer` on the originals (clean) or on perturbed copies made first in FOLDER/images."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    if name != CLEAN:
        moved, unreadable = make_perturbed_set(rows, images, folder / "images", name)
        if unreadable:
            say(f"[robust] {name}: {unreadable} image(s) could not be read; answered as errors")
        questions, images = folder / "questions.jsonl", folder / "images"
        write_jsonl_atomic(questions, moved)
    run_infer(model=checkpoint, questions=questions, images=images, out=folder / "answers.jsonl", config=config)
