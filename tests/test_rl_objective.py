"""Advantages and the clipped surrogate, checked against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dxcli.rl.objective import (
    grpo_advantages,
    grpo_rewards,
    majority_answer,
    policy_loss,
    prpo_advantages,
    token_advantages,
)

EPS = 1e-4


# ------------------------------------------------------------------ advantages


def test_prpo_advantages_normalise_over_all_paragraphs_of_the_group() -> None:
    rewards = [[0.9, 0.5], [0.1]]
    # mean 0.5; deviations 0.4, 0, -0.4; population variance 0.32 / 3
    std = math.sqrt(0.32 / 3)
    expected = [[0.4 / (std + EPS), 0.0], [-0.4 / (std + EPS)]]
    got = prpo_advantages(rewards, eps=EPS)
    assert [len(r) for r in got] == [2, 1]
    for row, expected_row in zip(got, expected):
        assert row == pytest.approx(expected_row)


def test_equal_rewards_give_zero_advantages() -> None:
    assert prpo_advantages([[0.5, 0.5], [0.5]]) == [[0.0, 0.0], [0.0]]
    assert grpo_advantages([1.0, 1.0, 1.0]) == [0.0, 0.0, 0.0]
    assert prpo_advantages([]) == []


def test_grpo_advantages_and_rewards() -> None:
    rewards = grpo_rewards(["real", "fake", None, "real"], "real")
    assert rewards == [1.0, 0.0, 0.0, 1.0]
    # mean 0.5, population std 0.5
    unit = 0.5 / (0.5 + EPS)
    assert grpo_advantages(rewards, eps=EPS) == pytest.approx([unit, -unit, -unit, unit])
    assert grpo_rewards(["real", None], None) == [0.0, 0.0]


def test_majority_answer_ratio_and_ties() -> None:
    assert majority_answer(["real", "real", "fake", None]) == ("real", 0.5)
    assert majority_answer(["fake", "fake", "fake", "real"]) == ("fake", 0.75)
    assert majority_answer(["real", "fake", None, None]) == (None, 0.25)  # tie
    assert majority_answer([None, None]) == (None, 0.0)


def test_a_pseudo_label_needs_more_than_the_min_share_of_all_samples() -> None:
    # prpo.majority_min_share=0.5, G=4: one valid vote among invalid ones is no majority
    assert majority_answer(["real", None, None, None], 0.5) == (None, 0.25)
    assert majority_answer(["real", "real", "fake", None], 0.5) == (None, 0.5)
    assert majority_answer(["real", "real", "real", None], 0.5) == ("real", 0.75)
    assert majority_answer(["fake", "fake", None, None, None], 0.3) == ("fake", 0.4)


def test_token_advantages_take_their_paragraphs_value() -> None:
    assert token_advantages([0, 0, 1, 2, 2], [0.5, -1.0, 2.0]) == [0.5, 0.5, -1.0, 2.0, 2.0]


# ------------------------------------------------------------------ loss by hand


def _tokens(ratios: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    logp = torch.tensor([[math.log(r) - 1.0 for r in ratios]], requires_grad=True)
    old = torch.full((1, len(ratios)), -1.0)
    return logp, old


def test_clipped_surrogate_by_hand() -> None:
    logp, old = _tokens([1.5, 0.5, 1.1])
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    mask = torch.ones(1, 3)
    loss, stats = policy_loss(logp, old, adv, mask)
    # token 1: min(1.5, 1.2) = 1.2 (clipped); token 2: min(-0.5, -0.8) = -0.8 (clipped); token 3: 2.2
    assert loss.item() == pytest.approx(-(1.2 - 0.8 + 2.2) / 3, abs=1e-6)
    assert stats["clip_fraction"] == pytest.approx(2 / 3)
    assert stats["ratio_mean"] == pytest.approx((1.5 + 0.5 + 1.1) / 3, abs=1e-6)
    assert stats["kl"] == 0.0
    loss.backward()
    # clipped tokens carry no gradient; d(-r A / 3)/d logp = -r A / 3 for the free one
    assert logp.grad[0].tolist() == pytest.approx([0.0, 0.0, -1.1 * 2.0 / 3], abs=1e-6)


def test_asymmetric_clip_range() -> None:
    logp, old = _tokens([1.5, 0.5])
    adv = torch.tensor([[1.0, -1.0]])
    loss, _ = policy_loss(logp, old, adv, torch.ones(1, 2), eps_low=0.3, eps_high=0.28)
    assert loss.item() == pytest.approx(-(1.28 - 0.7) / 2, abs=1e-6)


def test_k3_kl_penalty_by_hand() -> None:
    logp, old = _tokens([1.0, 1.0])
    ref = logp.detach() + torch.tensor([[0.1, -0.2]])
    k3 = [math.exp(0.1) - 0.1 - 1, math.exp(-0.2) + 0.2 - 1]
    adv = torch.tensor([[1.0, 1.0]])
    loss, stats = policy_loss(logp, old, adv, torch.ones(1, 2), beta=0.5, ref_logp=ref)
    assert loss.item() == pytest.approx(-((1.0 - 0.5 * k3[0]) + (1.0 - 0.5 * k3[1])) / 2, abs=1e-6)
    assert stats["kl"] == pytest.approx(sum(k3) / 2, abs=1e-6)
    # beta 0 with a reference: KL reported, not in the loss
    loss0, stats0 = policy_loss(logp, old, adv, torch.ones(1, 2), ref_logp=ref)
    assert loss0.item() == pytest.approx(-1.0, abs=1e-6)
    assert stats0["kl"] == pytest.approx(sum(k3) / 2, abs=1e-6)
    with pytest.raises(ValueError):
        policy_loss(logp, old, adv, torch.ones(1, 2), beta=0.1)


def test_token_mean_and_sequence_mean_with_a_mask() -> None:
    logp = torch.zeros(2, 3)
    old = torch.zeros(2, 3)  # ratio 1: objective = advantage
    adv = torch.tensor([[1.0, 2.0, 3.0], [6.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    token_mean, _ = policy_loss(logp, old, adv, mask)
    seq_mean, _ = policy_loss(logp, old, adv, mask, agg="seq_mean")
    assert token_mean.item() == pytest.approx(-(1 + 2 + 3 + 6) / 4)
    assert seq_mean.item() == pytest.approx(-((1 + 2 + 3) / 3 + 6) / 2)
    # a sequence without tokens does not count in the sequence mean
    empty = torch.tensor([[1, 1, 1], [0, 0, 0]])
    assert policy_loss(logp, old, adv, empty, agg="seq_mean")[0].item() == pytest.approx(-2.0)
    with pytest.raises(ValueError):
        policy_loss(logp, old, adv, mask, agg="sum")


def test_one_advantage_per_sequence_broadcasts() -> None:
    logp = torch.zeros(2, 2)
    loss, _ = policy_loss(logp, logp, torch.tensor([1.0, -3.0]), torch.ones(2, 2))
    assert loss.item() == pytest.approx(-(1 + 1 - 3 - 3) / 4)


# ------------------------------------------------------------------ gradient direction


def _sequence_logp(model: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs of ids[:, 1:] given the prefix, [1, T-1]."""
    logits = model(input_ids=ids).logits[:, :-1]
    return torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_sgd_step_moves_the_sequence_probability_with_the_advantage(sign: float) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(config)
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 2]])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    logp = _sequence_logp(model, ids)
    before = logp.sum().item()
    adv = torch.full_like(logp, sign)
    loss, _ = policy_loss(logp, logp.detach(), adv, torch.ones_like(logp), beta=0.0)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = _sequence_logp(model, ids).sum().item()
    assert (after - before) * sign > 0


def test_positive_paragraph_gains_and_negative_paragraph_loses_probability() -> None:
    """A policy with free logits per position: one step on PRPO token advantages."""
    torch.manual_seed(0)
    logits = torch.nn.Parameter(torch.randn(6, 10))
    tokens = torch.tensor([3, 1, 4, 1, 5, 9])
    paragraph_ids = [0, 0, 0, 1, 1, 1]
    para_adv = prpo_advantages([[0.9, 0.1]])[0]  # paragraph 0 above the mean, paragraph 1 below
    adv = torch.tensor([token_advantages(paragraph_ids, para_adv)])

    def logp() -> torch.Tensor:
        return torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)[None]

    before = logp().detach()
    current = logp()
    loss, _ = policy_loss(current, current.detach(), adv, torch.ones(1, 6))
    loss.backward()
    torch.optim.SGD([logits], lr=0.5).step()
    change = (logp().detach() - before)[0]
    assert bool((change[:3] > 0).all()) and bool((change[3:] < 0).all())
