"""RL that learns: a short GRPO run with ground-truth labels on the toy setting (tests/helpers_rl.py:
bright images are real, dark ones fake; the starting model answers in the format but at random)
raises answer accuracy from chance to nearly always right."""

from __future__ import annotations

import json

from dxcli import config
from helpers_rl import quiet

GRPO = ["hardware.num_workers=0", "hardware.threads=1", "train.log_every=1", "train.max_steps=24", "prpo.epochs=100",
        "prpo.algo=grpo", "prpo.labels=gt", "prpo.lr=1e-3", "prpo.group_size=8", "prpo.images_per_step=4",
        "hardware.micro_batch=32", "prpo.max_new_tokens=12"]  # answers take ~6 tokens: room to conclude


def test_grpo_with_ground_truth_learns_the_label(toy, tmp_path):
    from dxcli.jobs.stages import run_prpo_stage

    run_prpo_stage(out=tmp_path / "grpo", resolved=config.resolve("cpu-tiny", GRPO), model=str(toy["model"]),
                   data=toy["data"], say=quiet)
    rows = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 24
    accuracy = [row["answer_accuracy"] for row in rows]  # each row: the rollout before that step's update
    first, last = sum(accuracy[:3]) / 3, sum(accuracy[-5:]) / 5
    assert first < 0.7, accuracy  # the start is near chance: the format is known, the answer is not
    # a policy that learned the label (majority pseudo-labels instead collapse onto one answer: ~0.5)
    assert last >= 0.85 and last - first >= 0.25, accuracy
