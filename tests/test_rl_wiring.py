"""Settings that must reach the rewards, checked through the functions the loop calls (`rollout`,
`prpo_token_advantages`) with scripted responses: which tokens carry the final paragraph's
advantage (prpo.final_credit), that PRPO never reads the labels, and GRPO's labels -> targets."""

from __future__ import annotations

import pytest
import torch

from dxcli import config
from dxcli.base.answer import verdict_span
from dxcli.rl.advantages import prpo_token_advantages
from dxcli.rl.paragraphs import token_char_spans
from dxcli.rl.rewards import load_lexicon
from dxcli.training import rollout as rollout_mod
from helpers_rl import completion_ids, scripted_generate, text_bundle


def prpo_config(*sets: str):
    return config.resolve("cpu-tiny", list(sets)).config.prpo


# ---------------------------------------------------------------------- prpo.final_credit (METHOD.md §11)

# one image, two answers with the same evidence: the first concludes with it (final PCR 1), the
# second against it (final PCR 0), so the second's final paragraph is the group's negative outlier
CREDIT_TEXTS = ["Edges look warped and blurry.\n\n### Answer: fake",
                "Edges look warped and blurry.\n\n### Answer: real"]


def credit(final_credit: str) -> tuple[list[float], list[bool], list[bool]]:
    """The inconsistent answer's token advantages, and per token: in its final paragraph? on its verdict word?"""
    tokenizer = text_bundle(CREDIT_TEXTS).tokenizer
    ids = completion_ids(tokenizer, CREDIT_TEXTS)
    adv, _ = prpo_token_advantages(ids, tokenizer, images=[None], G=2, clip=None, lexicon=load_lexicon(),
                                   cfg=prpo_config(f"prpo.final_credit={final_credit}"))
    text, spans = token_char_spans(tokenizer, ids[1])
    final_start = text.index("###")
    word_start, word_end = verdict_span(text)
    # the final paragraph starts at its marker (the blank line belongs to the paragraph before, §8);
    # EOS has the empty span at the end of the text
    in_final = [start >= final_start for start, _ in spans]
    on_verdict = [start < word_end and end > word_start for start, end in spans]
    return adv[1], in_final, on_verdict


def test_paragraph_credit_puts_the_final_advantage_on_every_final_token():
    adv, in_final, _ = credit("paragraph")
    evidence = {a for a, final in zip(adv, in_final) if not final}
    final = {a for a, final in zip(adv, in_final) if final}
    assert len(evidence) == 1 and len(final) == 1 and final.pop() < 0 < evidence.pop()
    assert sum(in_final) >= 3  # marker, verdict word, EOS: all punished


def test_verdict_credit_puts_the_final_advantage_on_the_verdict_word_only():
    adv, in_final, on_verdict = credit("verdict")
    assert any(on_verdict) and sum(in_final) > sum(on_verdict)  # the marker and EOS are final, not verdict
    evidence = [a for a, final in zip(adv, in_final) if not final]
    # the verdict word keeps the final paragraph's (negative) advantage; the marker and EOS take the
    # mean over the evidence tokens (one paragraph here: its advantage), so concluding is not punished
    assert all(a < 0 for a, verdict in zip(adv, on_verdict) if verdict)
    assert [a for a, verdict in zip(adv, on_verdict) if not verdict] == [evidence[0]] * on_verdict.count(False)
    assert adv[-1] == evidence[0] > 0  # EOS


# ---------------------------------------------------------------------- labels: PRPO never, GRPO as told

# two images of four samples: evidence paragraphs (so PRPO's rewards vary) and both verdicts
TEXTS = ["The skin shows natural pores.\n\n### Answer: real", "The skin shows natural pores.\n\n### Answer: fake",
         "Edges look warped and blurry.\n\n### Answer: fake", "### Answer: real",
         "Edges look warped and blurry.\n\n### Answer: real", "Lighting is natural.\n\n### Answer: real",
         "Lighting is natural.\n\n### Answer: fake", "no verdict at all"]
LABELINGS = {"given": ["real", "fake"], "flipped": ["fake", "real"], "none": [None, None]}


def rollouts(monkeypatch, algo: str, labels_mode: str = "gt", *sets: str) -> dict[str, rollout_mod.Rollout]:
    """The same scripted responses under each labelling of LABELINGS (same seed)."""
    monkeypatch.setattr(rollout_mod, "generate", scripted_generate(TEXTS))
    cfg = prpo_config(f"prpo.algo={algo}", f"prpo.labels={labels_mode}", "prpo.group_size=4", *sets)
    bundle = text_bundle(TEXTS)
    return {name: rollout_mod.rollout(bundle, [None, None], ["q", "q"], labels, cfg=cfg, clip=None,
                                      lexicon=load_lexicon(), seed=7)
            for name, labels in LABELINGS.items()}


def test_prpo_rewards_never_read_the_labels(monkeypatch):
    rolls = rollouts(monkeypatch, "prpo", labels_mode="gt")  # even with labels=gt
    given = rolls["given"]
    assert (given.advantages > 0).any() and (given.advantages < 0).any()  # a signal that could move
    reported = {"answer_accuracy", "pseudo_label_accuracy"}  # the labels' only use: reported
    for name in ("flipped", "none"):
        assert torch.equal(rolls[name].advantages, given.advantages), name
        assert {k: v for k, v in rolls[name].stats.items() if k not in reported} == \
               {k: v for k, v in given.stats.items() if k not in reported}, name


def test_grpo_with_ground_truth_rewards_the_answers_equal_to_the_label(monkeypatch):
    rolls = rollouts(monkeypatch, "grpo", labels_mode="gt")
    # image 1 is labelled "real": its real answers rise and the others fall; flipped labels, the reverse
    for name, sign in (("given", 1), ("flipped", -1)):
        per_answer = rolls[name].advantages[:, 0]
        assert (per_answer[[0, 3]] * sign > 0).all() and (per_answer[[1, 2]] * sign < 0).all(), name
        # image 2 ("fake" when given): its one fake answer rises, the real ones and the invalid one fall
        assert (per_answer[[6]] * sign > 0).all() and (per_answer[[4, 5]] * sign < 0).all(), name
        assert per_answer[7] < 0, name  # no verdict never matches the target
    assert not rolls["none"].advantages.any()  # gt without a label: no target, no reward


def test_grpo_with_majority_labels_rewards_the_majority_whatever_the_label(monkeypatch):
    rolls = rollouts(monkeypatch, "grpo", "majority", "prpo.majority_min_share=0.4")
    for name, roll in rolls.items():
        assert torch.equal(roll.advantages, rolls["given"].advantages), name
    per_answer = rolls["given"].advantages[:, 0]
    # image 2's majority is "real" (2 real, 1 fake, 1 invalid: 2 of 4 > 0.4), though its label is "fake"
    assert (per_answer[[4, 5]] > 0).all() and (per_answer[[6, 7]] < 0).all()
    # image 1 is a 2-2 tie: no majority, no signal
    assert not per_answer[:4].any()


def test_a_pseudo_label_needs_more_than_half_of_the_group_by_default(monkeypatch):
    roll = rollouts(monkeypatch, "grpo", "majority")["given"]  # prpo.majority_min_share=0.5
    # image 2's 2 real votes of 4 are no majority of the group: it teaches nothing
    assert not roll.advantages.any()
    assert roll.stats["zero_advantage_share"] == 1.0
