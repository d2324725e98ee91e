"""The PRPO / GRPO update path on the tiny toy model (tests/helpers_rl.py): the direction of a step,
micro-batch equivalence, several updates per rollout, the reference model and VCR inside the loop,
and the warning for runs without any learning signal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dxcli import config
from dxcli.rl.advantages import grpo_token_advantages, prpo_token_advantages
from dxcli.rl.rewards import load_lexicon
from dxcli.training import prpo
from dxcli.training.rollout import completion_logprobs
from helpers_rl import completion_ids, hand_rollout, open_state, quiet, save_tiny_hf_clip, toy_image

# Answers for one image. PRPO: the first is consistent (PCR 1); the second concludes against its
# own evidence (PCR 0 on its final paragraph only), in other words, so no token is asked to rise in
# one answer and fall in the same context in the other (that would leave its direction to chance).
# GRPO: the toy model's own answers, right ("real") and wrong: the shared marker's pushes cancel
# exactly, the verdict words carry the signal.
TEXTS = {"prpo": ["The skin shows natural pores.\n\n### Answer: real",
                  "The skin shows natural pores.\n\nSo the answer: fake"],
         "grpo": ["### Answer: real", "### Answer: fake", "### Answer: real", "### Answer: fake"]}


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def advantages_for(algo: str, state: prpo.PrpoState, texts: list[str]) -> list[list[float]]:
    """The rollout's token advantages from the reward code itself: PRPO's paragraph rewards, or
    GRPO's answer == ground truth ("real")."""
    ids = completion_ids(state.bundle.tokenizer, texts)
    if algo == "prpo":
        adv, _ = prpo_token_advantages(ids, state.bundle.tokenizer, images=[toy_image("real")], G=len(ids),
                                       clip=None, lexicon=load_lexicon(), cfg=state.cfg.prpo)
    else:
        answers = ["real" if text.endswith("real") else "fake" for text in texts]
        adv, _ = grpo_token_advantages(answers, ["real"], ids, len(ids), state.cfg.prpo.adv_eps)
    return adv


def logprobs(state: prpo.PrpoState, roll) -> torch.Tensor:
    with torch.no_grad():
        return completion_logprobs(state.engine, roll, slice(None), state.engine.device)[0]


@pytest.mark.parametrize("algo", ["prpo", "grpo"])
def test_an_update_raises_positive_and_lowers_negative_advantage_tokens(toy, tmp_path, algo):
    state = open_state(tmp_path / "rl", toy["model"], toy["data"],
                       [f"prpo.algo={algo}", "train.max_steps=1", "prpo.lr=1e-4", "prpo.images_per_step=1",
                        f"prpo.group_size={len(TEXTS[algo])}"])
    roll = hand_rollout(state, toy_image("real"), TEXTS[algo], advantages_for(algo, state, TEXTS[algo]))
    valid = roll.completion_mask.bool()
    positive, negative = valid & (roll.advantages > 0), valid & (roll.advantages < 0)
    assert positive.any() and negative.any()
    before = logprobs(state, roll)
    state.engine.train()
    prpo.update(state, roll)
    change = logprobs(state, roll) - before
    assert change[positive].mean() > 0, change
    assert change[negative].mean() < 0, change


def trainable(state: prpo.PrpoState) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in state.engine.module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean"])
def test_micro_batches_make_the_same_step_as_one_batch(toy, tmp_path, agg):
    """Sequences of different lengths: each micro-batch's loss is reweighted so that one sequence
    at a time and all at once optimise the same mean (METHOD.md §13)."""
    texts = [*TEXTS["prpo"], "### Answer: real", "Edges look warped and smooth.\n\n### Answer: fake"]
    after = {}
    for micro in (1, len(texts)):
        state = open_state(tmp_path / f"mb{micro}", toy["model"], toy["data"],
                           ["train.max_steps=1", "prpo.lr=1e-3", "prpo.images_per_step=1",
                            f"prpo.group_size={len(texts)}", f"hardware.micro_batch={micro}", f"prpo.loss_agg={agg}"])
        assert state.chunks == len(texts) // micro
        roll = hand_rollout(state, toy_image("fake"), texts, advantages_for("prpo", state, texts))
        assert len(set(roll.completion_mask.sum(1).tolist())) >= 3  # lengths differ: token shares matter
        start = trainable(state)
        state.engine.train()
        prpo.update(state, roll)
        after[micro] = trainable(state)
    moved = [name for name in start if not torch.equal(start[name], after[1][name])]
    assert moved  # the step did something
    # Adam's first step moves a parameter by about lr * sign(gradient): a wrong weighting flips
    # signs (differences of 2 * lr); float noise between batch shapes stays far below lr / 100
    worst = max((after[1][name] - after[len(texts)][name]).abs().max().item() for name in start)
    assert worst < 1e-5, worst


def test_several_updates_per_rollout_move_the_ratio_until_it_clips(toy, tmp_path, monkeypatch):
    texts = TEXTS["grpo"]
    steps, rates = [], []

    def policy_step(state, *args):  # the real one, watched: its metrics and the learning rate it ran at
        rates.append(state.scheduler.get_last_lr()[0])
        steps.append(real_step(state, *args))
        return steps[-1]

    real_step = prpo.policy_step
    monkeypatch.setattr(prpo, "policy_step", policy_step)
    for updates in (1, 3):
        state = open_state(tmp_path / f"u{updates}", toy["model"], toy["data"],
                           ["prpo.algo=grpo", "train.max_steps=1", "prpo.lr=1e-2", "prpo.images_per_step=1",
                            "prpo.beta=0", f"prpo.group_size={len(texts)}", f"prpo.updates_per_rollout={updates}"])
        roll = hand_rollout(state, toy_image("real"), texts, advantages_for("grpo", state, texts))
        state.engine.train()
        (old, ref), = prpo.fixed_logprobs(state, roll)
        assert ref is None  # beta = 0: no reference model
        if updates == 1:
            assert old is None  # one update: the old log-probs are the current ones, no extra forward
        else:
            assert torch.equal(old, logprobs(state, roll))  # recorded under the weights that sampled
        steps.clear(), rates.clear()
        logged = prpo.update(state, roll)
        assert state.engine.global_steps == len(steps) == updates  # one optimizer step per update
        assert min(rates) > 0.0  # the schedule counts updates, not rollouts: none runs at lr 0
        fractions = [step["clip_fraction"] for step in steps]
        assert logged["clip_fraction"] == pytest.approx(sum(fractions) / updates)
        assert fractions[0] == 0.0  # every rollout's first update starts at ratio 1
        if updates == 3:  # then the ratio has moved past 1 +- eps and the clip acts
            assert max(fractions[1:]) > 0.0, fractions


def test_reference_model_and_a_tiny_clip_run_inside_the_loop(toy, tmp_path):
    from dxcli.jobs.stages import run_prpo_stage

    clip = save_tiny_hf_clip(tmp_path / "clip")
    sets = ["hardware.num_workers=0", "train.log_every=1", "train.max_steps=2", "prpo.beta=0.1", f"prpo.clip={clip}",
            "prpo.max_new_tokens=8", "prpo.lr=1e-3"]
    run_prpo_stage(out=tmp_path / "rl", resolved=config.resolve("cpu-tiny", sets), model=str(toy["model"]),
                   data=toy["data"], say=quiet)
    rows = metrics(tmp_path / "rl")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert 0.0 <= row["vcr"] <= 1.0
        assert row["zero_advantage_share"] < 1.0  # VCR scores "real" and "fake" answers differently
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-7)  # the reference is the starting policy
    assert rows[1]["kl"] > 1e-6  # after one step the policy has left it (the reference did not move)


def test_a_run_without_learning_signal_says_so(toy, tmp_path):
    from dxcli.jobs.stages import run_prpo_stage

    said = []
    sets = ["hardware.num_workers=0", "train.log_every=1", "train.max_steps=2", "prpo.max_new_tokens=3"]
    run_prpo_stage(out=tmp_path / "rl", resolved=config.resolve("cpu-tiny", sets), model=str(toy["model"]),
                   data=toy["data"], say=said.append)
    assert [row["zero_advantage_share"] for row in metrics(tmp_path / "rl")] == [1.0, 1.0]
    summary = json.loads((tmp_path / "rl" / "summary.json").read_text())
    assert summary == {"algo": "prpo", "steps": 2, "steps_with_signal": 0, "steps_all_invalid": 2,
                       "max_new_tokens": 3, "stopped_by_guard": None}
    warning, = [line for line in said if "no learning signal" in line]
    assert warning.startswith("warning: prpo: no learning signal in any step (all advantages zero)")
    assert "prpo.max_new_tokens=3" in warning


def test_the_signal_warning_reads_the_run_summary(tmp_path):
    from dxcli.jobs.stages import prpo_warnings

    def warning(**summary) -> str | None:
        (tmp_path / "summary.json").write_text(json.dumps({"algo": "grpo", "max_new_tokens": 96, **summary}))
        found = prpo_warnings(tmp_path)
        assert len(found) <= 1  # no guard stop in these summaries: the signal warning or nothing
        return found[0] if found else None

    assert prpo_warnings(tmp_path / "missing") == []
    assert warning(steps=5, steps_with_signal=1, steps_all_invalid=0) is None
    assert "never differed within a group" in warning(steps=5, steps_with_signal=0, steps_all_invalid=3)
    assert "prpo.max_new_tokens=96" in warning(steps=5, steps_with_signal=0, steps_all_invalid=5)


def test_dx_demo_repeats_the_warning_of_a_prpo_stage_without_signal(toy, tmp_path):
    """A finished demo folder (every step's output present) whose PRPO run had no signal."""
    import shutil

    from typer.testing import CliRunner

    from dxcli.cli.main import app

    out = tmp_path / "demo"
    shutil.copytree(toy["data"], out / "data")
    (out / "data" / "reasoning.jsonl").write_text("")
    for stage in ("align", "instruct", "prpo"):
        (out / stage).mkdir(parents=True)
        (out / stage / "model").symlink_to(toy["model"])
    fake = {"question_id": "q", "image": "toy/test/fake/000.png", "domain": "toy", "label": "fake",
            "text": "### Answer: fake", "predict": "fake", "head_prob": 0.9}
    real = {**fake, "question_id": "r", "label": "real", "text": "### Answer: real", "predict": "real", "head_prob": 0.1}
    for name in ("answers.jsonl", "answers-prpo.jsonl"):
        (out / name).write_text(json.dumps(fake) + "\n" + json.dumps(real) + "\n")
    for name in ("questions.jsonl", "score.json", "score-prpo.json"):
        (out / name).write_text("")
    (out / "prpo" / "summary.json").write_text(json.dumps(
        {"algo": "prpo", "steps": 4, "steps_with_signal": 0, "steps_all_invalid": 4, "max_new_tokens": 96}))
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--set", "eval.max_new_tokens=8"])
    assert result.exit_code == 0, result.output[-3000:]
    assert result.output.count("already done, skipped") == 7
    assert "warning: prpo: no learning signal in any step" in " ".join(result.output.split())


# ---------------------------------------------------------------------- settings the loop must pass on


def lora_state(run_dir: Path, toy: dict, sets: list[str]) -> prpo.PrpoState:
    """A LoRA PRPO state whose adapters already do something: B starts at 0, where neither the
    adapters' dropout nor the KL to the adapters-off reference would show."""
    state = open_state(run_dir, toy["model"], toy["data"],
                       ["model.lora.r=4", "train.max_steps=1", "prpo.images_per_step=1",
                        f"prpo.group_size={len(TEXTS['prpo'])}", *sets])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in state.engine.module.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return state


def test_beta_reaches_the_loss_the_loop_minimises(toy, tmp_path):
    """One update per rollout: ratio 1, so the loss is -(mean advantage) + beta * KL exactly, with the
    KL (k3, METHOD.md §13) to the adapters-off reference computed here by hand."""
    beta = 0.5
    state = lora_state(tmp_path / "rl", toy, [f"prpo.beta={beta}"])
    roll = hand_rollout(state, toy_image("real"), TEXTS["prpo"], advantages_for("prpo", state, TEXTS["prpo"]))
    state.engine.train()
    mask = roll.completion_mask.float()
    policy = logprobs(state, roll)
    with state.engine.module.disable_adapter():
        reference = logprobs(state, roll)
    delta = reference - policy
    kl = (((delta.exp() - delta - 1) * mask).sum() / mask.sum()).item()
    surrogate = ((roll.advantages * mask).sum() / mask.sum()).item()
    assert kl > 1e-3  # the adapters moved the policy off the reference: beta's share is visible
    step = prpo.policy_step(state, roll, prpo.fixed_logprobs(state, roll))
    assert step["kl"] == pytest.approx(kl, rel=1e-4)
    assert step["loss"] == pytest.approx(-surrogate + beta * kl, rel=1e-5, abs=1e-7)


def test_rl_passes_run_without_dropout_so_the_first_ratio_is_exactly_one(toy, tmp_path, monkeypatch):
    """LoRA dropout 0.5 and two updates per rollout: the old log-probs (recorded before the first
    update) and the first update's policy log-probs are the same numbers, bit for bit."""
    state = lora_state(tmp_path / "rl", toy, ["model.lora.dropout=0.5", "prpo.updates_per_rollout=2",
                                              "prpo.beta=0.1", "prpo.lr=1e-2"])
    dropouts = [m for name, m in state.engine.module.named_modules()
                if "lora_dropout" in name and isinstance(m, torch.nn.Dropout)]
    assert dropouts  # peft built LoRA's dropout layers (for dropout > 0)
    seen = []

    def watched_loss(logp, old_logp, *args, **kwargs):
        seen.append((logp.detach().clone(), old_logp.detach().clone()))
        return real_loss(logp, old_logp, *args, **kwargs)

    real_loss = prpo.policy_loss
    monkeypatch.setattr(prpo, "policy_loss", watched_loss)
    roll = hand_rollout(state, toy_image("real"), TEXTS["prpo"], advantages_for("prpo", state, TEXTS["prpo"]))
    state.engine.train()  # as the loop does: train mode (gradient checkpointing needs it), dropout at 0
    prpo.update(state, roll)
    (first, old), (second, old_again) = seen
    assert torch.equal(first, old)  # ratio exactly 1
    assert torch.equal(old, old_again) and not torch.equal(second, old)  # then the step moved the policy
    assert all(m.p == 0.0 for m in dropouts)  # how: the layers are there, switched off


def test_instruct_keeps_its_lora_dropout(toy, tmp_path):
    """Only the RL recipe switches dropout off: in instruct, LoRA's dropout still draws masks."""
    from dxcli.jobs import prepare
    from dxcli.training import sft

    run = tmp_path / "sft"
    resolved = config.resolve("cpu-tiny", ["hardware.num_workers=0", "model.lora.r=4", "model.lora.dropout=0.5",
                                           "train.max_steps=1", "instruct.unfreeze_vision=false"])
    prepare.open_run_dir(run, resolved, resume=False, force=True)
    records, images = prepare.run_records(run, "train-records.jsonl", resume=False, say=quiet,
                                           data=toy["data"] / "sft-records.jsonl", images=toy["data"])
    state = sft.setup(sft.SftJob("instruct", str(run), str(run / "config.yaml"), str(records), str(images),
                                 str(toy["model"])))
    with torch.no_grad():
        for name, param in state.engine.module.named_parameters():
            if "lora_B" in name:  # B starts at 0, where dropout before A would change nothing
                param.normal_(0, 0.1)
    batch = next(iter(state.loader))
    engine = state.engine
    engine.train()

    def loss() -> float:
        with torch.no_grad():
            return engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          pixel_values=batch["pixel_values"], labels=batch["labels"]).loss.item()

    assert loss() != loss()  # two dropout masks
    dropouts = [m for name, m in engine.module.named_modules() if "lora_dropout" in name and hasattr(m, "p")]
    assert dropouts and all(m.p == 0.5 for m in dropouts)
    for module in dropouts:  # and the masks are LoRA's: without them the same forward is repeatable
        module.p = 0.0
    assert loss() == loss()


def test_the_loop_turns_record_labels_into_grpo_targets(toy, tmp_path, monkeypatch):
    """binary_label 1 is "fake", 0 "real" (data/records.py), and with prpo.labels=gt GRPO's target
    is that label: the answers equal to it get the positive advantages."""
    from dxcli.data.records import Record
    from dxcli.runtime.dist import Ratio
    from dxcli.training import rollout as rollout_mod
    from helpers_rl import QUESTION, scripted_generate

    texts = ["### Answer: fake", "### Answer: real", "### Answer: real", "I cannot tell."]
    rolls = []
    real_rollout = prpo.rollout
    monkeypatch.setattr(prpo, "rollout", lambda *a, **k: rolls.append(real_rollout(*a, **k)) or rolls[-1])
    monkeypatch.setattr(rollout_mod, "generate", scripted_generate(texts))
    monkeypatch.setattr(prpo, "update", lambda state, roll: dict.fromkeys(prpo.UPDATE_KEYS, 0.0))  # not under test
    state = open_state(tmp_path / "rl", toy["model"], toy["data"],
                       ["prpo.algo=grpo", "prpo.labels=gt", "prpo.group_size=4", "prpo.images_per_step=1",
                        "train.max_steps=1"])
    image = state.records[0].image  # any image: the responses are scripted
    for binary_label, rewarded in ((1, [0]), (0, [1, 2])):
        record = Record(id="r", image=image, question=QUESTION, answer="", binary_label=binary_label, domain="toy")
        row = prpo.train_step(state, [record])
        per_answer = rolls[-1].advantages[:, 0].tolist()
        assert [i for i, a in enumerate(per_answer) if a > 0] == rewarded, (binary_label, per_answer)
        assert all(a < 0 for i, a in enumerate(per_answer) if i not in rewarded)
        assert row["answer_accuracy"] == Ratio(len(rewarded), 4)
