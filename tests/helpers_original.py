"""Tiny checkpoints in the formats of the original code (LLaVA's LlavaLlamaForCausalLM, as the
original project's run_train_dx_llava.sh writes it) and of transformers' LlavaForConditionalGeneration,
written from the public description of those formats, plus a re-implementation of the original's
forward to compare an imported model with."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

TRUNK_ARGS = {"depths": (1, 1, 1, 1), "dims": (16, 32, 64, 128), "ls_init_value": 1.0}
TOWER = "model.vision_tower.vision_tower."  # LlavaMetaModel.vision_tower (CLIPVisionTower).vision_tower
OPEN_CLIP_TOWER = "hf-hub:laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup"
TEXTS = ["A chat between a curious user and an artificial intelligence assistant. USER: hello\nAnalyze this "
         "image for signs of manipulation. ASSISTANT: natural skin, real texture, blurry edges, fake light.",
         "### Answer: real", "### Answer: fake", "The image shows consistent lighting and pores."] * 3


def llama_tokenizer():
    """A Llama tokenizer as LLaVA saves one (SentencePiece-style `▁` words, byte fallback, BOS added,
    transformers' default `legacy: false`), without `<image>`: the original uses id -200 instead."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    alphabet = ["▁"] + [f"<0x{i:02X}>" for i in range(256)]
    bpe.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=alphabet, show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    return LlamaTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], add_bos_token=True)


def llama_config(vocab: int, hidden: int = 32) -> "LlamaConfig":
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                       tie_word_embeddings=False)


def trunk(seed: int = 0):
    """The original tower's timm ConvNeXt trunk (open_clip resets its classifier: only head.norm is left)."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model("convnext_atto", pretrained=False, num_classes=0, **TRUNK_ARGS).eval()


def original_state(tokenizer, hidden: int = 32, head_hidden: int = 16, seed: int = 0, with_head: bool = True,
                   tower_width: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, config.json) of a DX-LLaVA (with_head) or a LLaVA-1.5 (a CLIP-ViT stand-in tower
    of `tower_width`, no head) in LlavaLlamaForCausalLM's layout."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    llm = LlamaForCausalLM(llama_config(len(tokenizer), hidden))
    state = dict(llm.state_dict())
    width = tower_width or TRUNK_ARGS["dims"][-1]
    # projector weights large enough that projected tokens pass +-10: the head's clamp matters
    projector = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden))
    with torch.no_grad():
        projector[2].weight.mul_(200.0)
    state.update({f"model.mm_projector.{k}": t for k, t in projector.state_dict().items()})
    if with_head:
        for name, layer in (("fc1", nn.Linear(hidden, head_hidden)), ("fc3", nn.Linear(head_hidden, 1))):
            state.update({f"model.binary_classifier.{name}.{k}": t for k, t in layer.state_dict().items()})
        state.update({f"{TOWER}visual.trunk.{k}": t for k, t in trunk(seed).state_dict().items()})
        # the rest of the open_clip CLIP: its text tower and the visual head the original never runs
        state.update({f"{TOWER}visual.head.mlp.fc1.weight": torch.randn(8, width),
                      f"{TOWER}transformer.resblocks.0.attn.in_proj_weight": torch.randn(24, 8),
                      f"{TOWER}token_embedding.weight": torch.randn(10, 8), f"{TOWER}logit_scale": torch.tensor(4.6)})
    else:  # LLaVA-1.5: a CLIP ViT tower (a few of its tensors stand for it)
        state.update({f"{TOWER}vision_model.embeddings.patch_embedding.weight": torch.randn(width, 3, 14, 14),
                      f"{TOWER}vision_model.post_layernorm.weight": torch.ones(width)})
    tower = OPEN_CLIP_TOWER if with_head else "openai/clip-vit-large-patch14-336"
    config = {**llm.config.to_dict(), "model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"],
              "mm_vision_tower": tower, "mm_hidden_size": width, "mm_projector_type": "mlp2x_gelu",
              "mm_vision_select_layer": -2, "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
              "mm_patch_merge_type": "flat", "image_aspect_ratio": "pad", "tokenizer_model_max_length": 2048,
              "tokenizer_padding_side": "right", "use_mm_proj": True, "tune_mm_mlp_adapter": False}
    return state, config


def write_original(folder: Path, state: dict[str, torch.Tensor], config: dict, tokenizer, *,
                   layout: str = "safetensors", side_files: bool = True, tower_in_main: bool = True) -> Path:
    """A checkpoint folder as the original code leaves it: config.json, tokenizer, the weights as
    one safetensors file or as two .bin shards with an index (`layout` "bin"), and the side files
    mm_projector.bin and clip_model.bin (the tower only there when not `tower_in_main`)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    tokenizer.save_pretrained(folder)
    tower = {k: t for k, t in state.items() if k.startswith(TOWER)}
    main = {k: t.contiguous() for k, t in state.items() if tower_in_main or k not in tower}
    if layout == "safetensors":
        save_file(main, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        keys = sorted(main)
        shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
                  "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
        for name, names in shards.items():
            torch.save({k: main[k] for k in names}, folder / name)
        index = {"weight_map": {k: name for name, names in shards.items() for k in names}}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index), encoding="utf-8")
    if side_files:
        torch.save({k: t for k, t in state.items() if k.startswith("model.mm_projector.")}, folder / "mm_projector.bin")
        torch.save(tower, folder / "clip_model.bin")
    return folder


# ---------------------------------------------------------------- the original's forward, re-implemented


def original_parts(state: dict[str, torch.Tensor], hidden: int = 32):
    """(trunk, projector, fc1, fc3) of an original DX-LLaVA state dict as plain torch modules."""
    net = trunk()
    net.load_state_dict({k.split("visual.trunk.", 1)[1]: t for k, t in state.items() if "visual.trunk." in k})
    width = TRUNK_ARGS["dims"][-1]
    projector = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden))
    projector.load_state_dict({k.removeprefix("model.mm_projector."): t for k, t in state.items()
                               if k.startswith("model.mm_projector.")})
    fc1_w = state["model.binary_classifier.fc1.weight"]
    fc1, fc3 = nn.Linear(hidden, fc1_w.shape[0]), nn.Linear(fc1_w.shape[0], 1)
    fc1.load_state_dict({"weight": fc1_w, "bias": state["model.binary_classifier.fc1.bias"]})
    fc3.load_state_dict({"weight": state["model.binary_classifier.fc3.weight"],
                         "bias": state["model.binary_classifier.fc3.bias"]})
    return net.eval(), projector, fc1, fc3


@torch.no_grad()
def original_image_tokens(net, projector, pixels: torch.Tensor) -> torch.Tensor:
    """The original's encode_images: stem and the four stages (no head norm), the map flattened
    row-major into tokens, the mlp2x_gelu projector."""
    x = net.stem(pixels)
    for stage in net.stages:
        x = stage(x)
    return projector(x.flatten(2).transpose(1, 2))


@torch.no_grad()
def original_head_prob(state: dict[str, torch.Tensor], pixels: torch.Tensor,
                       clamp: float | None = 10.0) -> torch.Tensor:
    """compute_binary_classification: tokens -> clamp(+-10) -> mean -> fc1 -> ReLU -> fc3 -> sigmoid."""
    net, projector, fc1, fc3 = original_parts(state)
    tokens = original_image_tokens(net, projector, pixels)
    if clamp is not None:
        tokens = tokens.clamp(-clamp, clamp)
    return torch.sigmoid(fc3(torch.relu(fc1(tokens.mean(dim=1)))).squeeze(-1))


def original_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """LLaVA's tokenizer_image_token: pieces around `<image>` tokenised alone, later BOS dropped, -200 between."""
    pieces = [tokenizer(piece).input_ids for piece in prompt.split("<image>")]
    ids = [pieces[0][0]]
    for i, piece in enumerate(pieces):
        ids += ([-200] if i else []) + piece[1:]
    return ids


@torch.no_grad()
def original_greedy(state: dict[str, torch.Tensor], config: dict, tokenizer, pixels: torch.Tensor, prompt: str,
                    steps: int) -> list[int]:
    """Greedy decoding as the original runs it: the image tokens spliced into the LLM's input
    embeddings where -200 stands, the whole sequence recomputed at every step (no cache)."""
    from transformers import LlamaForCausalLM

    llm = LlamaForCausalLM(llama_config(config["vocab_size"], config["hidden_size"])).eval()
    llm.load_state_dict({k: t for k, t in state.items() if k.startswith(("model.embed_tokens", "model.layers",
                                                                         "model.norm", "lm_head"))})
    net, projector, _, _ = original_parts(state, config["hidden_size"])
    image = original_image_tokens(net, projector, pixels)[0]
    ids = original_prompt_ids(tokenizer, prompt)
    cut = ids.index(-200)
    embed = llm.get_input_embeddings()
    sequence = torch.cat([embed(torch.tensor(ids[:cut])), image, embed(torch.tensor(ids[cut + 1:]))])
    generated = []
    for _ in range(steps):
        next_id = int(llm(inputs_embeds=sequence[None]).logits[0, -1].argmax())
        generated.append(next_id)
        if next_id == tokenizer.eos_token_id:
            break
        sequence = torch.cat([sequence, embed(torch.tensor([next_id]))])
    return generated
