"""Train a small CLIP from scratch on a hard-demo data folder, for VCR (`--clip FOLDER`).

Run: python tests/bench/train_demo_clip.py --data DATA --held-out D --out FOLDER
     [--max-seconds 240] [--epochs 40] [--width 128] [--vision-layers 3] [--text-layers 2] [--seed 0]

Offline there are no pretrained CLIP weights, so VCR (METHOD.md §10) has had nothing to score with.
This trains a random-init transformers `CLIPModel` on the TRAIN split of every domain of DATA but
the held-out one, from (image, text) pairs:

- (image, the keyword of each non-final paragraph of its reasoning), the keyword as dx computes it
  (`dxcli.rl.rewards.keyword`: YAKE's top phrase, lowercased);
- (image, its verdict word "real" / "fake"), from the folder label: the final paragraph's keyword.

Loss: CLIP's symmetric contrastive loss over the batch's distinct texts, with several positives
per image (every keyword of its reasoning and its verdict word; the target is uniform over them),
plus a two-way image-to-{"real", "fake"} cross-entropy on the same similarities, since the verdict
word is the final paragraph's keyword and so the image verdict signal VCR carries.

Tokenizer: a byte-level BPE trained on the training reasoning. Model, tokenizer and image
processor are saved together in --out, the layout `ClipScorer.load` / `--set prpo.clip=FOLDER`
reads. At the end the saved folder is loaded back through dx's scorer and the AUC of
cos(img, "fake") - cos(img, "real") against the labels is printed for the held-out domain's test
images and for the training domains' val and test images (a verdict-signal check, not selection:
the last epoch is saved).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

DOMAINS_HARD = ("gan", "diffusion", "banding", "resample")
VERDICTS = ("real", "fake")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="hard-demo data folder (reasoning.jsonl + DOMAIN/SPLIT/LABEL/*.png)")
    parser.add_argument("--held-out", required=True, help="the domain left out of training (evaluated on its test split)")
    parser.add_argument("--out", type=Path, required=True, help="folder for model + tokenizer + image processor")
    parser.add_argument("--max-seconds", type=float, default=240.0, help="stop after the epoch that passes this")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch", type=int, default=64, help="images per step")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--width", type=int, default=128, help="hidden size of both towers")
    parser.add_argument("--vision-layers", type=int, default=3)
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--patch", type=int, default=8, help="ViT patch size (the images stay at their 96 px)")
    parser.add_argument("--projection", type=int, default=64, help="projection_dim")
    parser.add_argument("--vocab", type=int, default=600, help="BPE vocabulary size")
    parser.add_argument("--verdict-weight", type=float, default=1.0, help="weight of the real/fake cross-entropy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def load_pairs(data: Path, domains: list[str], split: str, with_keywords: bool) -> list[dict]:
    """One entry per image of `split` in `domains`: path, label, positive texts."""
    from dxcli.rl.rewards import keyword, split_paragraphs

    reasoning = {}
    for line in (data / "reasoning.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            reasoning[row["image"]] = row["reasoning"]
    items = []
    for domain in domains:
        for label in VERDICTS:
            for path in sorted((data / domain / split / label).glob("*.png")):
                texts = []
                if with_keywords:
                    text = reasoning.get(f"{domain}/{split}/{label}/{path.name}", "")
                    texts = [keyword(p, None) for p in split_paragraphs(text) if not p.is_final and p.text.strip()]
                positives = list(dict.fromkeys([t for t in texts if t] + [label]))
                items.append({"path": path, "label": label, "domain": domain, "texts": positives,
                              "reasoning": reasoning.get(f"{domain}/{split}/{label}/{path.name}", "")})
    return items


def build_tokenizer(corpus: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<|startoftext|>", "<|endoftext|>", "<pad>"]
    tok.train_from_iterator([c.lower() for c in corpus],
                            trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos, eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<pad>", unk_token="<unk>")


def build_model(args: argparse.Namespace, tokenizer, image_size: int):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    heads = max(2, args.width // 64)
    tower = dict(hidden_size=args.width, intermediate_size=4 * args.width, num_attention_heads=heads)
    config = CLIPConfig(
        text_config=dict(tower, num_hidden_layers=args.text_layers, vocab_size=len(tokenizer),
                         max_position_embeddings=32, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(tower, num_hidden_layers=args.vision_layers, image_size=image_size,
                           patch_size=args.patch),
        projection_dim=args.projection,
    )
    processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    return CLIPModel(config), processor


def auc(scores: list[float], labels: list[int]) -> float | None:
    """Probability a random positive outscores a random negative (ties count half)."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def verdict_auc(scorer, items: list[dict]) -> float | None:
    from PIL import Image

    images = [Image.open(item["path"]) for item in items]
    img = scorer.image_embeddings(images)
    txt = scorer.text_embeddings(list(VERDICTS))
    sims = img @ txt.T
    return auc((sims[:, 1] - sims[:, 0]).tolist(), [item["label"] == "fake" for item in items])


@dataclass
class Training:
    """Everything the epochs read: the model, its inputs, and which texts each image matches."""

    model: Any
    tokenizer: Any
    processor: Any
    pixels: Any  # [n, 3, H, W]
    tokens: Any  # every distinct text, tokenized once
    verdict_ids: Any  # the text indices of "real", "fake"
    labels: Any  # [n] index into VERDICTS
    positives: list[list[int]]  # per image, the text indices it pairs with


def prepare(args: argparse.Namespace, train_domains: list[str]) -> Training:
    import torch
    from PIL import Image

    started = time.time()
    train = load_pairs(args.data, train_domains, "train", with_keywords=True)
    texts = sorted({t for item in train for t in item["texts"]})
    print(f"train: {len(train)} images of {train_domains}, {len(texts)} distinct texts "
          f"({sum(len(i['texts']) for i in train)} pairs); keywords in {time.time() - started:.1f} s", flush=True)
    tokenizer = build_tokenizer([item["reasoning"] for item in train] + list(VERDICTS) * 20 + texts, args.vocab)
    size = Image.open(train[0]["path"]).size[0]
    model, processor = build_model(args, tokenizer, size)
    text_index = {t: k for k, t in enumerate(texts)}
    n_params = sum(p.numel() for p in model.parameters())
    print(f"CLIPModel {n_params / 1e6:.2f} M parameters, images {size} px, patch {args.patch}, width {args.width}, "
          f"vision {args.vision_layers} / text {args.text_layers} layers", flush=True)
    return Training(
        model, tokenizer, processor,
        pixels=processor(images=[Image.open(i["path"]).convert("RGB") for i in train],
                         return_tensors="pt")["pixel_values"],
        tokens=tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt"),
        verdict_ids=torch.tensor([text_index[v] for v in VERDICTS]),
        labels=torch.tensor([VERDICTS.index(i["label"]) for i in train]),
        positives=[[text_index[t] for t in i["texts"]] for i in train])


def batch_loss(data: Training, idx: Any, verdict_weight: float) -> tuple[Any, Any, int]:
    """Multi-positive contrastive loss (both directions) over the texts the batch uses, plus a
    real/fake cross-entropy on the verdict texts; returns (loss, verdict loss, verdicts right)."""
    import torch
    import torch.nn.functional as F

    from dxcli.rl.clip import _unit  # transformers 5 returns output objects

    model = data.model
    pixels = data.pixels[idx]
    flip = torch.rand(len(idx)) < 0.5  # horizontal flips: the demo artifacts have no left/right
    pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
    used = sorted({k for i in idx.tolist() for k in data.positives[i]} | set(data.verdict_ids.tolist()))
    col = {k: c for c, k in enumerate(used)}
    target = torch.zeros(len(idx), len(used))
    for r, i in enumerate(idx.tolist()):
        for k in data.positives[i]:
            target[r, col[k]] = 1.0
    img = _unit(model.get_image_features(pixel_values=pixels))
    used_t = torch.tensor(used)
    txt = _unit(model.get_text_features(input_ids=data.tokens["input_ids"][used_t],
                                        attention_mask=data.tokens["attention_mask"][used_t]))
    logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
    i2t = -(target / target.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    t2i = -(target / target.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean()
    verdict_logits = logits[:, [col[k] for k in data.verdict_ids.tolist()]]
    verdict = F.cross_entropy(verdict_logits, data.labels[idx])
    right = int((verdict_logits.argmax(1) == data.labels[idx]).sum())
    return (i2t + t2i) / 2 + verdict_weight * verdict, verdict, right


def train(data: Training, args: argparse.Namespace) -> int:
    """AdamW with a one-cycle schedule; stops early past --max-seconds. Returns the epochs run."""
    import torch

    model, n = data.model, len(data.labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, pct_start=0.1,
                                                   total_steps=args.epochs * -(-n // args.batch))
    model.train()
    started = time.time()
    for epoch in range(args.epochs):
        order = torch.randperm(n)
        total, verdict_total, correct = 0.0, 0.0, 0
        for start in range(0, n, args.batch):
            idx = order[start:start + args.batch]
            loss, verdict, right = batch_loss(data, idx, args.verdict_weight)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            total, verdict_total = total + loss.item() * len(idx), verdict_total + verdict.item() * len(idx)
            correct += right
        elapsed = time.time() - started
        print(f"epoch {epoch + 1:3d}  loss {total / n:.4f}  verdict CE {verdict_total / n:.4f}  "
              f"train verdict acc {correct / n:.3f}  {elapsed:.0f} s", flush=True)
        if elapsed > args.max_seconds:
            print(f"stopping: past --max-seconds {args.max_seconds:.0f}", flush=True)
            break
    return epoch + 1


def save_and_check(data: Training, args: argparse.Namespace, train_domains: list[str]) -> dict[str, float]:
    """Save the folder, load it back the way `--clip FOLDER` does, and measure verdict AUCs."""
    from dxcli.rl.clip import ClipScorer

    args.out.mkdir(parents=True, exist_ok=True)
    data.model.eval()
    for part in (data.model, data.tokenizer, data.processor):
        part.save_pretrained(args.out)
    scorer = ClipScorer.load(str(args.out.resolve()))
    splits = {f"held_out_{args.held_out}_test": ([args.held_out], "test"), "train_domains_val": (train_domains, "val"),
              "train_domains_test": (train_domains, "test"), "train_domains_train": (train_domains, "train"),
              **{f"{domain}_test": ([domain], "test") for domain in train_domains}}
    checks = {name: verdict_auc(scorer, load_pairs(args.data, domains, split, False))
              for name, (domains, split) in splits.items()}
    for name, value in checks.items():
        print(f"AUC of cos(img, 'fake') - cos(img, 'real'), {name}: {value:.3f}")
    return checks


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.held_out not in DOMAINS_HARD:
        raise SystemExit(f"--held-out: one of {DOMAINS_HARD}")
    train_domains = [d for d in DOMAINS_HARD if d != args.held_out]
    data = prepare(args, train_domains)
    started = time.time()
    epochs = train(data, args)
    train_s = time.time() - started
    checks = save_and_check(data, args, train_domains)
    print(json.dumps({"bench": "train_demo_clip", "data": str(args.data), "held_out": args.held_out,
                      "out": str(args.out), "train_s": round(train_s, 1), "epochs_run": epochs,
                      "params_m": round(sum(p.numel() for p in data.model.parameters()) / 1e6, 3), "auc": checks,
                      "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
