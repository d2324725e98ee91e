"""One self-contained HTML report for answer files: the library behind `dx eval report`.

The page holds the metrics of `score.py` per domain and overall (one table per file, and one
side-by-side table when several files are given), confusion matrices, the binary head's ROC and
precision-recall curves, and the worst mistakes of each file as cards: thumbnail, question,
reasoning paragraphs (with each paragraph's PCR and VCR when `dx eval rewards --json` output is
given), verdict, label and head probability.

Everything is inlined (plots as base64 PNG, thumbnails as base64 JPEG, the style sheet in the
page), so the file can be mailed or archived and viewed offline. The page is rendered by the
jinja2 template `templates/report.html.j2`, which only lays out what is prepared here.
"""

from __future__ import annotations

import base64
import contextlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dxcli import __version__
from dxcli.base.answer import label_to_int, parse_answer
from dxcli.base.errors import DxError, UsageError
from dxcli.base.images import safe_image_path
from dxcli.base.jsonio import iter_jsonl, read_json_or_jsonl
from dxcli.evaluation import score as scoring
from dxcli.evaluation.report import cell_text
from dxcli.rl.paragraphs import split_paragraphs

THUMBNAIL_SIDE = 192  # px, longest side: enough to recognise a face, small enough to inline many
THUMBNAIL_QUALITY = 80
TEMPLATE = "report.html.j2"
# (metrics key, header, better): per-file tables show all, the side-by-side table the compact set.
FULL_COLUMNS = [
    ("n", "n", None), ("accuracy", "acc", "high"), ("balanced_accuracy", "bal acc", "high"),
    ("precision", "prec", "high"), ("recall", "rec", "high"), ("f1", "F1", "high"),
    ("invalid", "no verdict", "low"), ("f1_valid", "F1 valid", "high"),
    ("head_auc", "head AUC", "high"), ("ap", "head AP", "high"), ("eer", "head EER", "low"),
    ("head_accuracy", "head acc", "high"), ("agreement", "agree", "high"),
]
# Side by side: fewer figures and shorter headers, so two files fit a 1200 px window.
COMPARE_COLUMNS = {"n": "n", "accuracy": "acc", "balanced_accuracy": "bal acc", "f1": "F1",
                   "invalid": "no verd.", "head_auc": "AUC", "ap": "AP", "eer": "EER"}


@dataclass
class ReportResult:
    out: Path
    mistakes_shown: int
    rewards_matched: int | None  # None: no rewards given; 0 with rewards given: they fit nothing


def write_report(answers: Sequence[Path], out: Path, *, images_root: Path | None = None,
                 rewards: Sequence[Path] = (), questions: Path | None = None, worst: int = 20,
                 force: bool = False) -> ReportResult:
    """Score `answers`, build the page and write it to `out` (refused if it exists, unless
    `force`). Each file shows its `worst` worst mistakes (see `worst_mistakes`)."""
    out = Path(out)
    _check_out(out, force)
    if images_root is not None and not Path(images_root).is_dir():
        # else every card would quietly say "image not found"
        raise UsageError(f"--images {images_root}: no such folder")
    _require_matplotlib()
    rows_by_file = scoring.load_files(answers)
    scores = _per_file(scoring.score_many(rows_by_file), rows_by_file)
    names = dict(zip(rows_by_file, scoring.short_names(list(rows_by_file))))
    rewards_index = load_rewards(rewards)
    question_texts = load_questions(questions) if questions else {}
    thumbnails = Thumbnails(images_root)
    sections, matched = [], 0
    for path, rows in rows_by_file.items():
        cards = [mistake_card(row, thumbnails, rewards_index, question_texts)
                 for row in worst_mistakes(rows, worst)]
        matched += sum(card["rewards_matched"] for card in cards)
        sections.append(_file_section(names[path], path, rows, scores[path], cards))
    context = {
        "title": "dx evaluation report", "version": __version__, "sections": sections,
        "comparison": _comparison(scores, names) if len(scores) > 1 else None,
        "curves": curve_images({names[p]: rows for p, rows in rows_by_file.items()}),
        "images_root": None if images_root is None else str(images_root),
        "rewards": [str(p) for p in rewards], "worst": worst,
    }
    _write(out, render(context))
    shown = sum(len(section["mistakes"]) for section in sections)
    return ReportResult(out, shown, matched if rewards else None)


def _check_out(out: Path, force: bool) -> None:
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give the path of the HTML file to write")
    if out.exists() and not force:
        raise UsageError(f"--out {out} exists; pass --force to overwrite it")


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise DxError('dx eval report needs matplotlib: pip install "dxcli[plot]"') from None


def _per_file(result: Mapping[str, Any], rows_by_file: Mapping[str, Any]) -> dict[str, Any]:
    """`score_many` gives one file's result bare and several under "files": one shape here."""
    if "files" in result:
        return dict(result["files"])
    (path,) = rows_by_file
    return {path: result}


# ---------------------------------------------------------------------------------------------
# Inputs beside the answers


def load_rewards(paths: Sequence[Path]) -> dict[tuple[Any, tuple[str, ...]], list[dict]]:
    """Paragraph scores from `dx eval rewards --json` output, keyed by (image, paragraph texts).

    That output does not carry question ids, and one question may have several sampled
    responses, so a response is found by its image and the exact text of its paragraphs; this
    also keeps the scores of one model's answers off another model's cards.
    """

    index: dict[tuple[Any, tuple[str, ...]], list[dict]] = {}
    for path in paths:
        for number, row in enumerate(read_json_or_jsonl(Path(path)), 1):
            responses = row.get("responses")
            if not isinstance(responses, list) or not all(
                    isinstance(r, dict) and isinstance(r.get("paragraphs"), list)
                    for r in responses):
                raise DxError(f"{path}: record {number} is not a row of `dx eval rewards --json` "
                              "output (responses with paragraphs)")
            for response in responses:
                texts = tuple(str(p.get("text", "")) for p in response["paragraphs"])
                index[(row.get("image") or None, texts)] = response["paragraphs"]
    return index


def load_questions(path: Path) -> dict[str, str]:
    """question_id -> question text, from a questions JSONL (`dx questions gen`)."""

    return {str(q["question_id"]): str(q.get("text") or "") for q in iter_jsonl(Path(path))
            if "question_id" in q}


# ---------------------------------------------------------------------------------------------
# Metrics tables


def _file_section(name: str, path: str, rows: Sequence[Mapping[str, Any]],
                  score: Mapping[str, Any], cards: list[dict]) -> dict[str, Any]:
    groups = sorted(score["domains"])
    return {
        "name": name, "path": path, "n": len(rows),
        "n_mistakes": sum(row["predict"] != row["label"] for row in rows),
        "headers": [header for _, header, _ in FULL_COLUMNS],
        "rows": [{"group": group, "cells": [cell_text(score["domains"][group], key)
                                            for key, _, _ in FULL_COLUMNS]} for group in groups],
        "overall": [cell_text(score["overall"], key) for key, _, _ in FULL_COLUMNS],
        "confusions": [_confusion("overall", score["overall"])]
        + [_confusion(group, score["domains"][group]) for group in groups],
        "mistakes": cards,
    }


def _comparison(scores: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    """Side-by-side table: one column group per file; the best file per figure is marked."""
    columns = [(key, COMPARE_COLUMNS[key], better) for key, _, better in FULL_COLUMNS
               if key in COMPARE_COLUMNS]
    groups = sorted({g for score in scores.values() for g in score["domains"]})
    rows = []
    for group in [*groups, "overall"]:
        per_file = [score["overall"] if group == "overall" else score["domains"].get(group)
                    for score in scores.values()]
        cells = []
        for metrics in per_file:
            for key, _, better in columns:
                best = better is not None and _is_best(metrics, per_file, key, better)
                cells.append({"text": cell_text(metrics, key), "best": best})
        rows.append({"group": group, "cells": cells, "overall": group == "overall"})
    return {"files": [names[path] for path in scores], "headers": [h for _, h, _ in columns],
            "rows": rows}


def _is_best(metrics: Mapping[str, Any] | None, per_file: list, key: str, better: str) -> bool:
    values = [m.get(key) for m in per_file if m is not None and m.get(key) is not None]
    if metrics is None or metrics.get(key) is None or len(values) < 2:
        return False
    target = max(values) if better == "high" else min(values)
    return metrics[key] == target and values.count(target) < len(values)


def _confusion(group: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    (tn, fp), (fn, tp) = metrics["confusion"]
    return {"group": group, "cells": [["real", tn, fp], ["fake", fn, tp]]}


# ---------------------------------------------------------------------------------------------
# Mistakes


def worst_mistakes(rows: Sequence[Mapping[str, Any]], n: int) -> list[Mapping[str, Any]]:
    """The rows whose verdict is wrong (no verdict counts as wrong), worst first.

    Worst = the binary head gives the wrong class the highest probability: a mistake the head
    makes just as confidently is the one to read first. Rows without `head_prob` rank as 0.5;
    ties keep file order (Python's sort is stable).
    """
    def wrong_class_probability(row: Mapping[str, Any]) -> float:
        prob = row.get("head_prob")
        if prob is None:
            return 0.5
        return prob if label_to_int(row["label"]) == 0 else 1.0 - prob

    mistakes = [row for row in rows if row["predict"] != row["label"]]
    return sorted(mistakes, key=wrong_class_probability, reverse=True)[:max(n, 0)]


def mistake_card(row: Mapping[str, Any], thumbnails: Thumbnails,
                 rewards_index: Mapping[tuple[Any, tuple[str, ...]], list[dict]],
                 questions: Mapping[str, str]) -> dict[str, Any]:
    """What one card shows; `rewards_matched` tells whether paragraph scores were found."""

    text = row.get("text") or ""
    paragraphs = split_paragraphs(text) if text.strip() else []
    has_verdict = parse_answer(text) is not None  # else no paragraph is the verdict paragraph
    texts = tuple(p.text for p in paragraphs)
    scored = rewards_index.get((row.get("image") or None, texts))
    image, missing = thumbnails.get(row.get("image"))
    question_id = row.get("question_id")
    return {
        "question_id": question_id, "image_path": row.get("image"), "domain": row.get("domain"),
        "thumbnail": image, "missing": missing,
        "question": row.get("question") or questions.get(str(question_id)),
        "paragraphs": [_paragraph(p.text, p.is_final and has_verdict,
                                  scored[i] if scored else None)
                       for i, p in enumerate(paragraphs)],
        "verdict": row["predict"] or "no verdict", "label": row["label"],
        "head_prob": None if row.get("head_prob") is None else f"{row['head_prob']:.3f}",
        "error": row.get("error"), "rewards_matched": scored is not None,
    }


def _paragraph(text: str, is_final: bool, scores: Mapping[str, Any] | None) -> dict[str, Any]:
    paragraph = {"html": _inline_markdown(text), "final": is_final, "pcr": None, "vcr": None,
                 "evidence": None}
    if scores is not None:
        vcr = scores.get("vcr")
        paragraph.update(pcr=f"{scores.get('pcr', 0):.0f}",
                         vcr="n/a" if vcr is None else f"{vcr:.3f}",
                         evidence=scores.get("label"))
    return paragraph


def _inline_markdown(text: str):
    """The model writes `**Skin Texture**: ...`: bold and italics rendered, nothing else.

    markdown-it's "zero" preset with emphasis only escapes any HTML in the text, so the result
    is safe to put in the page as is (jinja2's Markup keeps autoescape from escaping it again).
    """
    from markdown_it import MarkdownIt
    from markupsafe import Markup

    return Markup(MarkdownIt("zero").enable(["emphasis"]).renderInline(text))


class Thumbnails:
    """Inline JPEG thumbnails, each image read once; a missing image gets a reason instead."""

    def __init__(self, root: Path | None) -> None:
        self.root = None if root is None else Path(root)
        self.cache: dict[str, tuple[str | None, str | None]] = {}

    def get(self, relative: str | None) -> tuple[str | None, str | None]:
        """(data URI, None) or (None, why there is no picture)."""
        if not relative:
            return None, "no image in the answer"
        if self.root is None:
            return None, "no --images root given"
        if relative not in self.cache:
            self.cache[relative] = self._load(relative)
        return self.cache[relative]

    def _load(self, relative: str) -> tuple[str | None, str | None]:
        from PIL import Image, ImageOps, UnidentifiedImageError

        try:
            path = safe_image_path(self.root, relative)
        except DxError as exc:
            return None, str(exc)
        if not path.is_file():
            return None, "image not found"
        try:
            with Image.open(path) as image:
                picture = ImageOps.exif_transpose(image).convert("RGB")
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError):
            return None, "image cannot be read"
        picture.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY)
        return _data_uri(buffer.getvalue(), "image/jpeg"), None


# ---------------------------------------------------------------------------------------------
# Plots and page


def curve_images(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """ROC and precision-recall curves of `head_prob`, one line per file, as PNG data URIs.

    Files without head probabilities of both classes are listed in `skipped`; None for a
    picture when no file has them.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import PrecisionRecallDisplay, RocCurveDisplay

    usable, skipped = {}, []
    for name, rows in runs.items():
        pairs = [(label_to_int(r["label"]), r["head_prob"]) for r in rows
                 if r.get("head_prob") is not None]
        if len({truth for truth, _ in pairs}) == 2:
            usable[name] = ([t for t, _ in pairs], [p for _, p in pairs])
        else:
            skipped.append(name)
    images: dict[str, Any] = {"roc": None, "pr": None, "skipped": skipped}
    for kind, display in (("roc", RocCurveDisplay), ("pr", PrecisionRecallDisplay)):
        if not usable:
            break
        fig = Figure(figsize=(5.2, 4.4), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        for name, (truth, probs) in usable.items():
            display.from_predictions(truth, probs, pos_label=1, name=name, ax=ax)
        if kind == "roc":
            ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
            ax.set(xlabel="false positive rate (real called fake)",
                   ylabel="true positive rate (fake found)")
        else:
            ax.set(xlabel="recall (fake found)", ylabel="precision (calls of fake that are right)")
        ax.set_title("binary head: " + ("ROC" if kind == "roc" else "precision-recall")
                     + " (positive: fake)", fontsize=10)
        images[kind] = _figure_uri(fig)
    return images


def _figure_uri(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return _data_uri(buffer.getvalue(), "image/png")


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def render(context: Mapping[str, Any]) -> str:
    """The page from the packaged template; every value is HTML-escaped by jinja2."""
    import jinja2

    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("dxcli.evaluation", "templates"),
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return environment.get_template(TEMPLATE).render(**context)


def _write(out: Path, html: str) -> None:
    """Through a temporary file, so an existing report is never left half-written."""
    if out.parent.exists() and not out.parent.is_dir():
        raise DxError(f"cannot write the report {out}: {out.parent} is a file, not a folder")
    tmp = out.with_name(out.name + ".tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(html, encoding="utf-8")
        tmp.replace(out)
    except OSError as exc:  # read-only folder, full disk, ...
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise DxError(f"cannot write the report {out}: {exc.strerror or exc}") from None
