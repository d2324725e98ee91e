"""What the PRPO reward sees, paragraph by paragraph: the library behind `dx eval rewards`.

Input rows are rollouts `{"image": rel or null, "responses": [text, ...]}`, or an answers file
from `dx eval infer` (one line per answer, grouped by `question_id` into one row each).
Advantages are computed per row, as in training (over all paragraphs of the row's responses).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from dxcli.base.errors import DxError
from dxcli.base.images import load_rgb, safe_image_path
from dxcli.base.jsonio import read_json_or_jsonl
from dxcli.config import PrpoConfig
from dxcli.rl.clip import ClipScorer, load_clip
from dxcli.rl.objective import prpo_advantages
from dxcli.rl.rewards import (
    Lexicon,
    default_lexicon,
    load_lexicon,
    paragraph_rewards,
    score_response,
)


def rows_from_file(path: Path) -> list[dict[str, Any]]:
    """Read rollouts or eval answers (decided per file; mixing both is an error)."""
    records = read_json_or_jsonl(Path(path))
    kinds = {"rollouts" if "responses" in r else "answers" if "question_id" in r else None
             for r in records}
    if None in kinds:
        number = next(i for i, r in enumerate(records, 1)
                      if "responses" not in r and "question_id" not in r)
        raise DxError(f"{path}: record {number} has neither 'responses' (rollouts) nor "
                      "'question_id' (eval answers)")
    if len(kinds) > 1:
        raise DxError(f"{path}: mixes rollout records and eval answer records")
    if kinds == {"answers"}:
        return _group_answers(path, records)
    return [_rollout_row(path, number, record) for number, record in enumerate(records, 1)]


def _image_field(path: Path, number: int, record: dict) -> str | None:
    image = record.get("image")
    if image is not None and not isinstance(image, str):
        raise DxError(f"{path}: record {number}: 'image' must be a path or null")
    return image or None


def _rollout_row(path: Path, number: int, record: dict) -> dict[str, Any]:
    responses = record["responses"]
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise DxError(f"{path}: record {number}: 'responses' must be a list of strings")
    return {"image": _image_field(path, number, record), "responses": responses}


def _group_answers(path: Path, records: list[dict]) -> list[dict[str, Any]]:
    rows: dict[Any, dict[str, Any]] = {}
    for number, record in enumerate(records, 1):
        text = record.get("text")
        if not isinstance(text, str):
            raise DxError(f"{path}: record {number}: 'text' must be a string")
        key = str(record["question_id"])
        row = rows.setdefault(key, {"image": _image_field(path, number, record), "responses": []})
        row["responses"].append(text)
    return list(rows.values())


def explain(
    rows: list[dict[str, Any]],
    *,
    images_root: Path | None,
    clip: ClipScorer | None,
    lexicon: Lexicon | None = None,
    a: float = 0.5,
    b: float = 0.5,
    eps: float = 1e-4,
    no_majority: float = 0.0,
) -> list[dict[str, Any]]:
    """One object per row: `{"image", "responses": [{"answer", "paragraphs": [{"text", "start",
    "end", "keyword", "label", "vcr", "pcr", "reward", "advantage"}]}]}`; `vcr` is None when
    `clip` is None or the row has no image. `no_majority`: PCR of a final paragraph whose earlier
    paragraphs give a tie or no votes (`prpo.pcr_no_majority`)."""
    lexicon = lexicon or default_lexicon()
    explained = []
    for row in rows:
        scores = [score_response(text, lexicon=lexicon, no_majority=no_majority) for text in row["responses"]]
        vcr = None
        if clip is not None and row.get("image"):
            embedding = clip.image_embeddings([_open_image(row["image"], images_root)])
            vcr = clip.group_vcr(embedding, [scores])[0]
        rewards = paragraph_rewards(scores, vcr, a, b)
        advantages = prpo_advantages(rewards, eps)
        responses = []
        for index, score in enumerate(scores):
            paragraphs = [
                {
                    "text": p.text,
                    "start": p.start,
                    "end": p.end,
                    "keyword": score.keywords[j],
                    "label": score.labels[j],
                    "vcr": None if vcr is None else vcr[index][j],
                    "pcr": score.pcr[j],
                    "reward": rewards[index][j],
                    "advantage": advantages[index][j],
                }
                for j, p in enumerate(score.paragraphs)
            ]
            responses.append({"answer": score.answer, "paragraphs": paragraphs})
        explained.append({"image": row.get("image"), "responses": responses})
    return explained


def explain_file(path: Path, *, images_root: Path | None, prpo: PrpoConfig, use_clip: bool = True
                 ) -> list[dict[str, Any]]:
    """`explain` for a rollouts or answers file with the reward settings of a config's prpo section
    (its CLIP when `use_clip` and one is set, its lexicon, its `pcr_no_majority`)."""
    rows = rows_from_file(Path(path))
    if not rows:
        raise DxError(f"{path}: no rows to explain")
    clip = load_clip(prpo.clip) if use_clip and prpo.clip else None
    lexicon = load_lexicon(Path(prpo.lexicon) if prpo.lexicon else None)
    return explain(rows, images_root=images_root, clip=clip, lexicon=lexicon, a=prpo.vcr_weight,
                   b=prpo.pcr_weight, eps=prpo.adv_eps, no_majority=prpo.pcr_no_majority)


def _open_image(relative: str, root: Path | None) -> Any:
    path = safe_image_path(Path(root), relative) if root is not None else Path(relative)
    if not path.is_file():
        hint = "" if root is not None else " (pass the image root with --images)"
        raise DxError(f"image not found: {path}{hint}")
    try:
        return load_rgb(path)
    except OSError as exc:
        raise DxError(f"cannot read image {path}: {exc}") from None


def summarize(explained: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean VCR (where computed), mean PCR and reward over all paragraphs, final-answer
    consistency rate (share of answered responses whose final PCR is 1: the answer agrees with the
    majority label of their earlier paragraphs, or, with `prpo.pcr_no_majority` = 1, those give a
    tie or no votes), paragraphs per response, invalid (no answer) rate."""
    responses = [r for row in explained for r in row["responses"]]
    paragraphs = [p for r in responses for p in r["paragraphs"]]
    answered = [r for r in responses if r["answer"] is not None]
    vcrs = [p["vcr"] for p in paragraphs if p["vcr"] is not None]

    def mean(values: list[float]) -> float | None:
        return statistics.fmean(values) if values else None

    return {
        "rows": len(explained),
        "responses": len(responses),
        "paragraphs": len(paragraphs),
        "mean_vcr": mean(vcrs),
        "mean_pcr": mean([p["pcr"] for p in paragraphs]),
        "mean_reward": mean([p["reward"] for p in paragraphs]),
        # non-final paragraphs of an answered response have PCR 1, so all-ones = consistent
        "consistency_rate": mean([float(all(p["pcr"] == 1.0 for p in r["paragraphs"]))
                                  for r in answered]),
        "paragraphs_per_response": mean([float(len(r["paragraphs"])) for r in responses]),
        "invalid_rate": mean([float(r["answer"] is None) for r in responses]),
    }
