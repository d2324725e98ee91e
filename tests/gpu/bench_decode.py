"""dx's `generate` at 7B scale: dynamic KV cache vs static cache, plain and compiled (tests/gpu/README.md).

Run: python tests/gpu/bench_decode.py [--smoke] [--budget-s 200] [--repeats 3] [--compile-backend inductor]

check_gpu.py's random-init 7B-shaped DX-LLaVA (bf16, SDPA) and tokenizer; one demo image; dx's own
`generate` with PRPO's rollout settings (temperature 1.0, top_p 0.7, seed 0) and the length forced
with generation_config.min_new_tokens (random weights would stop anywhere). Measurements, in order:
  g8/dynamic         G=8 samples, the dynamic cache (what dx runs today)
  g8/static          cache_implementation="static", transformers' auto-compile switched off
                     (on CUDA it compiles a static-cache decode by itself unless disable_compile)
  g8/static+compile  the static cache with transformers' compiled decoding step (CompileConfig():
                     inductor, mode reduce-overhead = CUDA graphs)
  g8/dx-compiled     dx's own `generate(..., compiled=True)` (hardware.compiled_decode: a static cache
                     bucketed to a multiple of 256 slots, CompileConfig(dynamic=False)): a first call (the compile),
                     then `--repeats` calls with a LONGER question (another prompt length, as a run's
                     next batch); its seconds, their ms per step, and the graphs dynamo captured in
                     each phase (`recompiles_later` 0: the bucket kept one graph)
  g32/dynamic, g1/dynamic  the dynamic cache at G=32 and G=1: a step time flat in G means the
                     decode is bound by per-step overhead (launches, Python), not by reading weights
Each other: one warm-up call (full length where it compiles: its seconds are the compile time; 4
tokens otherwise), then the median of `--repeats` calls, ms per decoding step (prefill included, as
check_gpu's figure) and generated tokens/s. A measurement that fails prints one error line and the
next one runs; once `--budget-s` has passed since the start, the rest are skipped (a run sized to
stay under ~170 s: `--budget-s 170`; g1 may then be skipped). One
`decode NAME: ...` line each, then one JSON line. Caches (inductor, triton) and data live in a
temporary folder. `--smoke`: the same code at check_gpu's smoke scale on the CPU, compiled with
the `eager` backend (dynamo's capture without inductor's slow C++ build; g8/dx-compiled passes it as
generate's compile_backend, since transformers compiles only on accelerators by itself).
"""

from __future__ import annotations

import sys
import time

STARTED = time.perf_counter()  # the budget counts from here: imports included
sys.dont_write_bytecode = True  # nothing written beside the scripts either

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "bench")]

import check_gpu  # noqa: E402
import torch  # noqa: E402
from bench_generate_cache import set_variant  # noqa: E402

QUESTION = "Is this image real or fake?"
# g8/dx-compiled's later calls: 29 more prompt tokens, still QUESTION's bucket (GPU scale: 213 and
# 242 prompt tokens + 128 -> 512 slots; --smoke: 117 and 146 + 8 -> 256); the row reports both
# prompt lengths and the cache length, so a bucket crossing would show
LONG_QUESTION = "Is this photograph real, or was it made by a generator? Explain."
WARMUP_TOKENS = 4  # warm-up length where nothing compiles (kernels and allocator only)
# (name, G or None = the scale's group, variant)
PLAN = [("g8", None, "dynamic"), ("g8", None, "static"), ("g8", None, "static+compile"),
        ("g8", None, "dx-compiled"), ("g32", 32, "dynamic"), ("g1", 1, "dynamic")]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="check_gpu's smoke scale on the CPU")
    parser.add_argument("--budget-s", type=float, default=200.0, help="skip what is left after this many seconds")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median)")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (inductor; eager in --smoke)")
    return parser.parse_args(argv)


def apply_variant(model, variant: str, backend: str) -> None:
    """bench_generate_cache's variants; a backend other than inductor takes no inductor mode."""
    set_variant(model, variant)
    if variant == "static+compile" and backend != "inductor":
        model.generation_config.compile_config.backend = backend
        model.generation_config.compile_config.mode = None


def dynamo_counters() -> dict:
    """Graphs captured, graph breaks and CUDA-graph skips so far (torch internals: best effort)."""
    try:
        from torch._dynamo.utils import counters

        return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
                "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}
    except Exception:  # noqa: BLE001 - a diagnostic only
        return {}


def timed_generate(bundle, image, group: int, tokens: int, question: str = QUESTION,
                   **decoding) -> tuple[float, object]:
    """One call of dx's generate; `decoding`: its compiled / compile_backend arguments."""
    from dxcli.model.generate import generate

    bundle.model.generation_config.min_new_tokens = tokens
    check_gpu.sync()
    started = time.perf_counter()
    gen = generate(bundle, [image], [question], max_new_tokens=tokens, temperature=1.0, top_p=0.7,
                   samples_per_image=group, seed=0, **decoding)
    check_gpu.sync()
    return time.perf_counter() - started, gen


def measure(bundle, image, group: int, variant: str, tokens: int, args: argparse.Namespace) -> tuple[dict, list]:
    """One warm-up call, then `repeats` timed calls; figures and the last call's token ids."""
    if variant == "dx-compiled":
        return measure_dx_compiled(bundle, image, group, tokens, args)
    apply_variant(bundle.model, variant, args.compile_backend)
    check_gpu.reset_peak()
    warmup_tokens = tokens if "compile" in variant else min(WARMUP_TOKENS, tokens)
    warmup_s, _ = timed_generate(bundle, image, group, warmup_tokens)
    times = []
    for _ in range(args.repeats):
        seconds, gen = timed_generate(bundle, image, group, tokens)
        times.append(seconds)
    median = statistics.median(times)
    lengths = sorted({len(ids) for ids in gen.token_ids})
    row = dict(group=group, new_tokens=tokens, ms_per_step=round(1000 * median / tokens, 2),
               tokens_per_s=round(group * tokens / median), median_s=round(median, 3),
               min_s=round(min(times), 3), warmup_s=round(warmup_s, 2), warmup_tokens=warmup_tokens,
               lengths_ok=len(gen.texts) == group and lengths == [tokens], lengths=lengths,
               peak_gib=check_gpu.peak_gib())
    return row, gen.token_ids


def measure_dx_compiled(bundle, image, group: int, tokens: int, args: argparse.Namespace) -> tuple[dict, list]:
    """dx's generate(compiled=True): the first call (compile) with QUESTION, then `repeats` calls with
    LONG_QUESTION; figures and the FIRST call's token ids (same question and seed as g8/dynamic)."""
    set_variant(bundle.model, "dynamic")  # the model's own config as dx leaves it; generate brings the rest
    # the static variants above left transformers' sticky cache length (prompt + 127, no bucket) on
    # the model; dx alone only ever leaves bucket multiples there, so start as a fresh process would
    if hasattr(bundle.model, "_previous_max_cache_length"):
        del bundle.model._previous_max_cache_length
    # inductor on the GPU is dx's own choice (compile_backend None); elsewhere the backend is forced
    backend = None if args.compile_backend == "inductor" and torch.cuda.is_available() else args.compile_backend
    check_gpu.reset_peak()
    start = dynamo_counters()
    first_s, first = timed_generate(bundle, image, group, tokens, compiled=True, compile_backend=backend)
    after_first = dynamo_counters()
    times = []
    for _ in range(args.repeats):
        seconds, gen = timed_generate(bundle, image, group, tokens, LONG_QUESTION, compiled=True,
                                      compile_backend=backend)
        times.append(seconds)
    end, median = dynamo_counters(), statistics.median(times)
    lengths = sorted({len(ids) for ids in [*first.token_ids, *gen.token_ids]})
    row = dict(group=group, new_tokens=tokens, first_call_s=round(first_s, 2),
               ms_per_step=round(1000 * median / tokens, 2), tokens_per_s=round(group * tokens / median),
               median_s=round(median, 3), min_s=round(min(times), 3),
               prompt_len_first=first.prompt_ids.shape[1], prompt_len_later=gen.prompt_ids.shape[1],
               cache_len=getattr(bundle.model, "_previous_max_cache_length", None),
               graphs_first_call=_delta(start, after_first, "graphs"),
               recompiles_later=_delta(after_first, end, "graphs"),
               lengths_ok=len(gen.texts) == group and lengths == [tokens], lengths=lengths,
               peak_gib=check_gpu.peak_gib())
    return row, first.token_ids


def _delta(before: dict, after: dict, key: str) -> int | None:
    return after[key] - before[key] if key in before and key in after else None


def run(scale: check_gpu.Scale, args: argparse.Namespace, work: Path, results: dict) -> None:
    from dxcli.base.images import load_rgb
    from dxcli.model.build import train_tokenizer

    data, records = check_gpu.demo_data(work)
    tokenizer = train_tokenizer([r.answer for r in records], scale.llm["vocab_size"])
    bundle = check_gpu.make_bundle(scale, scale.llm, tokenizer)
    bundle.model.eval()
    bundle.model.config.use_cache = True
    image = load_rgb(data / records[0].image)
    results["model"] = dict(params_b=round(sum(p.numel() for p in bundle.model.parameters()) / 1e9, 3),
                            dtype=scale.precision, attn=bundle.model.config.text_config._attn_implementation,
                            device=torch.cuda.get_device_name() if scale.device == "cuda" else "cpu",
                            torch=torch.__version__, transformers=__import__("transformers").__version__,
                            ready_at_s=elapsed())
    report("model", results["model"])
    baseline = None
    for name, group, variant in PLAN:
        name = f"{name}/{variant}"
        if elapsed() > args.budget_s:
            results["skipped"].append(name)
            print(f"decode {name}: skipped (elapsed {elapsed()} s > budget {args.budget_s:g} s)", flush=True)
            continue
        try:
            row, ids = measure(bundle, image, group or scale.group, variant, scale.new_tokens, args)
        except Exception as error:  # noqa: BLE001 - one failing variant must not stop the others
            results["errors"][name] = one_line(error)
            print(f"decode {name}: error {results['errors'][name]}", flush=True)
            check_gpu.reset_peak()
            continue
        if name.startswith("g8/"):
            baseline = ids if variant == "dynamic" else baseline
            row["same_tokens_as_dynamic"] = None if baseline is None else ids == baseline
        if "compile" in variant:
            row.update(dynamo_counters())
        results["decode"][name] = {**row, "done_at_s": elapsed()}
        report(name, results["decode"][name])
    bundle.model.generation_config.min_new_tokens = None


def one_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:300] if text else ''}"


def elapsed() -> float:
    return round(time.perf_counter() - STARTED, 1)


def report(name: str, figures: dict) -> None:
    print(f"decode {name}: " + ", ".join(f"{k} {v}" for k, v in figures.items()), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scale = check_gpu.process_scale(args.smoke)
    args.compile_backend = args.compile_backend or ("eager" if args.smoke else "inductor")
    results: dict = {"decode": {}, "errors": {}, "skipped": [], "budget_s": args.budget_s,
                     "repeats": args.repeats, "compile_backend": args.compile_backend}
    with tempfile.TemporaryDirectory(prefix="dx-bench-decode-") as tmp:
        for variable, folder in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton"),
                                 ("TRITON_HOME", "triton-home")):
            os.environ[variable] = str(Path(tmp) / folder)  # a cold compile, as on a fresh machine
        run(scale, args, Path(tmp), results)
    results["total_s"] = elapsed()
    print(json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
