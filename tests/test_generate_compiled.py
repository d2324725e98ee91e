"""generate(compiled=True): a bucketed static cache and a compiled decoding step give the dynamic
cache's tokens, keep one graph across prompt lengths, and leave model.generation_config alone."""

from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image

from dxcli.config import ModelConfig
from dxcli.model import generate as gen_mod
from dxcli.model.build import build_tiny
from dxcli.model.generate import DECODE_BUCKET, decode_kwargs, generate, static_cache_len

TEXTS = ["**Edges**: crisp and natural.\n\n### Answer: real", "**Skin**: waxy, smeared pores.\n\n### Answer: fake"] * 5
SHORT, LONG = "Real or fake?", "Is this photograph real, or was it made by an image generator? Say why."
NEW_TOKENS = 12  # forced (min_new_tokens): random weights would stop anywhere


@pytest.fixture(scope="module")
def bundle():
    cfg = ModelConfig(preset="tiny", image_size=64, head_hidden=16)
    cfg.tiny.vision_depths, cfg.tiny.vision_dims = [1, 1, 1, 1], [8, 16, 32, 64]
    cfg.tiny.hidden_size, cfg.tiny.intermediate_size, cfg.tiny.num_heads = 64, 128, 4
    bundle = build_tiny(cfg, TEXTS)
    bundle.model.eval()
    bundle.model.generation_config.min_new_tokens = NEW_TOKENS
    return bundle


def images() -> list[Image.Image]:
    return [Image.new("RGB", (64, 64), (120, 90, 60)), Image.new("RGB", (80, 64), (20, 40, 200))]


def run(bundle, question: str, **kwargs) -> list[list[int]]:
    out = generate(bundle, images(), [question, question + " Answer."], max_new_tokens=NEW_TOKENS,
                   samples_per_image=2, **kwargs)
    assert {len(ids) for ids in out.token_ids} <= set(range(1, NEW_TOKENS + 1))
    return out.token_ids


def test_compiled_decoding_gives_the_dynamic_tokens_with_one_graph_across_prompt_lengths(bundle):
    graphs = []

    def counting_backend(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(graph)  # one call per graph dynamo captures (each recompile too)
        return graph.forward

    torch._dynamo.reset()  # no graph left by an earlier test
    before = bundle.model.generation_config.to_dict()
    for question in (SHORT, LONG):  # two prompt lengths, the same 256-slot bucket
        expected = run(bundle, question)
        assert run(bundle, question, compiled=True, compile_backend=counting_backend) == expected
    assert len(graphs) == 1  # compiled at all, and the bucket kept the one decoding graph
    assert bundle.model.generation_config.to_dict() == before


def test_without_a_compiling_device_the_static_cache_runs_uncompiled_and_says_so_once(bundle, caplog):
    gen_mod._say_uncompiled.cache_clear()
    expected = run(bundle, SHORT)
    with caplog.at_level(logging.WARNING, logger=gen_mod.__name__):
        assert run(bundle, SHORT, compiled=True) == expected
        assert run(bundle, LONG, compiled=True) == run(bundle, LONG)
    said = [r.getMessage() for r in caplog.records if "compiled decoding" in r.getMessage()]
    assert len(said) == 1 and "uncompiled" in said[0]


def test_the_cache_length_is_rounded_up_to_the_bucket():
    assert DECODE_BUCKET == 256
    assert static_cache_len(40, 12) == 256 and static_cache_len(200, 56) == 256 and static_cache_len(200, 57) == 512
    assert decode_kwargs(torch.device("cpu"), 40, 12, compiled=False) == {}
    cuda = decode_kwargs(torch.device("cuda"), 300, 512, compiled=True)
    assert cuda["cache_implementation"] == "static" and cuda["max_cache_len"] == 1024
    assert cuda["compile_config"].dynamic is False and cuda["compile_config"].mode == "reduce-overhead"
    assert cuda["disable_compile"] is False
