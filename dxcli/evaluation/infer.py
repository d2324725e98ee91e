"""`eval infer`: batched generation over a question file, appended line by line, resumable.

One process writes OUT directly; with several, rank r writes OUT.part-r and the parent merges.
A rerun skips questions already answered (in OUT or any part); a torn last line is redone.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dxcli.answer import parse_answer
from dxcli.errors import DxError
from dxcli.jsonio import dumps_line, iter_jsonl, truncate_torn_tail, write_jsonl_atomic

QUESTION_KEYS = ("question_id", "image", "text", "label")


@dataclass
class InferJob:
    run_dir: str  # where error files go (the output's folder)
    questions: str
    images: str
    out: str
    model: str
    batch_size: int = 16
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    precision: str = "fp32"
    threads: int = 0


def load_questions(path: Path) -> list[dict[str, Any]]:
    questions = []
    for number, row in enumerate(iter_jsonl(Path(path)), start=1):
        missing = [k for k in QUESTION_KEYS if k not in row]
        if missing:
            raise DxError(f"{path}: question {number} lacks {', '.join(missing)}")
        questions.append(row)
    ids = [str(q["question_id"]) for q in questions]
    if len(set(ids)) != len(ids):
        raise DxError(f"{path}: question_id values are not unique")
    return questions


def part_files(out: Path) -> list[Path]:
    return sorted(out.parent.glob(out.name + ".part-*"))


def answered_ids(out: Path) -> set[str]:
    """Question ids already answered in OUT or its part files (torn tails cut first)."""
    done: set[str] = set()
    for path in [out, *part_files(out)]:
        if path.exists():
            truncate_torn_tail(path)
            done.update(str(row["question_id"]) for row in iter_jsonl(path))
    return done


def sort_key(question_id: Any) -> tuple:
    text = str(question_id)
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


def merge_outputs(out: Path) -> int:
    """Fold part files into OUT, one line per question, sorted by question_id. Returns the count."""
    rows: dict[str, dict] = {}
    for path in [out, *part_files(out)]:
        if path.exists():
            truncate_torn_tail(path)
            for row in iter_jsonl(path):
                rows.setdefault(str(row["question_id"]), row)
    ordered = sorted(rows.values(), key=lambda r: sort_key(r["question_id"]))
    write_jsonl_atomic(out, ordered)
    for path in part_files(out):
        path.unlink()
    return len(ordered)


def answer_row(question: dict, text: str | None, head_prob: float | None, model_name: str,
               error: str | None = None) -> dict[str, Any]:
    row = {"question_id": question["question_id"], "image": question["image"], "domain": question.get("domain"),
           "label": question["label"], "text": text, "predict": parse_answer(text),
           # 4 decimals: batch composition changes the last float bits, and a resumed run must match
           "head_prob": None if head_prob is None else round(head_prob, 4),
           "model": model_name}
    if error:
        row["error"] = error
    return row


def open_images(batch: list[dict], images_root: Path) -> tuple[list, list[dict], list[dict]]:
    """(images, questions that loaded, error rows' questions with reasons)."""
    from dxcli.data.tree import safe_image_path
    from dxcli.training.sft_data import load_rgb

    images, ok, failed = [], [], []
    for question in batch:
        try:
            images.append(load_rgb(safe_image_path(images_root, question["image"])))
            ok.append(question)
        except Exception as exc:  # missing, unreadable or escaping path: answered as null, run goes on
            failed.append({**question, "_error": f"{type(exc).__name__}: {exc}"})
    return images, ok, failed


def run(job: InferJob) -> None:

    from dxcli.evaluation.generate import generate
    from dxcli.model import load_checkpoint
    from dxcli.training import runtime

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    out = Path(job.out)
    target = out if world == 1 else out.with_name(f"{out.name}.part-{rank}")
    questions = load_questions(Path(job.questions))[rank::world]
    done = answered_ids(out)
    todo = [q for q in questions if str(q["question_id"]) not in done]
    if rank == 0 and done:
        print(f"[infer] {len(done)} answered already; {len(todo)} to go on this rank", flush=True)
    if not todo:
        return
    runtime.set_threads(job.threads)
    bundle = load_checkpoint(job.model, dtype=runtime.torch_dtype(job.precision))
    bundle.model.to(runtime.device()).eval()
    model_name = Path(job.model).resolve().name if Path(job.model).exists() else job.model
    if model_name == "model":  # a run folder's model/: name it after the run
        model_name = Path(job.model).resolve().parent.name
    progress = runtime.ProgressView(len(todo), "infer", rank == 0)
    started, finished = time.time(), 0
    with target.open("a", encoding="utf-8") as fh:
        for start in range(0, len(todo), job.batch_size):
            batch = todo[start:start + job.batch_size]
            images, ok, failed = open_images(batch, Path(job.images))
            rows = [answer_row(q, None, None, model_name, q["_error"]) for q in failed]
            if ok:
                seed = job.seed + start if job.temperature > 0 else None
                gen = generate(bundle, images, [q["text"] for q in ok], max_new_tokens=job.max_new_tokens,
                               temperature=job.temperature, top_p=job.top_p, seed=seed)
                rows += [answer_row(q, t, p, model_name) for q, t, p in zip(ok, gen.texts, gen.head_probs)]
            for row in rows:
                fh.write(dumps_line(row))
            fh.flush()
            finished += len(batch)
            progress.update(finished, {"images_per_s": finished / max(time.time() - started, 1e-9)})
    progress.close()


def run_infer(*, model: str, questions: Path, images: Path, out: Path, config, spec=None) -> int:
    """Parent side: check inputs, run the workers (in place or torchrun), merge. Returns answers written."""
    from dxcli.training.launch import launch, spec_for
    from dxcli.training.prepare import resolve_model_path

    checkpoint = resolve_model_path(model)
    if not Path(checkpoint).is_dir():
        raise DxError(f"--model {model}: no such checkpoint folder")
    load_questions(Path(questions))  # fail here, before any worker starts, on a bad file
    if not Path(images).is_dir():
        raise DxError(f"--images {images}: no such folder")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".dx-infer-{out.name}"
    work.mkdir(exist_ok=True)
    ev = config.eval
    job = InferJob(run_dir=str(work), questions=str(questions), images=str(images), out=str(out),
                   model=checkpoint, batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens,
                   temperature=ev.temperature, top_p=ev.top_p, seed=ev.seed, precision=config.hardware.precision,
                   threads=config.hardware.threads)
    from dataclasses import asdict

    launch("infer", asdict(job), work, spec_for(config, spec))
    count = merge_outputs(out)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return count
