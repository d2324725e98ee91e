"""One RL rollout: G samples per image from the current weights (the one `generate`), their
rewards and per-token advantages, and the log-probs of those samples under a model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dxcli.base.answer import parse_answer
from dxcli.config import PrpoConfig
from dxcli.model.generate import generate, position_ids_from_mask
from dxcli.model.kernels import fused_completion_logprobs
from dxcli.rl.advantages import grpo_token_advantages, mean, prpo_token_advantages, reward_stat_keys
from dxcli.rl.objective import majority_answer
from dxcli.runtime.dist import Ratio

# what every rollout reports besides its reward statistics (all ranks, every step)
ROLLOUT_MEANS = ("response_tokens", "invalid_rate", "majority_ratio", "zero_advantage_share")
# accuracies against the labels, when known: only over the labelled images, so a rank (or a whole
# step) may have none; they are Ratios (hits, labelled) and reduced as such (runtime.dist)
LABEL_RATIOS = ("pseudo_label_accuracy", "answer_accuracy")


def rollout_stat_keys(cfg: PrpoConfig, vcr: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(mean keys, ratio keys) of `Rollout.stats`, fixed by the config (`vcr`: a CLIP is loaded)."""
    return reward_stat_keys(cfg.algo, vcr) + ROLLOUT_MEANS, LABEL_RATIOS


@dataclass
class Rollout:
    """Everything one step learns from, for B images x G samples (rows grouped by image)."""

    prompt_ids: Any  # [B*G, P] left-padded
    prompt_mask: Any
    image_features: Any  # [B*G, N, d], detached
    completion_ids: Any  # [B*G, T] right-padded
    completion_mask: Any
    advantages: Any  # [B*G, T] per token
    stats: dict[str, float | Ratio]  # keys: `rollout_stat_keys`
    texts: list[str]  # the B*G decoded responses, grouped by image (prpo.save_rollouts keeps them)


def rollout(bundle, images, questions, labels, *, cfg: PrpoConfig, clip, lexicon, seed: int,
            compiled: bool = False) -> Rollout:
    """`compiled`: hardware.compiled_decode (a hardware key, so the caller passes it beside the prpo section)."""
    model, tokenizer, G = bundle.model, bundle.tokenizer, cfg.group_size
    model.eval()
    gen = generate(bundle, images, questions, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                   top_p=cfg.top_p, samples_per_image=G, seed=seed, compiled=compiled)
    answers = [parse_answer(t) for t in gen.texts]
    majorities = [majority_answer(answers[i * G:(i + 1) * G], cfg.majority_min_share) for i in range(len(images))]
    if cfg.algo == "grpo":
        targets = [labels[i] if cfg.labels == "gt" else majorities[i][0] for i in range(len(images))]
        token_adv, group_stats = grpo_token_advantages(answers, targets, gen.token_ids, G, cfg.adv_eps)
    else:  # PRPO's rewards need no label: labels, when known, are only reported
        token_adv, group_stats = prpo_token_advantages(gen.token_ids, tokenizer, images=images, G=G, clip=clip,
                                                       lexicon=lexicon, cfg=cfg)
    width = max(1, max(len(ids) for ids in gen.token_ids))
    n = len(gen.token_ids)
    completion = torch.full((n, width), tokenizer.pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros((n, width), dtype=torch.long)
    advantages = torch.zeros((n, width))
    for row, (ids, adv) in enumerate(zip(gen.token_ids, token_adv)):
        completion[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        completion_mask[row, :len(ids)] = 1
        advantages[row, :len(ids)] = torch.tensor(adv[:len(ids)])
    # every image reports every key: a key missing from one group is a bug, not a shorter mean
    stats: dict[str, float | Ratio] = {key: mean([s[key] for s in group_stats])
                                       for key in reward_stat_keys(cfg.algo, clip is not None)}
    stats.update(
        response_tokens=mean([len(ids) for ids in gen.token_ids]),
        invalid_rate=mean([float(a is None) for a in answers]),
        majority_ratio=mean([ratio for _, ratio in majorities]),
        # rollouts that teach nothing: every token's advantage is 0 (equal rewards within the group)
        zero_advantage_share=1.0 - (advantages != 0).any(dim=1).float().mean().item(),
        **label_accuracy(answers, majorities, labels, G),
    )
    expand = lambda x: x.repeat_interleave(G, dim=0)  # noqa: E731
    return Rollout(expand(gen.prompt_ids), expand(gen.prompt_mask), expand(gen.image_features).detach(),
                   completion, completion_mask, advantages, stats, gen.texts)


def label_accuracy(answers: list[str | None], majorities: list[tuple[str | None, float]],
                   labels: list[str | None], G: int) -> dict[str, Ratio]:
    """How often the majority (per image) and the answers (per response) equal the known labels;
    reported, never rewarded. Ratio(0, 0) when no image of this batch is labelled."""
    known = [i for i, label in enumerate(labels) if label is not None]
    pseudo_hits = sum(majorities[i][0] == labels[i] for i in known)
    answer_hits = sum(answers[i * G + g] == labels[i] for i in known for g in range(G))
    return {"pseudo_label_accuracy": Ratio(float(pseudo_hits), float(len(known))),
            "answer_accuracy": Ratio(float(answer_hits), float(len(known) * G))}


def completion_logprobs(model, roll: Rollout, rows: slice, device, kernels: str = "none") -> tuple[Any, Any]:
    """Per-token log-probs of the completions (with the image) and the token entropy, for `rows`.

    `model` is a DeepSpeed engine or a plain model. The embeddings are built by `prompt_embeds`
    outside the engine's forward: under ZeRO-3 the embedding layer's own partition hooks gather
    its weight for that call and its backward, so the gradient reaches the embeddings as in a
    plain forward (tests/test_prpo_zero3.py checks ZeRO-3 against ZeRO-2).
    `kernels` (hardware.kernels) other than "none": the model's fused head (dxcli.model.kernels)
    scores the tokens from the hidden states and the entropy comes in vocabulary chunks; the
    model must have been through `apply_kernels`.
    """
    prompt_ids, prompt_mask = roll.prompt_ids[rows].to(device), roll.prompt_mask[rows].to(device)
    comp_ids, comp_mask = roll.completion_ids[rows].to(device), roll.completion_mask[rows].to(device)
    mask = torch.cat([prompt_mask, comp_mask], 1)
    embeds = model.prompt_embeds(torch.cat([prompt_ids, comp_ids], 1), mask,
                                 image_features=roll.image_features[rows].to(device))
    width = comp_ids.shape[1]
    if kernels != "none":  # the same sequence and positions, scored without B x T x V logits
        return fused_completion_logprobs(model, embeds, mask, position_ids_from_mask(mask), comp_ids)
    # only the positions that predict completion tokens (position t predicts token t+1); positions
    # skip the left padding exactly as in `generate`, so both passes score the same sequence
    logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                   logits_to_keep=width + 1).logits
    logits = logits[:, :-1].float()
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, comp_ids.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy
