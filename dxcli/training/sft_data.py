"""Records -> model inputs for align/instruct: the one template, assistant-only labels, images in workers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from dxcli.base.errors import DxError
from dxcli.base.images import load_rgb
from dxcli.data.records import Record
from dxcli.model.generate import expanded_prompt

IGNORE_INDEX = -100


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
