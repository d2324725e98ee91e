"""dx's `generate` with today's dynamic KV cache against a static cache, plain and compiled, on CPU.

Run: python tests/bench/bench_generate_cache.py [--repeats 3] [--threads 1] [--no-compile]

The cpu-tiny model shape (the tiny preset: 2-layer Llama, hidden 128, 9 image tokens), random init,
lengths forced with min_new_tokens so every variant decodes the same number of steps. Two
workloads: a PRPO rollout of cpu-tiny (2 images x G=4, 96 new tokens, sampling) and an `eval
infer` batch (16 images, 160 new tokens, greedy). Variants, in one process, one after the other:
`dynamic` (what dx runs), `static` (generation_config.cache_implementation="static") and
`static+compile` (the same with transformers' compiled decoding step, which it turns on by
itself on CUDA and here through compile_config._compile_all_devices). Median seconds of
`--repeats` runs after one warm-up, the warm-up's own time (for the compiled variant: with the
compilation) and one call with a longer question (another prompt length, as a run's next batch).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from PIL import Image

WORKLOADS = {"prpo_rollout": dict(images=2, samples=4, new_tokens=96, temperature=1.0, top_p=0.9),
             "eval_infer": dict(images=16, samples=1, new_tokens=160, temperature=0.0, top_p=1.0)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (cpu-tiny uses 1)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled variant (slow to build)")
    return parser.parse_args()


def tiny_bundle():
    from dxcli import config
    from dxcli.base.template import DEFAULT_QUESTION
    from dxcli.model.checkpoint import build_model

    cfg = config.resolve("cpu-tiny").config
    texts = [DEFAULT_QUESTION, "**Edges**: crisp and natural.\n\n### Answer: real"] * 20
    bundle = build_model(cfg.model, texts)
    bundle.model.eval()
    return bundle


def set_variant(model, variant: str) -> None:
    from transformers import CompileConfig

    gen = model.generation_config
    gen.cache_implementation = None if variant == "dynamic" else "static"
    if variant == "static+compile":
        compile_config = CompileConfig()
        compile_config._compile_all_devices = True  # transformers compiles on CUDA only by default
        gen.compile_config, gen.disable_compile = compile_config, False
    else:
        gen.disable_compile = True


def time_workload(bundle, workload: dict, repeats: int) -> tuple[float, list]:
    from dxcli.model.generate import generate

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)) for _ in range(workload["images"])]
    bundle.model.generation_config.min_new_tokens = workload["new_tokens"]
    args = dict(max_new_tokens=workload["new_tokens"], temperature=workload["temperature"], top_p=workload["top_p"],
                samples_per_image=workload["samples"], seed=0)
    started = time.perf_counter()
    generate(bundle, images, ["Real or fake?"] * len(images), **args)  # warm-up (compiles when asked)
    first = time.perf_counter() - started
    times, ids = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        gen = generate(bundle, images, ["Real or fake?"] * len(images), **args)
        times.append(time.perf_counter() - started)
        ids = gen.token_ids
    # a longer question: another prompt length, as the next batch of a run brings (a static cache of
    # another size: does the compiled step recompile?)
    started = time.perf_counter()
    generate(bundle, images, ["Is this photograph real, or was it made by a generator?"] * len(images), **args)
    return {"first": first, "median": statistics.median(times), "new_length": time.perf_counter() - started}, ids


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    bundle = tiny_bundle()
    variants = ["dynamic", "static"] + ([] if args.no_compile else ["static+compile"])
    results: dict[str, dict] = {}
    for name, workload in WORKLOADS.items():
        baseline_ids = None
        for variant in variants:
            set_variant(bundle.model, variant)
            timing, ids = time_workload(bundle, workload, args.repeats)
            baseline_ids = baseline_ids or ids
            steps = workload["new_tokens"]
            row = {k: round(v, 3) for k, v in timing.items()}
            row.update(ms_per_step=round(1000 * timing["median"] / steps, 2), same_tokens_as_dynamic=ids == baseline_ids)
            results[f"{name}/{variant}"] = row
            print(f"{name:13s} {variant:15s} median {timing['median']:7.3f} s ({row['ms_per_step']:6.2f} ms/step), "
                  f"first call {timing['first']:6.2f} s, other prompt length {timing['new_length']:6.2f} s, "
                  f"same tokens as dynamic: {ids == baseline_ids}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
