"""The collapse guard: its decision, its restorable copy, and a run it stops (METHOD.md §12)."""

from __future__ import annotations

import pytest
import torch

from dxcli.rl.guard import ProbeMix, drift, judges_classes
from dxcli.runtime.dist import Dist

RULES = dict(min_class_share=0.1, max_invalid_rise=0.25)


def test_a_healthy_policy_passes():
    start = ProbeMix(real=8, fake=6, invalid=2)
    assert drift(start, ProbeMix(real=5, fake=9, invalid=2), **RULES) is None
    # a small rise in invalid answers, within the allowance
    assert drift(start, ProbeMix(real=6, fake=5, invalid=5), **RULES) is None


def test_one_class_swallowing_the_other_trips():
    start = ProbeMix(real=8, fake=8, invalid=0)
    reason = drift(start, ProbeMix(real=16, fake=0, invalid=0), **RULES)
    assert reason is not None and "'real'" in reason and "16 real / 0 fake" in reason
    # the boundary: 1 fake in 11 valid answers is 9% < 10%; 2 in 16 is 12.5%
    assert drift(start, ProbeMix(real=10, fake=1, invalid=0), **RULES) is not None
    assert drift(start, ProbeMix(real=14, fake=2, invalid=0), **RULES) is None


def test_answers_that_stop_being_valid_trip():
    start = ProbeMix(real=7, fake=7, invalid=2)  # 12.5% invalid
    reason = drift(start, ProbeMix(real=3, fake=3, invalid=10), **RULES)
    assert reason is not None and "invalid answers rose from 12% to 62%" in reason
    # nothing valid at all is a collapse whatever the thresholds
    assert drift(start, ProbeMix(real=0, fake=0, invalid=16), min_class_share=0.0, max_invalid_rise=0.5)


def test_a_start_that_calls_one_class_is_guarded_on_validity_only():
    start = ProbeMix(real=16, fake=0, invalid=0)
    assert not judges_classes(start, 0.1)
    assert drift(start, ProbeMix(real=16, fake=0, invalid=0), **RULES) is None
    assert drift(start, ProbeMix(real=8, fake=0, invalid=8), **RULES) is not None


@pytest.mark.parametrize("in_memory", [True, False])
def test_healthy_copy_restores_exactly_what_learns(tmp_path, monkeypatch, in_memory):
    from dxcli.training import guard

    if not in_memory:
        monkeypatch.setattr(guard, "IN_MEMORY_LIMIT_BYTES", 0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)  # frozen: not part of the copy
    copy = guard.HealthyCopy(tmp_path / "guard", Dist())
    copy.take(model)
    assert copy.path.is_file() == (not in_memory)
    healthy = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    copy.restore(model)
    for key, value in model.state_dict().items():
        if key.startswith("1."):
            assert torch.equal(value, healthy[key]), key
        else:  # the frozen layer is not the guard's business (it cannot drift)
            assert torch.equal(value, healthy[key] + 1.0), key


def test_probe_set_is_the_same_draw_dealt_over_ranks():
    from dxcli.training.guard import probe_set

    records = list(range(40))
    one = probe_set(records, 10, seed=3, dist=Dist())
    two = [probe_set(records, 10, seed=3, dist=Dist(rank=r, world=2)) for r in range(2)]
    assert len(one) == 10 and sorted(two[0] + two[1]) == sorted(one)
    assert one != records[:10]  # a draw over all prompts, not the first ones


def test_an_unstable_run_is_stopped_and_keeps_a_model_that_calls_both_classes(trained, demo_root, tmp_path):
    """GRPO at a learning rate ten times cpu-tiny's (1e-3, T 1.5) makes every answer invalid within
    a few steps (measured: sampled rollouts at step 3, greedy probe answers at step 5); the guard
    stops it, RUN/model is the last healthy copy, the drifted weights are kept aside."""
    import json

    from dxcli import config
    from dxcli.base.answer import parse_answer
    from dxcli.base.images import load_rgb
    from dxcli.jobs.stages import run_prpo_stage
    from dxcli.model.checkpoint import load_checkpoint
    from dxcli.model.generate import generate

    sets = ["hardware.num_workers=0", "train.max_steps=10", "prpo.epochs=1", "train.log_every=1", "prpo.algo=grpo",
            "prpo.labels=gt", "prpo.lr=1e-3", "prpo.temperature=1.5", "prpo.group_size=4",
            "prpo.images_per_step=2", "prpo.max_new_tokens=96", "prpo.guard_every=1", "prpo.guard_probe_size=12",
            "prpo.top_p=0.9", "prpo.beta=0"]  # the setting measured below, whatever cpu-tiny's defaults
    said: list[str] = []
    out = tmp_path / "ttrl"
    model = run_prpo_stage(out=out, resolved=config.resolve("cpu-tiny", sets), model=str(trained["instruct"]),
                           data=demo_root, split="test", say=said.append)
    summary = json.loads((out / "summary.json").read_text())
    tripped = summary["stopped_by_guard"]
    assert tripped is not None, summary
    assert tripped["step"] < 10 and tripped["restored_step"] < tripped["step"]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, tripped["step"] + 1))  # it stopped where it said
    warnings = [line for line in said if "collapse guard" in line]
    assert len(warnings) == 1 and tripped["reason"] in warnings[0]
    assert (out / "drifted" / "model" / "config.json").is_file()
    # the kept model answers the probe as the start did: both classes, mostly valid
    bundle = load_checkpoint(model)
    images = sorted(demo_root.glob("*/test/*/*.png"))[::4]
    texts = generate(bundle, [load_rgb(p) for p in images], ["Is this image real or fake?"] * len(images),
                     max_new_tokens=96).texts
    answers = [parse_answer(t) for t in texts]
    assert {"real", "fake"} <= set(answers), answers


def test_two_processes_under_zero3_stop_together_and_restore_the_partitions(trained, demo_root, tmp_path):
    """2 processes, ZeRO-3, full fine-tuning: at lr 0.05 the first probe after step 1 sees the
    collapse on both ranks (counts summed over ranks), each rank restores its own partition of the
    start, and the gathered RUN/model is the starting model's LLM, bit for bit."""
    import json
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    out = tmp_path / "z3"
    sets = ["hardware.num_workers=0", "hardware.zero_stage=3", "train.max_steps=6", "prpo.epochs=1",
            "prpo.algo=grpo", "prpo.labels=gt", "prpo.lr=0.05", "prpo.temperature=1.5", "prpo.group_size=4",
            "prpo.images_per_step=1", "prpo.max_new_tokens=96", "prpo.guard_every=1", "prpo.guard_probe_size=6",
            "prpo.top_p=0.9", "prpo.beta=0"]
    command = [sys.executable, "-m", "dxcli", "train", "prpo", "--model", str(trained["instruct"]), "--data",
               str(demo_root), "--split", "test", "--out", str(out), "--nproc-per-node", "2"]
    for item in sets:
        command += ["--set", item]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    tripped = json.loads((out / "summary.json").read_text())["stopped_by_guard"]
    assert tripped is not None and tripped["restored_step"] == 0, tripped
    assert tripped["probe"]["real"] + tripped["probe"]["fake"] + tripped["probe"]["invalid"] == 6  # both ranks
    assert "collapse guard" in " ".join(result.stderr.split())
    start, kept = (load_file(folder / "model.safetensors") for folder in (trained["instruct"], out / "model"))
    drifted = load_file(out / "drifted" / "model" / "model.safetensors")
    llm = [k for k in start if "language_model" in k]
    assert llm and all(torch.equal(kept[k], start[k]) for k in llm)
    assert any(not torch.equal(drifted[k], start[k]) for k in llm)
