"""Where the PRPO and GRPO advantages are computed: rewards of one rollout -> advantages
normalised per image -> one advantage per generated token (METHOD.md §11-§12).

Pure functions of token ids, texts and reward settings: no model, no DeepSpeed.
"""

from __future__ import annotations

from dxcli.base.answer import verdict_span
from dxcli.config import PrpoConfig
from dxcli.rl.objective import grpo_advantages, grpo_rewards, prpo_advantages, token_advantages
from dxcli.rl.paragraphs import split_paragraphs, token_char_spans, token_paragraph_ids
from dxcli.rl.rewards import paragraph_rewards, score_response


def prpo_token_advantages(token_ids: list[list[int]], tokenizer, *, images: list, G: int, clip, lexicon,
                          cfg: PrpoConfig) -> tuple[list[list[float]], list[dict[str, float]]]:
    """Paragraph rewards -> advantages normalised per image -> one advantage per generated token.

    VCR for every paragraph of the step comes from one batched CLIP text pass.
    """
    decoded = [token_char_spans(tokenizer, ids) for ids in token_ids]  # exact text + span of every id
    owners = [token_paragraph_ids(split_paragraphs(text), spans, len(spans), text) for text, spans in decoded]
    scores = [score_response(text, lexicon=lexicon, keywords=clip is not None, no_majority=cfg.pcr_no_majority)
              for text, _ in decoded]
    groups = [scores[i * G:(i + 1) * G] for i in range(len(images))]
    vcr = clip.group_vcr(clip.image_embeddings(images), groups) if clip is not None else None
    token_adv, stats = [], []
    for i, group in enumerate(groups):
        rewards = paragraph_rewards(group, vcr[i] if vcr else None, a=cfg.vcr_weight, b=cfg.pcr_weight)
        for j, adv in enumerate(prpo_advantages(rewards, eps=cfg.adv_eps)):
            n = i * G + j
            per_token = token_advantages(owners[n], adv)
            if cfg.final_credit == "verdict":
                per_token = verdict_only_credit(per_token, owners[n], decoded[n], group[j].final_index)
            token_adv.append(per_token)
        row = {"reward": mean([r for rs in rewards for r in rs]),
               "pcr": mean([p for s in group for p in s.pcr]),
               "final_pcr": mean([s.pcr[s.final_index] if s.pcr else 0.0 for s in group]),
               "paragraphs": mean([len(s.paragraphs) for s in group])}
        if vcr is not None:
            row["vcr"] = mean([v for vs in vcr[i] for v in vs])
        stats.append(row)
    return token_adv, stats


def reward_stat_keys(algo: str, vcr: bool) -> tuple[str, ...]:
    """The per-image statistics `prpo_token_advantages` / `grpo_token_advantages` report: the same
    keys for every image of every rank, decided by the config alone (`vcr`: a CLIP is loaded;
    GRPO's single reward ignores it)."""
    if algo == "grpo":
        return ("reward",)
    return ("reward", "pcr", "final_pcr", "paragraphs") + (("vcr",) if vcr else ())


def verdict_only_credit(advantages: list[float], owners: list[int], decoded: tuple[str, list[tuple[int, int]]],
                        final: int) -> list[float]:
    """The final paragraph's advantage stays on the verdict word's tokens only; its other tokens
    (marker, EOS) take the mean advantage of the response's tokens outside the final paragraph,
    so a wrong verdict does not teach the policy to avoid concluding at all."""
    text, spans = decoded
    word = verdict_span(text)
    if word is None:
        return advantages
    word_start, word_end = word
    others = [a for a, o in zip(advantages, owners) if o != final]
    fill = mean(others)
    return [a if o != final or (start < word_end and end > word_start) else fill
            for a, o, (start, end) in zip(advantages, owners, spans)]


def grpo_token_advantages(answers: list[str | None], targets: list[str | None], token_ids: list[list[int]],
                          G: int, eps: float) -> tuple[list[list[float]], list[dict[str, float]]]:
    """One reward per response (answer == target), normalised over its G siblings, on every token."""
    token_adv, stats = [], []
    for i, target in enumerate(targets):
        rows = slice(i * G, (i + 1) * G)
        rewards = grpo_rewards(answers[rows], target)
        token_adv += [[adv] * len(ids) for adv, ids in zip(grpo_advantages(rewards, eps=eps), token_ids[rows])]
        stats.append({"reward": mean(rewards)})
    return token_adv, stats


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
