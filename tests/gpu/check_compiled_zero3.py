"""Compiled decoding under ZeRO-3: does the compiled graph see each rollout's new weights? (tests/gpu/README.md)

Run: python tests/gpu/check_compiled_zero3.py [--smoke] [--work DIR]

`hardware.compiled_decode` decodes with a static cache and a compiled step (inductor,
reduce-overhead = CUDA graphs, which capture memory addresses). Under ZeRO-3 a PRPO rollout gathers
the partitioned weights into buffers that can sit at new addresses each time, and the optimizer
changes the weights between rollouts: a graph replayed against stale buffers would decode with old
or garbage weights, silently. This check builds PRPO's state (check_gpu.prpo_state: ZeRO-3 on one
process, LoRA) around a small random-init DX-LLaVA in fp32 with compiled_decode on and a large lr,
then for `ITERATIONS` rounds:
  1. inside `weights_for_generation` (the rollout's gather), greedy-decodes the same 2 images x G=2
     with `generate(compiled=True)` and `generate(compiled=False)` (length forced) and compares the
     token ids; where they differ, the dynamic path's top-2 logit gap at the first differing
     position says whether that was a float near-tie (rounding) or a real difference;
  2. runs one real `prpo.train_step` (its own rollout uses compiled decoding too) and measures the
     largest change of any trainable parameter.
PASS: every round's compiled tokens equal the dynamic ones (near-ties excepted) and the dynamic
tokens changed from round to round (the weights moved, so equality means something). One
`check round-N: ...` line per round, one `check steps: ...` line, then one JSON line.
`--smoke`: the same code at tiny scale on the CPU, compiled with dynamo's `eager` backend
(transformers compiles only on accelerators by itself): it checks the plumbing, not CUDA graphs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_decode  # noqa: E402
import check_gpu  # noqa: E402
import torch  # noqa: E402

ITERATIONS = 3
# a Llama shape that compiles in seconds; the vocabulary is what the demo texts' BPE reaches
SMALL = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=8, vocab_size=600)
SMOKE_VISION = check_gpu.SCALES["smoke"].vision_args
SCALES = {
    # fp32 everywhere: greedy tokens of both decode paths must then agree except at float near-ties
    "gpu": dataclasses.replace(check_gpu.SCALES["smoke"], llm=SMALL, cli_llm=SMALL, vision_args=SMOKE_VISION,
                               new_tokens=32, device="cuda", precision="fp32", group=2),
    "smoke": dataclasses.replace(check_gpu.SCALES["smoke"], new_tokens=16, group=2),
}
# a top-2 logit gap below this at the first differing token counts as a rounding near-tie: a static
# cache attends over padded slots (masked) and inductor fuses differently, so fp32 sums can differ
# in the last bits (~1e-6 here); stale or garbage weights move logits by far more
TIE_GAP = 1e-4
# PRPO's rewards usually give a random model's text no advantage (every answer invalid), so no
# gradient; the optimizer step still moves the weights through AdamW's decoupled weight decay
# (lr 1e-2 x 20: LoRA's B shrinks by up to a fifth per step) once B starts away from peft's zeros
WEIGHT_DECAY = 20.0
LORA_B_STD = 0.1  # LoRA's delta then about the size of the base weights' (init std 0.02)


def random_lora_b(model) -> None:
    """LoRA's B ~ N(0, LORA_B_STD), as a trained adapter's, instead of zeros (seeded: same every run)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * LORA_B_STD)


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def snapshot(model) -> list[torch.Tensor]:
    """The trainable parameters' whole values on the CPU (gathered from their ZeRO-3 partitions)."""
    import deepspeed

    params = trainable(model)
    with deepspeed.zero.GatheredParameters(params):
        return [p.detach().float().cpu().clone() for p in params]


def max_change(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    return max((a - b).abs().max().item() for a, b in zip(after, before))


def greedy(bundle, images: list, questions: list[str], scale, compiled: bool, backend: str | None):
    from dxcli.model.generate import generate

    return generate(bundle, images, questions, max_new_tokens=scale.new_tokens, temperature=0.0,
                    samples_per_image=scale.group, compiled=compiled, compile_backend=backend if compiled else None)


@torch.no_grad()
def tie_gaps(bundle, gen, dynamic: list[list[int]], firsts: dict[int, int]) -> dict[int, float]:
    """Top-2 logit gap of the weights in place, at each mismatched row's first differing position,
    from one teacher-forced forward over the dynamic tokens (the prefix both paths share there)."""
    from dxcli.model.generate import position_ids_from_mask

    model, device = bundle.model, gen.prompt_ids.device
    rows = sorted(firsts)
    group = len(dynamic) // gen.prompt_ids.shape[0]
    prompt = gen.prompt_ids.repeat_interleave(group, 0)[rows]
    prompt_mask = gen.prompt_mask.repeat_interleave(group, 0)[rows]
    tokens = torch.tensor([dynamic[r] for r in rows], device=device)
    mask = torch.cat([prompt_mask, torch.ones_like(tokens)], 1)
    features = gen.image_features.repeat_interleave(group, 0)[rows]
    embeds = model.prompt_embeds(torch.cat([prompt, tokens], 1), mask, image_features=features)
    # kept position j predicts generated token j (position 0: the prompt's last token)
    logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                   logits_to_keep=tokens.shape[1] + 1).logits.float()
    top2 = {r: logits[i, firsts[r]].topk(2).values for i, r in enumerate(rows)}
    return {r: (v[0] - v[1]).item() for r, v in top2.items()}


def compare(compiled: list[list[int]], dynamic: list[list[int]]) -> tuple[dict[int, int], float]:
    """First differing position of each mismatched row, and the share of identical tokens."""
    firsts, same, total = {}, 0, 0
    for row, (c, d) in enumerate(zip(compiled, dynamic)):
        equal = [a == b for a, b in zip(c, d)] + [False] * abs(len(c) - len(d))
        same, total = same + sum(equal), total + len(equal)
        if not all(equal):
            firsts[row] = equal.index(False)
    return firsts, same / max(total, 1)


def decode_round(state, scale, images: list, questions: list[str], backend: str | None, previous: dict) -> dict:
    """Both decode paths inside one ZeRO-3 gather, as a rollout decodes; their agreement, and whether
    each changed from the last round (`previous`: that round's token ids, updated here)."""
    from dxcli.training import engine as ds

    counters = bench_decode.dynamo_counters()
    state.bundle.model.eval()  # as `rollout`: no LoRA dropout, and the KV cache on (checkpointing is off)
    with ds.weights_for_generation(state.engine):
        compiled = greedy(state.bundle, images, questions, scale, True, backend)
        dynamic = greedy(state.bundle, images, questions, scale, False, backend)
        firsts, token_share = compare(compiled.token_ids, dynamic.token_ids)
        gaps = tie_gaps(state.bundle, dynamic, dynamic.token_ids, firsts) if firsts else {}
    after = bench_decode.dynamo_counters()
    rows = len(dynamic.token_ids)
    figures = dict(sequences_identical=round(1 - len(firsts) / rows, 3), tokens_identical=round(token_share, 4),
                   lengths=sorted({len(ids) for ids in compiled.token_ids + dynamic.token_ids}),
                   first_diff={r: firsts[r] for r in sorted(firsts)},
                   gap_at_first_diff={r: f"{gaps[r]:.2e}" for r in sorted(gaps)},
                   real_mismatches=sum(gap >= TIE_GAP for gap in gaps.values()),
                   graphs_captured={k: after[k] - counters[k] for k in after if k in counters})
    if previous:
        figures.update(dynamic_changed=dynamic.token_ids != previous["dynamic"],
                       compiled_changed=compiled.token_ids != previous["compiled"],
                       # a stale graph would repeat what the old weights decoded
                       compiled_equals_previous_dynamic=compiled.token_ids == previous["dynamic"])
    previous.update(dynamic=dynamic.token_ids, compiled=compiled.token_ids)
    return figures


def train_round(state) -> dict:
    """One real PRPO step (rollout with the config's compiled decoding, update, optimizer step)."""
    from dxcli.training import prpo

    before = snapshot(state.bundle.model)
    row = prpo.train_step(state, prpo.next_batch(state))
    return dict(loss=round(row["loss"], 6), zero_advantage_share=row["zero_advantage_share"],
                lr=row["lr"], max_param_change=f"{max_change(before, snapshot(state.bundle.model)):.3e}")


def round_passes(figures: dict, first: bool) -> bool:
    """Both paths agree (near-ties excepted) and, after the first round, the dynamic tokens moved."""
    if "error" in figures:
        return False
    return figures["real_mismatches"] == 0 and (first or figures["dynamic_changed"])


def attempt(name: str, work, *args) -> dict:
    """`work(*args)`'s figures, or one error line and {"error": ...}: the next part still runs."""
    try:
        return work(*args)
    except Exception as error:  # noqa: BLE001 - the check reports and goes on
        print(f"error {name}: {type(error).__name__}: {str(error)[:300]}", flush=True)
        return {"error": f"{type(error).__name__}: {str(error)[:300]}"}


def setup(scale, work: Path):
    """PRPO's ZeRO-3 state around a fresh small model, compiled decoding on, and 2 demo images."""
    from dxcli.base.images import load_rgb
    from dxcli.model.build import train_tokenizer

    data, records = check_gpu.demo_data(work)
    tokenizer = train_tokenizer([r.answer for r in records], scale.llm["vocab_size"])
    bundle = check_gpu.make_bundle(scale, scale.llm, tokenizer)
    bundle.model.generation_config.min_new_tokens = scale.new_tokens  # random weights: no early EOS
    shapes = check_gpu.shapes_file(work, "small", scale.llm, scale)
    sets = ("hardware.compiled_decode=true", "prpo.lr=1e-2", f"train.weight_decay={WEIGHT_DECAY}", "prpo.beta=0",
            "prpo.images_per_step=2")
    state = check_gpu.prpo_state(bundle, scale, shapes, data, records, work / "prpo", sets=sets,
                                 steps=ITERATIONS + 1, adapt=random_lora_b)  # the cosine stays above 0
    picked = records[:2]
    return state, [load_rgb(data / r.image) for r in picked], [r.question for r in picked]


def run(scale, work: Path, backend: str | None) -> bool:
    state, images, questions = setup(scale, work)
    previous: dict = {}
    passed = True
    for i in range(ITERATIONS):
        figures = attempt(f"round-{i}", decode_round, state, scale, images, questions, backend, previous)
        figures["train"] = attempt(f"train-{i}", train_round, state)
        passed = round_passes(figures, i == 0) and "error" not in figures["train"] and passed
        check_gpu.report(f"round-{i}", **figures)
    state.engine.destroy()
    return passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="the same code at tiny scale on the CPU")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args(argv)
    scale = check_gpu.process_scale(args.smoke, SCALES)
    check_gpu.leave_launcher_group()  # a group of one of our own, as check_gpu
    # CUDA: dx's own choice (inductor, CUDA graphs); CPU: transformers would not compile, so force
    # dynamo's capture with the eager backend (no C++ build)
    backend = "eager" if scale.device == "cpu" else None
    with tempfile.TemporaryDirectory(prefix="dx-compiled-zero3-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        passed = run(scale, work, backend)
    print(json.dumps({**check_gpu.RESULTS, "device": torch.cuda.get_device_name() if scale.device == "cuda"
                      else "cpu", "total_s": round(time.perf_counter() - check_gpu.STARTED, 1),
                      "pass": passed}), flush=True)
    if torch.distributed.is_initialized():  # the group of one; left open, exit waits on it
        torch.distributed.destroy_process_group()
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
