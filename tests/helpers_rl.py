"""Small RL fixtures built on the spot, offline: a trivially learnable toy setting, tiny random
CLIPs (transformers and open_clip), a PRPO loop state, and rollouts written by hand."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dxcli import config
from dxcli.model.generate import Generation, encode_images, encode_prompts
from dxcli.training import prpo
from dxcli.training.rollout import Rollout

QUESTION = "Is this image real or fake?"
TOY_BRIGHTNESS = {"real": 210, "fake": 40}  # the label is the image's brightness: trivially learnable


def quiet(*_: object) -> None:
    pass


# ---------------------------------------------------------------------- the toy setting


def make_toy_data(root: Path, n: int = 16, seed: int = 0) -> Path:
    """ROOT/toy/{train,test}/{real,fake}: bright noisy squares are real, dark ones fake; plus
    ROOT/sft-records.jsonl, whose answers ("### Answer: X") have labels drawn independently of
    the image, so a model tuned on them knows the answer format but not the answer."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("test", 2)):
        for label, base in TOY_BRIGHTNESS.items():
            folder = root / "toy" / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(base + rng.normal(0, 20, (96, 96, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    rows = []
    for path in sorted(root.glob("toy/train/*/*.png")):
        rel = path.relative_to(root).as_posix()
        label = random.Random(rel).choice(["real", "fake"])
        rows.append({"id": rel, "image": rel, "binary_label": int(label == "fake"), "conversations": [
            {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": f"### Answer: {label}"}]})
    (root / "sft-records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def train_toy_model(work: Path, data: Path) -> Path:
    """A tiny model tuned until it answers in the format (~6 tokens), at random (~20 s)."""
    from dxcli.jobs.stages import run_sft_stage

    sets = ["hardware.num_workers=0", "train.max_steps=100", "instruct.epochs=100", "train.max_length=128",
            "instruct.unfreeze_vision=false", "train.log_every=50"]
    return run_sft_stage("instruct", out=work, data=data / "sft-records.jsonl", images=data, say=quiet,
                         resolved=config.resolve("cpu-tiny", sets))


# ---------------------------------------------------------------------- the loop, by hand


def open_state(run_dir: Path, model: Path, data: Path, sets: list[str]) -> prpo.PrpoState:
    """The PRPO loop's state (policy, DeepSpeed engine, reference, CLIP) as `dx train prpo` sets it up."""
    from dxcli.jobs import prepare

    resolved = config.resolve("cpu-tiny", ["hardware.num_workers=0", *sets])
    prepare.open_run_dir(run_dir, resolved, resume=False, force=True)
    records, images = prepare.run_records(run_dir, "prompt-records.jsonl", resume=False, say=quiet,
                                           data=data, images=None)
    job = prpo.PrpoJob(run_dir=str(run_dir), config=str(run_dir / "config.yaml"), records=str(records),
                       images=str(images), model=str(model))
    return prpo.setup(job)


def hand_rollout(state: prpo.PrpoState, image: Image.Image, texts: list[str],
                 advantages: list[list[float]]) -> Rollout:
    """A rollout of one image whose completions are `texts` (+ EOS) with the given per-token advantages."""
    bundle, tokenizer = state.bundle, state.bundle.tokenizer
    ids = completion_ids(tokenizer, texts)
    prompt_ids, prompt_mask = encode_prompts(bundle, [QUESTION])
    features, _ = encode_images(bundle, [image])
    n, width = len(ids), max(len(row) for row in ids)
    completion = torch.full((n, width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    adv = torch.zeros((n, width))
    for row, (tokens, values) in enumerate(zip(ids, advantages)):
        assert len(values) == len(tokens)
        completion[row, :len(tokens)] = torch.tensor(tokens)
        mask[row, :len(tokens)] = 1
        adv[row, :len(tokens)] = torch.tensor(values)
    return Rollout(prompt_ids.repeat(n, 1), prompt_mask.repeat(n, 1), features.repeat(n, 1, 1).cpu(),
                   completion, mask, adv, {}, list(texts))


def completion_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids as generation produces them after "ASSISTANT:": a space, the text, EOS."""
    return [tokenizer(" " + text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            for text in texts]


def scripted_generate(texts: list[str]):
    """A stand-in for `generate` in dxcli.training.rollout that "samples" `texts` (len(images) * G,
    grouped by image) as the model would emit them: a space, the text, EOS. The prompt and image
    tensors are placeholders: for checks of what a rollout computes from the responses."""

    def generate(bundle, images, questions, *, samples_per_image: int, **_) -> Generation:
        ids = completion_ids(bundle.tokenizer, texts)
        assert len(ids) == len(images) * samples_per_image, "one scripted text per sample"
        n = len(images)
        return Generation(texts=[bundle.tokenizer.decode(row, skip_special_tokens=True) for row in ids],
                          token_ids=ids, head_probs=[0.5] * n, prompt_ids=torch.ones((n, 2), dtype=torch.long),
                          prompt_mask=torch.ones((n, 2), dtype=torch.long), image_features=torch.zeros((n, 1, 4)))

    return generate


def text_bundle(texts: list[str]):
    """Just enough of a model bundle for `rollout` with `scripted_generate`: a tokenizer trained on
    `texts` (byte-level BPE, as the tiny preset's) and a model that is never run."""
    from types import SimpleNamespace

    from dxcli.model.build import train_tokenizer

    return SimpleNamespace(model=torch.nn.Identity(), tokenizer=train_tokenizer(texts, 400))


def toy_image(label: str, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.clip(TOY_BRIGHTNESS[label] + rng.normal(0, 20, (96, 96, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


# ---------------------------------------------------------------------- tiny random CLIPs


def tiny_hf_clip():
    """A random transformers CLIPModel with a byte-level BPE trained on the spot: (model, tokenizer, processor)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<|startoftext|>", "<|endoftext|>", "<pad>"]
    tok.train_from_iterator(["skin texture natural lighting fake real artifacts pores"] * 10,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos, eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>",
                                        eos_token="<|endoftext|>", pad_token="<pad>", unk_token="<unk>")
    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    clip_config = CLIPConfig(
        text_config=dict(tiny, vocab_size=tok.get_vocab_size(), max_position_embeddings=16,
                         bos_token_id=bos, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(tiny, image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPModel(clip_config), tokenizer, processor


def save_tiny_hf_clip(folder: Path) -> Path:
    model, tokenizer, processor = tiny_hf_clip()
    for part in (model, tokenizer, processor):
        part.save_pretrained(folder)
    return folder


TINY_OPEN_CLIP = {  # a ViT open_clip model a few hundred KB in size (the token table: 49408 x 16)
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


def save_tiny_open_clip(folder: Path, name: str = "dx-tiny-clip") -> tuple[Path, Path]:
    """(model-config JSON, weights file) of a random open_clip model, as `open_clip:JSON:WEIGHTS` loads them."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    config_file = folder / f"{name}.json"
    config_file.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(config_file)
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None)
    weights = folder / "weights.pt"
    torch.save(model.state_dict(), weights)
    return config_file, weights
