"""PRPO under ZeRO-3 on 2 processes: rollouts from weights gathered once per rollout equal ZeRO-2's,
and the log-prob pass (embeddings built outside the engine's forward) gives the same numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# 80 new tokens: enough for the tiny instruct model to conclude, so advantages (and gradients) are not all 0
FAST = ["hardware.num_workers=0", "prpo.max_new_tokens=80", "prpo.group_size=2", "prpo.images_per_step=1",
        "hardware.micro_batch=2", "train.log_every=1", "prpo.save_rollouts=true"]


def run_prpo(model: Path, data: Path, out: Path, zero_stage: int, steps: int) -> float:
    """`dx train prpo` on 2 processes; returns its wall time in seconds."""
    command = [sys.executable, "-m", "dxcli", "train", "prpo", "--model", str(model), "--data", str(data),
               "--out", str(out), "--nproc-per-node", "2"]
    for item in [*FAST, f"train.max_steps={steps}", f"hardware.zero_stage={zero_stage}"]:
        command += ["--set", item]
    started = time.time()
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return time.time() - started


def rollouts(run: Path, step: int) -> list[dict]:
    lines = []
    for rank in (0, 1):
        lines += [row for row in map(json.loads, (run / f"rollouts-rank{rank}.jsonl").read_text().splitlines())
                  if row["step"] == step]
    return lines


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_zero3_prpo_matches_zero2_at_step_one(trained, demo_root, tmp_path):
    seconds = run_prpo(trained["instruct"], demo_root, tmp_path / "z3", zero_stage=3, steps=6)
    run_prpo(trained["instruct"], demo_root, tmp_path / "z2", zero_stage=2, steps=6)  # same lr schedule
    z3, z2 = metrics(tmp_path / "z3"), metrics(tmp_path / "z2")
    assert [r["step"] for r in z3] == [1, 2, 3, 4, 5, 6]
    assert seconds < 90, f"6 ZeRO-3 steps took {seconds:.0f} s"
    # same seed, same starting weights: the gathered ZeRO-3 weights sample exactly what ZeRO-2's do
    first = rollouts(tmp_path / "z3", 1)
    assert first == rollouts(tmp_path / "z2", 1)
    assert {row["rank"] for row in first} == {0, 1} and all(len(row["texts"]) == 2 for row in first)
    assert {row["step"] for row in map(json.loads, (tmp_path / "z3" / "rollouts-rank1.jsonl").read_text()
                                       .splitlines())} == set(range(1, 7))
    # the log-prob pass under ZeRO-3 scores those samples as ZeRO-2 does (entropy comes from it), and its
    # gradients (embeddings included) move the weights alike: later steps sample and score the same
    assert any(row["loss"] != 0 for row in z2[:5])  # updates that change the weights before step 6
    for mine, theirs in zip(z3, z2, strict=True):
        for key in ("entropy", "loss", "response_tokens", "reward"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-5), (mine["step"], key)
    from dxcli.model.checkpoint import load_checkpoint

    assert type(load_checkpoint(tmp_path / "z3" / "model").model).__name__ == "DxLlavaForConditionalGeneration"


def test_logprob_pass_agrees_with_generation(trained, demo_root):
    """completion_logprobs (one forward, positions from the mask) gives the log-probs generate saw
    token by token, with prompts of different lengths left-padded in one batch."""
    from dxcli import config
    from dxcli.base.images import load_rgb
    from dxcli.model.checkpoint import load_checkpoint
    from dxcli.rl.rewards import load_lexicon
    from dxcli.training.rollout import completion_logprobs, rollout

    bundle = load_checkpoint(trained["instruct"])
    seen = {}
    original = bundle.model.generate

    def spy(**kwargs):
        out = original(**kwargs, output_logits=True, return_dict_in_generate=True)
        seen["logits"] = torch.stack(out.logits, 1)  # raw logits, before sampling's processors
        return out.sequences

    bundle.model.generate = spy
    cfg = config.resolve("cpu-tiny", ["prpo.max_new_tokens=10", "prpo.group_size=2"]).config.prpo
    images = [load_rgb(p) for p in sorted(demo_root.glob("gan/train/*/*.png"))[:2]]
    questions = ["Real or fake?", "Look closely at the edges, the lighting and the texture: real or fake?"]
    roll = rollout(bundle, images, questions, [None, None], cfg=cfg, clip=None, lexicon=load_lexicon(), seed=3)
    assert roll.prompt_mask[:, 0].tolist().count(0) == 2  # the short prompt's rows are left-padded
    with torch.no_grad():
        logp, _ = completion_logprobs(bundle.model, roll, slice(0, 4), torch.device("cpu"))
    width = roll.completion_ids.shape[1]
    at_generation = torch.log_softmax(seen["logits"][:, :width].float(), -1).gather(
        -1, roll.completion_ids.unsqueeze(-1)).squeeze(-1)
    valid = roll.completion_mask.bool()
    assert torch.allclose(logp[valid], at_generation[valid], atol=1e-4)
