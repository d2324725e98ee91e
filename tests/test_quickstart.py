"""`dx demo`, the README's first command: the whole pipeline clears the bar, and a rerun resumes."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from dxcli.cli.main import app
from dxcli.pipeline import AUC_BAR, F1_BAR


def test_demo_runs_the_pipeline_and_clears_the_bar(tmp_path):
    out = tmp_path / "dx-demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out)])
    assert result.exit_code == 0, result.output[-3000:]
    for name in ("answers.jsonl", "answers-prpo.jsonl", "questions.jsonl", "score.json", "detect.json"):
        assert (out / name).is_file(), name
    for stage in ("align", "instruct", "prpo"):
        assert (out / stage / "model" / "config.json").is_file()
    overall = json.loads((out / "score.json").read_text())["overall"]
    assert overall["f1"] >= F1_BAR or overall["head_auc"] >= AUC_BAR
    assert overall["n"] == len((out / "questions.jsonl").read_text().splitlines())
    detection = json.loads((out / "detect.json").read_text())
    assert detection["verdict"] in ("real", "fake") and detection["error"] is None
    # the PRPO stage learned: steps with signal, a reward that moved, weights that differ from
    # instruct's, and answers that clear the same bar
    summary = json.loads((out / "prpo" / "summary.json").read_text())
    assert summary["steps_with_signal"] > summary["steps"] // 2 and summary["stopped_by_guard"] is None
    rewards = [json.loads(line)["reward"] for line in (out / "prpo" / "metrics.jsonl").read_text().splitlines()]
    assert len(set(rewards)) > 1
    prpo_weights, instruct_weights = (load_file(out / stage / "model" / "model.safetensors")
                                      for stage in ("prpo", "instruct"))
    assert any(not torch.equal(prpo_weights[k], instruct_weights[k]) for k in instruct_weights)
    prpo_overall = json.loads((out / "score-prpo.json").read_text())["overall"]
    assert prpo_overall["f1"] >= F1_BAR or prpo_overall["head_auc"] >= AUC_BAR

    rerun = CliRunner().invoke(app, ["demo", "--out", str(out)])
    assert rerun.exit_code == 0
    assert rerun.output.count("already done, skipped") >= 6
