"""PRPO / GRPO advantages and the token-level clipped surrogate loss (METHOD.md §11-§13).

Advantages use the population standard deviation (divide by N, not N - 1):
`A = (R - mean) / (std + eps)` over all paragraphs of the G responses of one image (PRPO) or over
the G scalar rewards (GRPO). All-equal rewards give zero advantages.
"""

from __future__ import annotations

import statistics
from collections import Counter

import torch

from dxcli.rl.rewards import majority_label

AGGREGATIONS = ("token_mean", "seq_mean")


def _normalise(values: list[float], eps: float) -> list[float]:
    if not values:
        return []
    if max(values) == min(values):  # exactly 0, not rounding noise over eps: "no signal" must be exact
        return [0.0] * len(values)
    mean = statistics.fmean(values)
    std = statistics.pstdev(values, mu=mean)
    return [(v - mean) / (std + eps) for v in values]


def prpo_advantages(rewards_per_response: list[list[float]], eps: float = 1e-4) -> list[list[float]]:
    """Paragraph advantages, normalised over every paragraph of the G responses of one image."""
    flat = _normalise([r for rewards in rewards_per_response for r in rewards], eps)
    result, cursor = [], 0
    for rewards in rewards_per_response:
        result.append(flat[cursor : cursor + len(rewards)])
        cursor += len(rewards)
    return result


def grpo_advantages(rewards: list[float], eps: float = 1e-4) -> list[float]:
    """One advantage per response, normalised over the G responses of one image."""
    return _normalise(list(rewards), eps)


def grpo_rewards(answers: list[str | None], target: str | None) -> list[float]:
    """1 for an answer equal to the target (ground truth or majority), else 0 (None never wins)."""
    return [1.0 if target is not None and answer == target else 0.0 for answer in answers]


def majority_answer(answers: list[str | None], min_share: float = 0.0) -> tuple[str | None, float]:
    """(majority answer, share of the G answers that gave the top answer).

    Invalid answers (None) never win but count in the share's denominator. A tie gives None with
    the tied share (e.g. 4 real / 4 fake -> (None, 0.5)); no valid answer gives (None, 0.0). The
    top answer is a pseudo-label only when its share is above `min_share` (prpo.majority_min_share,
    METHOD.md §12): with 0.5 and G=4, [real, None, None, None] and [real, real, fake, None] give
    None, since one or two votes out of four are no majority of the group.
    """
    counts = Counter(answer for answer in answers if answer is not None)
    if not counts:
        return None, 0.0
    share = counts.most_common(1)[0][1] / len(answers)
    return (majority_label(list(answers)) if share > min_share else None), share


def token_advantages(paragraph_ids: list[int], para_adv: list[float]) -> list[float]:
    """Each token takes its paragraph's advantage."""
    return [para_adv[index] for index in paragraph_ids]


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    agg: str = "token_mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss to minimise: -(clipped surrogate - beta * k3 KL), aggregated over masked tokens.

    Shapes [B, T] (advantages may be [B] for one value per sequence). Per token:
    `r = exp(logp - old_logp)`, objective `min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)
    - beta * (exp(ref - logp) - (ref - logp) - 1)`. `agg="token_mean"` averages over all masked
    tokens of the batch; "seq_mean" averages within each sequence, then over sequences that have
    tokens. Stats: kl (token mean of k3, 0 without `ref_logp`), clip_fraction (share of tokens
    where the clipped term is the one taken), ratio_mean.
    """
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1).expand_as(logp)
    mask = mask.to(logp.dtype)
    advantages = advantages.to(logp.dtype)

    ratio = torch.exp(logp - old_logp.detach())
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    objective = torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        delta = ref_logp.detach() - logp
        kl = torch.exp(delta) - delta - 1.0
        if beta > 0:
            objective = objective - beta * kl

    loss = -_aggregate(objective, mask, agg)
    with torch.no_grad():
        stats = {
            "kl": _aggregate(kl, mask, "token_mean").item(),
            "clip_fraction": _aggregate((clipped < unclipped).to(logp.dtype), mask, "token_mean").item(),
            "ratio_mean": _aggregate(ratio, mask, "token_mean").item(),
        }
    return loss, stats


def _aggregate(values: torch.Tensor, mask: torch.Tensor, agg: str) -> torch.Tensor:
    if agg == "token_mean":
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    per_sequence = mask.sum(-1)
    means = (values * mask).sum(-1) / per_sequence.clamp(min=1.0)
    has_tokens = (per_sequence > 0).to(values.dtype)
    return (means * has_tokens).sum() / has_tokens.sum().clamp(min=1.0)
