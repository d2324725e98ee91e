"""Records -> model inputs for align/instruct: the one template, assistant-only labels, images in workers."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from dxcli import template
from dxcli.data.records import Record
from dxcli.errors import DxError

IGNORE_INDEX = -100


def expanded_prompt(question: str, image_tokens: int) -> str:
    """The template's prompt with `<image>` repeated once per image token (the model fills them)."""
    return template.prompt(question).replace(template.IMAGE_TOKEN, template.IMAGE_TOKEN * image_tokens, 1)


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def tokenize_pair(tokenizer, question: str, answer: str, image_tokens: int, max_length: int) -> Tokenized:
    """Prompt ids (never cut: the image tokens must stay whole) + answer ids + EOS, labels on the answer only."""
    prompt_ids = tokenizer(expanded_prompt(question, image_tokens))["input_ids"]
    answer_ids = tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    room = max_length - len(prompt_ids)
    if room < 2:
        raise DxError(f"train.max_length={max_length} leaves no room for an answer after a "
                      f"{len(prompt_ids)}-token prompt (image tokens included)")
    truncated = len(answer_ids) > room
    answer_ids = answer_ids[:room]
    return Tokenized(prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids, truncated)


def load_rgb(path: Path):
    from PIL import Image

    with Image.open(path) as img:
        from PIL import ImageOps

        return ImageOps.exif_transpose(img).convert("RGB")


def find_bad_images(records: list[Record], images_root: Path, workers: int = 8) -> list[tuple[str, str]]:
    """(image, reason) for every record whose image is missing or cannot be decoded."""
    from PIL import Image

    from dxcli.data.tree import safe_image_path

    def problem(record: Record) -> tuple[str, str] | None:
        try:
            path = safe_image_path(images_root, record.image)
        except DxError as exc:
            return record.image, str(exc)
        if not path.is_file():
            return record.image, "missing"
        try:
            with Image.open(path) as img:
                img.load()
        except Exception as exc:  # any decoder failure means the image is unusable
            return record.image, f"unreadable ({type(exc).__name__}: {exc})"
        return None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [p for p in pool.map(problem, records) if p is not None]


class SftDataset(Dataset):
    """Text is tokenized up front (to count truncation before training); images load lazily in workers."""

    def __init__(self, records: list[Record], images_root: Path, tokenizer, image_processor,
                 image_tokens: int, max_length: int):
        self.records = records
        self.images_root = Path(images_root)
        self.image_processor = image_processor
        self.items = [tokenize_pair(tokenizer, r.question, r.answer, image_tokens, max_length) for r in records]
        self.truncated = sum(item.truncated for item in self.items)
        self.pad_id = tokenizer.pad_token_id

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record, item = self.records[index], self.items[index]
        image = load_rgb(self.images_root / record.image)
        pixels = self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        label = record.binary_label if record.binary_label is not None else -1
        return {"input_ids": item.input_ids, "labels": item.labels, "pixel_values": pixels,
                "binary_label": float(label)}

    def collate(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Right padding for training; pad positions are masked out of attention and loss."""
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[row, :n] = torch.tensor(b["input_ids"])
            labels[row, :n] = torch.tensor(b["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask,
                "pixel_values": torch.stack([b["pixel_values"] for b in batch]),
                "binary_labels": torch.tensor([b["binary_label"] for b in batch])}


class ResumableShardSampler(Sampler[int]):
    """A seeded per-epoch shuffle, sharded by rank, that can start mid-epoch (for --resume).

    Every rank gets the same number of indices (the shard is padded by wrapping), so ranks step together.
    """

    def __init__(self, size: int, rank: int, world: int, seed: int):
        self.size, self.rank, self.world, self.seed = size, rank, world, seed
        self.epoch = 0
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def shard(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        per_rank = -(-self.size // self.world)
        order += order[: per_rank * self.world - self.size]
        return order[self.rank::self.world]

    def __len__(self) -> int:
        return -(-self.size // self.world) - self.start

    def __iter__(self):
        return iter(self.shard(self.epoch)[self.start:])
