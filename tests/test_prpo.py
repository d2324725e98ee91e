"""dx train prpo: both algorithms, log-probs with the image, several processes, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dxcli import config

FAST = ["hardware.num_workers=0", "prpo.max_new_tokens=24", "prpo.group_size=3", "prpo.images_per_step=2",
        "train.log_every=1", "hardware.micro_batch=4"]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algo,labels", [("prpo", "gt"), ("grpo", "gt"), ("grpo", "majority")])
def test_prpo_and_grpo_run_and_log(trained, demo_root, tmp_path, algo, labels):
    from dxcli.jobs.stages import run_prpo_stage

    resolved = config.resolve("cpu-tiny", [*FAST, "train.max_steps=2", f"prpo.algo={algo}", f"prpo.labels={labels}"])
    model = run_prpo_stage(out=tmp_path / "rl", resolved=resolved, model=str(trained["instruct"]), data=demo_root,
                           say=lambda *_: None)
    rows = metrics(tmp_path / "rl")
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward", "response_tokens", "invalid_rate", "kl", "clip_fraction", "entropy", "majority_ratio",
                "pseudo_label_accuracy", "lr", "zero_advantage_share"):
        assert key in rows[0], key
    if algo == "prpo":
        assert {"pcr", "paragraphs"} <= set(rows[0])
    assert (model / "config.json").is_file()


def test_rollout_logprobs_are_computed_with_the_image(trained, demo_root):
    from dxcli.model.checkpoint import load_checkpoint
    from dxcli.training.rollout import completion_logprobs, rollout
    from dxcli.rl.rewards import load_lexicon
    from dxcli.base.images import load_rgb

    bundle = load_checkpoint(trained["instruct"])
    cfg = config.resolve("cpu-tiny", [*FAST]).config.prpo
    images = [load_rgb(p) for p in sorted(demo_root.glob("gan/train/*/*.png"))[:2]]
    roll = rollout(bundle, images, ["Real or fake?"] * 2, ["real", "fake"], cfg=cfg, clip=None,
                   lexicon=load_lexicon(), seed=0)
    assert roll.completion_ids.shape[0] == 2 * cfg.group_size
    with torch.no_grad():
        logp, _ = completion_logprobs(bundle.model, roll, slice(0, 2), torch.device("cpu"))
        # the same numbers from a plain forward over prompt + completion with pixel values
        ids = torch.cat([roll.prompt_ids[:2], roll.completion_ids[:2]], 1)
        mask = torch.cat([roll.prompt_mask[:2], roll.completion_mask[:2]], 1)
        from dxcli.model.generate import pixel_values

        pixels = pixel_values(bundle, [images[0], images[0]], torch.float32, torch.device("cpu"))
        logits = bundle.model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        width = roll.completion_ids.shape[1]
        expected = torch.log_softmax(logits[:, -width - 1:-1].float(), -1).gather(
            -1, roll.completion_ids[:2].unsqueeze(-1)).squeeze(-1)
    valid = roll.completion_mask[:2].bool()
    assert torch.allclose(logp[valid], expected[valid], atol=1e-4)


def test_prpo_resume_continues(trained, demo_root, tmp_path, monkeypatch):
    from dxcli.jobs.stages import run_prpo_stage

    sets = [*FAST, "train.max_steps=3"]
    monkeypatch.setenv("DX_STOP_AFTER_STEP", "2")
    with pytest.raises(SystemExit):
        run_prpo_stage(out=tmp_path / "rl", resolved=config.resolve("cpu-tiny", sets), model=str(trained["instruct"]),
                       data=demo_root, say=lambda *_: None)
    monkeypatch.delenv("DX_STOP_AFTER_STEP")
    run_prpo_stage(out=tmp_path / "rl", resolved=config.resolve("cpu-tiny", []), model=str(trained["instruct"]),
                   resume=True, say=lambda *_: None)
    rows = metrics(tmp_path / "rl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[2]["epoch"] > rows[1]["epoch"]  # the data position moved on, nothing repeated
    # the signal tally survives the resume: 24 new tokens never reach an answer, in any of the 3 steps
    summary = json.loads((tmp_path / "rl" / "summary.json").read_text())
    assert (summary["steps"], summary["steps_all_invalid"], summary["steps_with_signal"]) == (3, 3, 0)


def test_two_process_grpo(trained, demo_root, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "rl2"
    command = [sys.executable, "-m", "dxcli", "train", "prpo", "--model", str(trained["instruct"]), "--data",
               str(demo_root), "--out", str(out), "--algo", "grpo", "--labels", "majority", "--nproc-per-node", "2"]
    for item in [*FAST, "train.max_steps=2"]:
        command += ["--set", item]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in metrics(out)] == [1, 2]
    assert (out / "model" / "config.json").is_file()


def test_two_process_prpo_under_zero2(toy, tmp_path):
    """PRPO with VCR (a tiny CLIP) and two updates per rollout on two processes under ZeRO-2."""
    from helpers_rl import save_tiny_hf_clip

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "rl2"
    clip = save_tiny_hf_clip(tmp_path / "clip")
    command = [sys.executable, "-m", "dxcli", "train", "prpo", "--model", str(toy["model"]), "--data",
               str(toy["data"]), "--out", str(out), "--algo", "prpo", "--clip", str(clip), "--nproc-per-node", "2"]
    for item in ["hardware.num_workers=0", "hardware.zero_stage=2", "train.log_every=1", "train.max_steps=2",
                 "prpo.epochs=1", "prpo.max_new_tokens=8", "prpo.updates_per_rollout=2"]:
        command += ["--set", item]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["zero_advantage_share"] < 1.0 and 0.0 <= r["vcr"] <= 1.0 for r in rows)
    assert config.load(out / "config.yaml").hardware.zero_stage == 2
    assert json.loads((out / "summary.json").read_text())["steps_with_signal"] == 2
    assert "no learning signal" not in result.stderr
    assert (out / "model" / "config.json").is_file()


def test_verdict_only_credit_keeps_the_final_advantage_on_the_verdict_word():
    from dxcli.rl.advantages import verdict_only_credit

    text = "Edges are soft.\n\n### Answer: fake"
    # four tokens: the first paragraph, the marker, the verdict word, and an EOS with an empty span
    spans = [(0, 17), (17, 29), (29, 34), (34, 34)]
    owners = [0, 1, 1, 1]
    out = verdict_only_credit([0.4, -2.0, -2.0, -2.0], owners, (text, spans), final=1)
    assert out == [0.4, 0.4, -2.0, 0.4]
    assert verdict_only_credit([1.0, 2.0], [0, 0], ("no marker", [(0, 2), (2, 9)]), final=0) == [1.0, 2.0]


def test_prpo_with_verdict_credit_runs(trained, demo_root, tmp_path):
    from dxcli.jobs.stages import run_prpo_stage

    resolved = config.resolve("cpu-tiny", [*FAST, "train.max_steps=1", "prpo.final_credit=verdict"])
    run_prpo_stage(out=tmp_path / "rl", resolved=resolved, model=str(trained["instruct"]), data=demo_root,
                   say=lambda *_: None)
    assert [r["step"] for r in metrics(tmp_path / "rl")] == [1]
