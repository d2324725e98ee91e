"""How many pseudo-labels a majority rule gives, and how many are right, from sampled answer files.

Reads the G sampled answer files that `bench_paper_table.py` writes for a model on a held-out
domain (`answers-<domain>-<model>-t<T>-p<P>-sample<k>.jsonl`, one sample per question each) and,
for each candidate `prpo.majority_min_share`, applies the rule RL uses (`rl.objective.majority_answer`:
the top verdict must hold more than that share of all G samples, invalid ones counting against it)
and reports the share of questions that get a label (coverage), the accuracy of those labels, and
the net signal per question: (right labels - wrong labels) / questions. A wrong pseudo-label pushes
a group towards the wrong verdict as hard as a right one pushes it towards the right one, so the
rule with the largest net signal is the one that teaches the most.

    python tests/bench/bench_pseudo_labels.py FOLDER[,FOLDER...] --model sft --pattern '-t1-p0.7-sample*'

FOLDER is a leave-one-out work folder (`<work>/data-hard-<seed>-loo-<domain>`); the held-out domain is
read from the folder's name.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dxcli.evaluation.score import load_answers
from dxcli.rl.objective import majority_answer

SHARES = (0.0, 0.25, 0.5, 0.75)  # with G = 4: a plurality of valid votes, >= 2, >= 3, all 4 votes


def votes(folder: Path, model: str, pattern: str) -> list[tuple[str, list[str | None]]]:
    """(true label, G sampled verdicts) per held-out question of one leave-one-out folder."""
    domain = folder.name.rsplit("-loo-", 1)[1]
    files = sorted(folder.glob(f"answers-{domain}-{model}{pattern}.jsonl"))
    if not files:
        raise SystemExit(f"no sampled answer files answers-{domain}-{model}{pattern}.jsonl in {folder}")
    sampled = [{row["question_id"]: row for row in load_answers(path)} for path in files]
    return [(row["label"], [s[qid].get("predict") for s in sampled]) for qid, row in sampled[0].items()]


def rule_stats(groups: list[tuple[str, list[str | None]]], share: float) -> dict:
    labels = [(truth, majority_answer(answers, share)[0]) for truth, answers in groups]
    given = [(truth, label) for truth, label in labels if label is not None]
    right = sum(truth == label for truth, label in given)
    return {"min_share": share, "coverage": round(len(given) / len(groups), 3),
            "accuracy": round(right / len(given), 3) if given else None,
            "net_signal": round((2 * right - len(given)) / len(groups), 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", help="leave-one-out work folders, comma-separated")
    parser.add_argument("--model", default="sft", help="the model part of the answer files' names")
    parser.add_argument("--pattern", default="-t1-p0.7-sample*", help="the sampled files' suffix glob")
    args = parser.parse_args(argv)
    groups = [group for folder in args.folders.split(",") for group in votes(Path(folder), args.model, args.pattern)]
    rows = [rule_stats(groups, share) for share in SHARES]
    print(f"{len(groups)} questions, G = {len(groups[0][1])}")
    print("min_share  coverage  accuracy  net_signal")
    for row in rows:
        print(f"{row['min_share']:>9}  {row['coverage']:>8}  {row['accuracy']!s:>8}  {row['net_signal']:>10}")
    print(json.dumps({"questions": len(groups), "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
