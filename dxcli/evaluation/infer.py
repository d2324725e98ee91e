"""`eval infer`: batched generation over a question file, appended line by line, resumable.

One process writes OUT directly; with several, rank r writes OUT.part-r and the parent merges.
A rerun skips questions already answered (in OUT or any part); a torn last line is redone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dxcli import config as cfgmod
from dxcli.base.answer import parse_answer
from dxcli.base.errors import DxError
from dxcli.base.images import load_rgb, safe_image_path
from dxcli.base.jsonio import dumps_line, iter_jsonl, truncate_torn_tail, write_jsonl_atomic
from dxcli.model.checkpoint import load_checkpoint
from dxcli.model.generate import generate
from dxcli.runtime import env
from dxcli.runtime.dist import from_env
from dxcli.runtime.progress import ProgressView

QUESTION_KEYS = ("question_id", "image", "text", "label")


@dataclass
class InferJob:
    run_dir: str  # the work folder beside OUT (job file, error files)
    config: str  # the resolved config.yaml (eval.* and hardware.* are read from it)
    questions: str
    images: str
    out: str
    model: str


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
    images, ok, failed = [], [], []
    for question in batch:
        try:
            images.append(load_rgb(safe_image_path(images_root, question["image"])))
            ok.append(question)
        except Exception as exc:  # missing, unreadable or escaping path: answered as null, run goes on
            failed.append({**question, "_error": f"{type(exc).__name__}: {exc}"})
    return images, ok, failed


def model_name(checkpoint: str) -> str:
    """What answers call the model: the checkpoint folder's name, or its run's for RUN/model."""
    path = Path(checkpoint)
    name = path.resolve().name if path.exists() else checkpoint
    return path.resolve().parent.name if name == "model" else name


def run(job: InferJob) -> None:
    """Worker side: this rank's share of the questions not answered yet, appended batch by batch."""
    cfg = cfgmod.load(Path(job.config))
    ev, dist = cfg.eval, from_env()
    out = Path(job.out)
    target = out if dist.world == 1 else out.with_name(f"{out.name}.part-{dist.rank}")
    done = answered_ids(out)
    todo = [q for q in load_questions(Path(job.questions))[dist.rank::dist.world] if str(q["question_id"]) not in done]
    if dist.main and done:
        print(f"[infer] {len(done)} answered already; {len(todo)} to go on this rank", flush=True)
    if not todo:
        return
    env.set_threads(cfg.hardware.threads)
    bundle = load_checkpoint(job.model, dtype=env.torch_dtype(cfg.hardware.precision),
                             attn_implementation=cfg.model.attn_implementation)
    bundle.model.to(dist.device).eval()  # this rank's GPU when there is one (Dist.device)
    name = model_name(job.model)
    progress = ProgressView(len(todo), "infer", dist.main)
    started, finished = time.time(), 0
    with target.open("a", encoding="utf-8") as fh:
        for start in range(0, len(todo), ev.batch_size):
            batch = todo[start:start + ev.batch_size]
            images, ok, failed = open_images(batch, Path(job.images))
            rows = [answer_row(q, None, None, name, q["_error"]) for q in failed]
            if ok:
                seed = ev.seed + start if ev.temperature > 0 else None
                gen = generate(bundle, images, [q["text"] for q in ok], max_new_tokens=ev.max_new_tokens,
                               temperature=ev.temperature, top_p=ev.top_p, seed=seed,
                               compiled=cfg.hardware.compiled_decode)
                rows += [answer_row(q, t, p, name) for q, t, p in zip(ok, gen.texts, gen.head_probs)]
            fh.writelines(dumps_line(row) for row in rows)
            fh.flush()
            finished += len(batch)
            progress.update(finished, {"images_per_s": finished / max(time.time() - started, 1e-9)})
    progress.close()
