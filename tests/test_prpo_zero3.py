"""PRPO under ZeRO-3 on 2 processes: rollouts from weights gathered once per rollout equal ZeRO-2's,
and the log-prob pass (embeddings built outside the engine's forward) gives the same numbers; LoRA
PRPO with gradient checkpointing on partly labelled data logs the accuracies its rollouts show."""

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


def config_seed() -> int:
    """train.seed as the runs below resolve it (the data order of each rank follows from it)."""
    from dxcli import config

    return config.resolve("cpu-tiny", []).config.train.seed


def half_labelled_records(demo_root: Path, folder: Path, seed: int) -> tuple[Path, Path, dict[str, str | None]]:
    """(records file, image root, label per image) of 8 demo images, half without a label.

    The images are copied to `pool/NNN.png` (a path that shows no label, which the records would
    otherwise read from `.../real/...`); the unlabelled ones have no binary_label and no answer
    marker. Which ones are labelled follows the 2 ranks' data order, so that over 4 steps of one
    image per rank both ranks, one rank or no rank has a labelled image."""
    import shutil

    from dxcli.base.template import DEFAULT_QUESTION
    from dxcli.training.sampler import ResumableShardSampler

    sources = [p for label in ("fake", "real") for p in sorted(demo_root.glob(f"*/train/{label}/*.png"))[:4]]
    shards = [ResumableShardSampler(len(sources), rank, 2, seed).shard(0) for rank in (0, 1)]
    # step 1: both ranks; step 2: rank 0 only; step 3: none; step 4: rank 1 only
    labelled = {shards[0][0], shards[1][0], shards[0][1], shards[1][3]}
    records, labels = [], {}
    for index, source in enumerate(sources):
        image = f"pool/{index:03d}.png"
        (folder / "pool").mkdir(parents=True, exist_ok=True)
        shutil.copy(source, folder / image)
        label = source.parent.name if index in labelled else None
        labels[image] = label
        record = {"id": image, "image": image, "conversations": [
            {"from": "human", "value": f"<image>\n{DEFAULT_QUESTION}"},
            {"from": "gpt", "value": f"### Answer: {label}" if label else "I will look closely."}]}
        if label:
            record["binary_label"] = int(label == "fake")
        records.append(record)
    path = folder / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, folder, labels


def hand_accuracies(run: Path, step: int, labels: dict[str, str | None]) -> dict[str, float]:
    """The step's accuracies from its saved rollouts: over the labelled images of every rank."""
    from dxcli.base.answer import parse_answer

    groups = [([parse_answer(t) for t in row["texts"]], labels[row["image"]]) for row in rollouts(run, step)]
    known = [(answers, label) for answers, label in groups if label is not None]
    if not known:
        return {}
    right = sum(answer == label for answers, label in known for answer in answers)
    return {"answer_accuracy": right / sum(len(answers) for answers, _ in known),
            "pseudo_label_accuracy": sum(pseudo_label(answers) == label for answers, label in known) / len(known)}


def pseudo_label(answers: list[str | None], min_share: float = 0.5) -> str | None:
    """The group's pseudo-label by hand (prpo.majority_min_share's default): a verdict held by more
    than half of all G answers, invalid ones included in G."""
    for verdict in ("real", "fake"):
        if answers.count(verdict) > min_share * len(answers):
            return verdict
    return None


def test_lora_prpo_under_zero3_with_checkpointing_logs_accuracies_of_partly_labelled_data(trained, demo_root,
                                                                                           tmp_path):
    """Two processes, half the images labelled: every rank reduces the same metrics, so the logged
    accuracy of each step is the one of its labelled images, on whichever rank they were, and a
    step without any logs none. The same run is LoRA PRPO under ZeRO-3 with gradient checkpointing
    (frozen base weights inside checkpointed layers): it finishes and the adapters learn."""
    from safetensors.torch import load_file

    seed = config_seed()
    records, images, labels = half_labelled_records(demo_root, tmp_path / "images", seed)
    out = tmp_path / "rl"
    command = [sys.executable, "-m", "dxcli", "train", "prpo", "--model", str(trained["instruct"]), "--data",
               str(records), "--images", str(images), "--out", str(out), "--nproc-per-node", "2"]
    sets = [*FAST, "prpo.group_size=4", "hardware.micro_batch=4", "prpo.algo=prpo", "prpo.labels=majority",
            "prpo.epochs=1", "train.max_steps=4", "model.lora.r=4", "hardware.zero_stage=3",
            "train.grad_checkpointing=true", f"train.seed={seed}"]
    for item in sets:
        command += ["--set", item]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # the data order gave the cases in question: labelled images on both ranks, one, none, one
    assert [sum(labels[r["image"]] is not None for r in rollouts(out, step)) for step in (1, 2, 3, 4)] == [2, 1, 0, 1]
    for row in rows:
        expected = hand_accuracies(out, row["step"], labels)
        logged = {k: row[k] for k in ("answer_accuracy", "pseudo_label_accuracy") if k in row}
        assert logged == pytest.approx(expected, abs=1e-6), row["step"]
    assert "answer_accuracy" not in rows[2]  # step 3: no rank had a labelled image
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    moved = [name for name, value in adapter.items() if "lora_B" in name and value.abs().max() > 0]
    assert moved, "the adapters did not move (lora_B starts at 0)"

