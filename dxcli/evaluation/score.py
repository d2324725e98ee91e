"""Metrics for answer files (METHOD.md §6), computed with scikit-learn.

Positive class is fake. The headline figures count every question: an answer with no parsable
verdict (`predict: null`) is scored as the opposite of the true label, so a model cannot gain by
refusing to answer. The `*_valid` figures use the parsable answers only.

Reading rules for an answer file (JSONL):
- a malformed line is an error naming file and line, except a torn last line (no trailing
  newline: what a crash mid-append leaves), which is skipped; `torn_tail` tells the caller so it
  can warn;
- a line without `predict` has its verdict parsed from `text` with the one answer parser;
- `label` must be real or fake, `predict` real, fake or null, `head_prob` a number in [0, 1] or
  null; anything else is an error naming the line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dxcli.base.answer import LABELS, head_verdict, label_to_int, parse_answer
from dxcli.base.errors import DxError, UsageError
from dxcli.base.jsonio import iter_numbered_jsonl

MISSING_GROUP = "unknown"  # group name for lines without the --by field


# ---------------------------------------------------------------------------------------------
# Reading


def load_answers(path: Path) -> list[dict[str, Any]]:
    """Answer rows with `label`, `predict` (real/fake/None) and `head_prob` (float/None) checked."""
    path = Path(path)
    rows = []
    for number, raw in iter_numbered_jsonl(path, allow_torn_tail=True):
        try:
            rows.append(_normalise(raw))
        except ValueError as exc:
            raise DxError(f"{path}:{number}: {exc}") from None
    return rows


def torn_tail(path: Path) -> bool:
    """True when the file's last line lacks its newline and is not valid JSON (it was skipped)."""
    data = Path(path).read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    tail = data[data.rfind(b"\n") + 1:]
    if not tail.strip():
        return False
    try:
        json.loads(tail)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return True
    return False


def _normalise(raw: dict[str, Any]) -> dict[str, Any]:
    row = dict(raw)
    row["label"] = _verdict(raw.get("label"), "label", allow_null=False)
    if "predict" in raw:
        row["predict"] = _verdict(raw["predict"], "predict", allow_null=True)
    else:
        row["predict"] = parse_answer(raw.get("text"))
    row["head_prob"] = _probability(raw.get("head_prob"))
    return row


def _verdict(value: Any, field: str, *, allow_null: bool) -> str | None:
    if value is None and allow_null:
        return None
    if isinstance(value, str) and value.strip().lower() in LABELS:
        return value.strip().lower()
    allowed = "real, fake or null" if allow_null else "real or fake"
    raise ValueError(f"`{field}` must be {allowed}, got {value!r}")


def _probability(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"`head_prob` must be a number in [0, 1] or null, got {value!r}")
    return float(value)


# ---------------------------------------------------------------------------------------------
# Metrics


def compute_metrics(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """All figures for one group of normalised rows (see the module docstring for the rules).

    Keys: n, n_valid, accuracy, balanced_accuracy, precision, recall, f1, invalid, invalid_rate,
    accuracy_valid, precision_valid, recall_valid, f1_valid, confusion ([[tn, fp], [fn, tp]],
    labels real, fake, nulls flipped), n_head, head_auc, ap, eer, head_accuracy, agreement.
    `ap` (average precision) and `eer` (equal error rate) rank by `head_prob`. A figure that
    cannot be computed (no rows, no valid answers, no head probabilities, one class only for the
    AUC, AP and EER) is None.
    """
    y_true = [label_to_int(r["label"]) for r in rows]
    # A null verdict is scored as the opposite of the truth: always wrong.
    y_all = [1 - t if r["predict"] is None else label_to_int(r["predict"])
             for r, t in zip(rows, y_true)]
    valid = [(t, label_to_int(r["predict"])) for r, t in zip(rows, y_true) if r["predict"]]
    n = len(rows)
    metrics: dict[str, Any] = {"n": n, "n_valid": len(valid)}
    metrics.update(_classification(y_true, y_all, suffix=""))
    metrics["balanced_accuracy"] = _balanced_accuracy(y_true, y_all)
    metrics["invalid"] = n - len(valid)
    metrics["invalid_rate"] = (n - len(valid)) / n if n else None
    metrics.update(_classification([t for t, _ in valid], [p for _, p in valid], suffix="_valid"))
    metrics["confusion"] = _confusion(y_true, y_all)
    metrics.update(_head_metrics(rows, y_true))
    return metrics


def _classification(y_true: list[int], y_pred: list[int], suffix: str) -> dict[str, float | None]:
    keys = [f"{name}{suffix}" for name in ("accuracy", "precision", "recall", "f1")]
    if not y_true:
        return dict.fromkeys(keys)
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, average="binary", pos_label=1, zero_division=0)
    values = (accuracy_score(y_true, y_pred), precision, recall, f1)
    return {key: float(value) for key, value in zip(keys, values)}


def _balanced_accuracy(y_true: list[int], y_pred: list[int]) -> float | None:
    if not y_true:
        return None
    import warnings

    from sklearn.metrics import balanced_accuracy_score

    # A group holding one class only (a real-only domain) is the recall of that class; sklearn
    # says so with a warning that would only be noise in a score table.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(y_true, y_pred))


def _confusion(y_true: list[int], y_pred: list[int]) -> list[list[int]]:
    if not y_true:
        return [[0, 0], [0, 0]]
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(y_true, y_pred, labels=[0, 1]).tolist()


def _head_metrics(rows: Sequence[Mapping[str, Any]], y_true: list[int]) -> dict[str, Any]:
    scored = [(t, r["head_prob"], r["predict"]) for r, t in zip(rows, y_true)
              if r.get("head_prob") is not None]
    out: dict[str, Any] = {"n_head": len(scored), "head_auc": None, "ap": None, "eer": None,
                           "head_accuracy": None, "agreement": None}
    if not scored:
        return out
    from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score

    truth = [t for t, _, _ in scored]
    probs = [p for _, p, _ in scored]
    head_pred = [label_to_int(head_verdict(p)) for p in probs]
    if len(set(truth)) == 2:
        out["head_auc"] = float(roc_auc_score(truth, probs))
        out["ap"] = float(average_precision_score(truth, probs))
        out["eer"] = equal_error_rate(truth, probs)
    out["head_accuracy"] = float(accuracy_score(truth, head_pred))
    both = [(label_to_int(v), h) for (_, _, v), h in zip(scored, head_pred) if v is not None]
    if both:
        out["agreement"] = float(accuracy_score([v for v, _ in both], [h for _, h in both]))
    return out


def equal_error_rate(truth: Sequence[int], probs: Sequence[float]) -> float:
    """Where the false positive rate equals the false negative rate on the ROC curve.

    The ROC curve is a polyline through sklearn's (fpr, tpr) points; along each segment
    fnr - fpr = 1 - tpr - fpr changes linearly, so the crossing is interpolated on the segment
    where that difference changes sign. Picking the nearest threshold instead would make the
    figure jump by a whole step on small test sets. Needs both classes in `truth`.
    """
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(truth, probs)
    gap = 1 - tpr - fpr  # fnr - fpr: 1 at the first point (0, 0), -1 at the last (1, 1)
    after = int((gap <= 0).argmax())  # first point at or past the crossing
    if gap[after] == 0:
        return float(fpr[after])
    before = after - 1
    share = gap[before] / (gap[before] - gap[after])
    return float(fpr[before] + share * (fpr[after] - fpr[before]))


# ---------------------------------------------------------------------------------------------
# Files and groups


def score_rows(rows: Sequence[Mapping[str, Any]], by: str = "domain") -> dict[str, Any]:
    """`{"overall": metrics, "domains": {group: metrics}}`; groups are values of field `by`.

    Rows without the field form the group `unknown`; a field that no row has is a usage error
    (a typo would otherwise put every row in `unknown`). Rows with an `error` (the image could
    not be read, so the model never answered) are left out of every figure and counted as
    `errors`: they say nothing about the model.
    """
    _check_group_field(rows, by)
    answered = [row for row in rows if not row.get("error")]
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in answered:
        value = row.get(by)
        groups.setdefault(MISSING_GROUP if value is None else str(value), []).append(row)
    return {
        "overall": compute_metrics(answered),
        "domains": {name: compute_metrics(groups[name]) for name in sorted(groups)},
        "errors": len(rows) - len(answered),
    }


def _check_group_field(rows: Sequence[Mapping[str, Any]], by: str, source: str = "") -> None:
    if not rows or any(by in row for row in rows):
        return
    fields = sorted({key for row in rows for key in row})
    where = f"{source}: " if source else ""
    raise UsageError(f"{where}no answer line has the field {by!r} to group by "
                     f"(fields: {', '.join(fields)})")


def score_many(rows_by_file: Mapping[str, Sequence[Mapping[str, Any]]],
               by: str = "domain") -> dict[str, Any]:
    """One file: its `score_rows` result. Several: `{"files": {name: score_rows(...)}}`."""
    for name, rows in rows_by_file.items():
        if not rows:
            raise DxError(f"{name}: no answer lines")
        _check_group_field(rows, by, source=name)
    if len(rows_by_file) == 1:
        (rows,) = rows_by_file.values()
        return score_rows(rows, by)
    return {"files": {name: score_rows(rows, by) for name, rows in rows_by_file.items()}}


def score_file(path: Path, by: str = "domain") -> dict[str, Any]:
    return score_many({str(path): load_answers(path)}, by)


def load_files(paths: Sequence[Path]) -> dict[str, list[dict[str, Any]]]:
    """`{path as given: rows}`; a path given twice is a usage error (its columns would merge)."""
    names = [str(p) for p in paths]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UsageError(f"answer file given more than once: {', '.join(duplicates)}")
    return {name: load_answers(Path(name)) for name in names}


# ---------------------------------------------------------------------------------------------
# Plot


def plot(rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Mapping[str, Any]]],
         out_png: Path) -> Path:
    """ROC curve of `head_prob` (one curve per file) and a confusion matrix per file, one PNG.

    `rows` is one file's rows or `{file name: rows}`. Uses matplotlib's Agg canvas directly
    (no pyplot, no global backend switch).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise DxError("--plot needs matplotlib: pip install 'dxcli[plot]'") from None
    import numpy as np
    from sklearn.metrics import ConfusionMatrixDisplay

    runs = rows if isinstance(rows, Mapping) else {"answers": rows}
    runs = dict(zip(short_names(list(runs)), runs.values()))
    fig = Figure(figsize=(4.5 * (1 + len(runs)), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 1 + len(runs), squeeze=False)[0]
    _plot_roc(axes[0], runs)
    for ax, (name, run_rows) in zip(axes[1:], runs.items()):
        matrix = compute_metrics(run_rows)["confusion"]
        ConfusionMatrixDisplay(confusion_matrix=np.asarray(matrix),
                               display_labels=list(LABELS)).plot(ax=ax, colorbar=False,
                                                                 cmap="Blues")
        ax.set_title(f"{name}\n(null verdicts counted wrong)", fontsize=9)
    return _save_figure(fig, Path(out_png))


def _save_figure(fig, path: Path) -> Path:
    """Write `fig`; a path that cannot be written is one line naming it, not a traceback."""
    if path.parent.exists() and not path.parent.is_dir():
        raise DxError(f"cannot write the plot {path}: {path.parent} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    except OSError as exc:  # read-only folder, full disk, a folder named like the file, ...
        raise DxError(f"cannot write the plot {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # matplotlib: an extension it cannot write, e.g. roc.txt
        raise DxError(f"cannot write the plot {path}: {exc}") from None
    return path


def _plot_roc(ax, runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    from sklearn.metrics import roc_auc_score, roc_curve

    drawn = False
    for name, run_rows in runs.items():
        pairs = [(label_to_int(r["label"]), r["head_prob"]) for r in run_rows
                 if r.get("head_prob") is not None]
        truth = [t for t, _ in pairs]
        if len(set(truth)) < 2:
            continue
        probs = [p for _, p in pairs]
        fpr, tpr, _ = roc_curve(truth, probs)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(truth, probs):.3f})")
        drawn = True
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate (fake)")
    ax.set_title("binary head ROC", fontsize=9)
    if drawn:
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no head_prob with both classes", ha="center", va="center")



def short_names(names: list[str]) -> list[str]:
    """File names without their folders, unless that makes two of them equal."""
    short = [Path(n).name for n in names]
    return short if len(set(short)) == len(short) else names
