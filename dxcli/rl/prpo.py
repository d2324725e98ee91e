"""PRPO (and the GRPO baseline): one RL loop on DeepSpeed, read top to bottom.

Each step: a batch of images -> G samples per image from the CURRENT weights (one batched
generate; image features computed once and reused by all G samples and by the log-prob pass) ->
rewards (paragraph-level for PRPO, one scalar per response for GRPO) -> advantages -> log-probs
WITH the image -> clipped surrogate (+ k3 KL when beta > 0) -> one optimizer step.
With one PPO epoch the old log-probs equal the current ones, detached: no extra forward pass.
The vision tower, projector and binary head stay frozen; the LLM learns.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dxcli import config as cfgmod
from dxcli.answer import parse_answer
from dxcli.training import runtime



@dataclass
class PrpoJob:
    run_dir: str
    records: str  # prompts: records JSONL (labels optional)
    images: str
    model: str  # the SFT checkpoint to start from
    resume: bool = False


@dataclass
class Rollout:
    """Everything one step learns from, for B images x G samples (rows grouped by image)."""

    prompt_ids: Any  # [B*G, P] left-padded
    prompt_mask: Any
    image_features: Any  # [B*G, N, d], detached
    completion_ids: Any  # [B*G, T] right-padded
    completion_mask: Any
    advantages: Any  # [B*G, T] per token
    stats: dict[str, float]


# ---------------------------------------------------------------------- rewards


def prpo_token_advantages(token_ids: list[list[int]], tokenizer, *, images: list, G: int, clip, lexicon,
                          cfg: cfgmod.PrpoConfig) -> tuple[list[list[float]], list[dict[str, float]]]:
    """Paragraph rewards -> advantages normalised per image -> one advantage per generated token.

    VCR for every paragraph of the step comes from one batched CLIP text pass.
    """
    from dxcli.rl.objective import prpo_advantages, token_advantages
    from dxcli.rl.paragraphs import split_paragraphs, token_char_spans, token_paragraph_ids
    from dxcli.rl.rewards import paragraph_rewards, score_response

    decoded = [token_char_spans(tokenizer, ids) for ids in token_ids]  # exact text + span of every id
    owners = [token_paragraph_ids(split_paragraphs(text), spans, len(spans), text) for text, spans in decoded]
    scores = [score_response(text, lexicon=lexicon, keywords=clip is not None) for text, _ in decoded]
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
        if vcr:
            row["vcr"] = mean([v for vs in vcr[i] for v in vs])
        stats.append(row)
    return token_adv, stats


def verdict_only_credit(advantages: list[float], owners: list[int], decoded: tuple[str, list[tuple[int, int]]],
                        final: int) -> list[float]:
    """The final paragraph's advantage stays on the verdict word's tokens only; its other tokens
    (marker, EOS) take the mean advantage of the response's other paragraphs, so a wrong verdict
    does not teach the policy to avoid concluding at all."""
    from dxcli.answer import ANSWER_RE

    text, spans = decoded
    match = None
    for match in ANSWER_RE.finditer(text):
        pass
    if match is None:
        return advantages
    word_start, word_end = match.span(1)
    others = [a for a, o in zip(advantages, owners) if o != final]
    fill = mean(others)
    return [a if o != final or (start < word_end and end > word_start) else fill
            for a, o, (start, end) in zip(advantages, owners, spans)]


def grpo_token_advantages(answers: list[str | None], targets: list[str | None], token_ids: list[list[int]],
                          G: int, eps: float) -> tuple[list[list[float]], list[dict[str, float]]]:
    """One reward per response (answer == target), normalised over its G siblings, on every token."""
    from dxcli.rl.objective import grpo_advantages, grpo_rewards

    token_adv, stats = [], []
    for i, target in enumerate(targets):
        rows = slice(i * G, (i + 1) * G)
        rewards = grpo_rewards(answers[rows], target)
        token_adv += [[adv] * len(ids) for adv, ids in zip(grpo_advantages(rewards, eps=eps), token_ids[rows])]
        stats.append({"reward": mean(rewards)})
    return token_adv, stats


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


# ---------------------------------------------------------------------- one step


def rollout(bundle, images, questions, labels, *, cfg: cfgmod.PrpoConfig, clip, lexicon, seed: int) -> Rollout:
    import torch

    from dxcli.evaluation.generate import generate
    from dxcli.rl.objective import majority_answer

    model, tokenizer, G = bundle.model, bundle.tokenizer, cfg.group_size
    model.eval()
    gen = generate(bundle, images, questions, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                   top_p=cfg.top_p, samples_per_image=G, seed=seed)
    answers = [parse_answer(t) for t in gen.texts]
    majorities = [majority_answer(answers[i * G:(i + 1) * G]) for i in range(len(images))]
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
    stats = {key: mean([s[key] for s in group_stats if key in s]) for key in group_stats[0]}
    stats.update(
        response_tokens=mean([len(ids) for ids in gen.token_ids]),
        invalid_rate=mean([float(a is None) for a in answers]),
        majority_ratio=mean([ratio for _, ratio in majorities]),
    )
    known = [i for i, label in enumerate(labels) if label is not None]
    if known:
        stats["pseudo_label_accuracy"] = mean([float(majorities[i][0] == labels[i]) for i in known])
        stats["answer_accuracy"] = mean([float(answers[i * G + g] == labels[i]) for i in known for g in range(G)])
    expand = lambda x: x.repeat_interleave(G, dim=0)  # noqa: E731
    return Rollout(expand(gen.prompt_ids), expand(gen.prompt_mask), expand(gen.image_features).detach(),
                   completion, completion_mask, advantages, stats)


def completion_logprobs(model, roll: Rollout, rows: slice, device) -> tuple[Any, Any]:
    """Per-token log-probs of the completions (with the image) and the token entropy, for `rows`."""
    import torch

    prompt_ids, prompt_mask = roll.prompt_ids[rows].to(device), roll.prompt_mask[rows].to(device)
    comp_ids, comp_mask = roll.completion_ids[rows].to(device), roll.completion_mask[rows].to(device)
    embeds = model.prompt_embeds(torch.cat([prompt_ids, comp_ids], 1), torch.cat([prompt_mask, comp_mask], 1),
                                 image_features=roll.image_features[rows].to(device))
    mask = torch.cat([prompt_mask, comp_mask], 1)
    width = comp_ids.shape[1]
    # only the positions that predict completion tokens (position t predicts token t+1)
    logits = model(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=width + 1).logits
    logits = logits[:, :-1].float()
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, comp_ids.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


# ---------------------------------------------------------------------- the loop


def run(job: PrpoJob) -> Path:
    import deepspeed
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from dxcli.data.records import load_records
    from dxcli.model import load_checkpoint
    from dxcli.rl.objective import policy_loss
    from dxcli.rl.rewards import ClipScorer, load_lexicon
    from dxcli.training.sft_data import ResumableShardSampler, load_rgb

    # ------------------------------------------------------------------ setup
    run_dir = Path(job.run_dir)
    cfg = cfgmod.load(run_dir / "config.yaml")
    p, hw = cfg.prpo, cfg.hardware
    dist = runtime.init_distributed()
    runtime.seed_everything(cfg.train.seed + dist.rank)  # ranks must sample different rollouts
    runtime.set_threads(cfg.hardware.threads)
    dtype = runtime.torch_dtype(hw.precision)
    bundle = load_checkpoint(job.model)
    model = bundle.model
    model.freeze(vision=True, llm=False, projector=True, head=True)  # True = frozen
    if cfg.train.grad_checkpointing:
        model.gradient_checkpointing_enable()
    reference = None
    if p.beta > 0:  # only then is a reference model needed
        reference = load_checkpoint(job.model, dtype=dtype).model.to(runtime.device()).eval()
        reference.requires_grad_(False)
    clip = ClipScorer.load(p.clip, runtime.device()) if (p.algo == "prpo" and p.clip) else None
    lexicon = load_lexicon(Path(p.lexicon) if p.lexicon else None)
    records = load_records(Path(job.records))
    G = p.group_size
    sequences = p.images_per_step * G
    chunks = max(1, math.ceil(sequences / hw.micro_batch))  # policy update in micro-batches of sequences
    sampler = ResumableShardSampler(len(records), dist.rank, dist.world, cfg.train.seed)
    per_epoch = max(1, len(sampler.shard(0)) // p.images_per_step)
    epochs = p.epochs if p.epochs is not None else cfg.train.epochs
    total_steps = max(1, math.ceil(epochs * per_epoch))
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    ds_config = runtime.deepspeed_config(cfg, lr=p.lr)
    ds_config.update(train_micro_batch_size_per_gpu=math.ceil(sequences / chunks), gradient_accumulation_steps=chunks,
                     train_batch_size=math.ceil(sequences / chunks) * chunks * dist.world)
    trainable = [q for q in model.parameters() if q.requires_grad]
    warmup = int(cfg.train.warmup_ratio * total_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=trainable, config=ds_config,
        lr_scheduler=lambda opt: get_cosine_schedule_with_warmup(opt, warmup, total_steps))
    bundle.model = engine.module
    log = runtime.MetricsLog(run_dir / "metrics.jsonl", dist.main)
    ckpt_dir = run_dir / "checkpoints"
    if dist.main:
        print(f"[prpo] algo={p.algo} labels={p.labels} G={G} images/step/rank={p.images_per_step} "
              f"VCR={'on' if clip else 'off'} beta={p.beta}; {len(records)} prompts; {total_steps} steps", flush=True)

    # ------------------------------------------------------------------ resume
    step, epoch, position = 0, 0, 0
    client = runtime.load_training_state(engine, ckpt_dir) if job.resume else None
    if client:
        step, epoch, position = client["step"], client["epoch"], client["position"]

    # ------------------------------------------------------------------ train
    progress = runtime.ProgressView(total_steps, f"{p.algo}", dist.main, start=step)
    stop_after = runtime.stop_after_step()
    images_root = Path(job.images)
    while step < total_steps:
        sampler.set_position(epoch, 0)
        order = sampler.shard(epoch)
        if position + p.images_per_step > len(order):
            epoch, position = epoch + 1, 0
            continue
        started = time.time()
        batch = [records[i] for i in order[position:position + p.images_per_step]]
        position += p.images_per_step
        images = [load_rgb(images_root / r.image) for r in batch]
        labels = [("fake" if r.binary_label else "real") if r.binary_label is not None else None for r in batch]
        roll = rollout(bundle, images, [r.question for r in batch], labels, cfg=p, clip=clip, lexicon=lexicon,
                       seed=cfg.train.seed * 100_003 + step * dist.world + dist.rank)
        engine.train()
        total_tokens = roll.completion_mask.sum().clamp(min=1)
        per_chunk = math.ceil(sequences / chunks)
        sums = {"kl": 0.0, "clip_fraction": 0.0, "entropy": 0.0, "loss": 0.0}
        for c in range(chunks):
            rows = slice(c * per_chunk, (c + 1) * per_chunk)
            logp, entropy = completion_logprobs(engine, roll, rows, engine.device)
            mask = roll.completion_mask[rows].to(engine.device).float()
            ref_logp = None
            if reference is not None:
                with torch.no_grad():
                    ref_logp, _ = completion_logprobs(reference, roll, rows, engine.device)
            loss, info = policy_loss(logp, logp.detach(), roll.advantages[rows].to(engine.device), mask,
                                     eps_low=p.eps_low, eps_high=p.eps_high, beta=p.beta, ref_logp=ref_logp,
                                     agg=p.loss_agg)
            # each chunk's mean is reweighted so the step optimises the mean over the whole batch;
            # DeepSpeed divides by the accumulation steps, which `chunks` undoes.
            weight = (mask.sum() / total_tokens).item() if p.loss_agg == "token_mean" else (
                mask.shape[0] / sequences)
            engine.backward(loss * weight * chunks)
            engine.step()
            share = mask.sum().item() / total_tokens.item()
            sums["loss"] += loss.item() * weight
            sums["kl"] += float(info.get("kl", 0.0)) * share
            sums["clip_fraction"] += float(info.get("clip_fraction", 0.0)) * share
            sums["entropy"] += ((entropy * mask).sum() / total_tokens.to(engine.device)).item()
        step += 1
        row = {"step": step, "epoch": epoch + position / max(len(order), 1), **roll.stats, **sums,
               "lr": scheduler.get_last_lr()[0], "seconds": time.time() - started}
        row = reduce_across_ranks(row, dist.world)
        if step % cfg.train.log_every == 0 or step == total_steps:
            log.write(row)
        progress.update(step, {k: row[k] for k in ("reward", "invalid_rate", "response_tokens", "kl") if k in row})
        if (cfg.train.save_every and step % cfg.train.save_every == 0) or step == stop_after:
            runtime.save_training_state(engine, ckpt_dir, step, {"epoch": epoch, "position": position},
                                        cfg.train.keep_checkpoints)
        if step == stop_after:
            progress.close()
            raise SystemExit(f"[prpo] stopped after step {step} ({runtime.STOP_AFTER_ENV})")
    progress.close()
    runtime.save_training_state(engine, ckpt_dir, step, {"epoch": epoch, "position": position},
                                cfg.train.keep_checkpoints)

    # ------------------------------------------------------------------ save
    out_dir = run_dir / "model"
    runtime.save_final_model(engine, bundle, out_dir, hw.zero_stage)
    if dist.main:
        print(f"[prpo] saved {out_dir}", flush=True)
    return out_dir


def reduce_across_ranks(row: dict[str, Any], world: int) -> dict[str, Any]:
    """Mean of every float metric over ranks (each rank saw its own images)."""
    if world == 1:
        return row
    import torch

    keys = sorted(k for k, v in row.items() if isinstance(v, float))
    values = torch.tensor([row[k] for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(values)
    return {**row, **{k: v / world for k, v in zip(keys, values.tolist())}}
