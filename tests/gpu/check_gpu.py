"""GPU check of dx at real shapes on one GPU, with nothing downloaded (tests/gpu/README.md).

Run: python tests/gpu/check_gpu.py [--smoke] [--work DIR]

Random-init DX-LLaVA at the paper's shapes (Vicuna-7B: hidden 4096, intermediate 11008, 32 layers,
32 heads, vocab 32000; timm `convnext_large_mlp` at 320 px -> 100 image tokens, pretrained=False)
and a BPE tokenizer trained on the demo texts. Prints, one `check` line each:
  1. bf16 + SDPA forward/backward with instruct's trainable set (projector, LLM, head), gradient
     checkpointing: measured peak memory against the memory planner's figure for the same work;
     tokens/s and MFU (6 N tokens/s over 989 TFLOP/s dense bf16, H100 SXM);
  2. generation ms/token at G=8 (dx's one `generate`, length forced);
  3. one PRPO step at G=8 with LoRA r=16 under ZeRO-3 (`dxcli.training.prpo.train_step`);
  4. the real CLI, `dx train instruct` then `dx train prpo --nproc-per-node 1`, on a 1B-shaped
     checkpoint this script builds and saves.
`--smoke` runs the same code at tiny scale on the CPU (tests/test_gpu_smoke.py keeps it working).
The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

H100_BF16_DENSE = 989e12  # FLOP/s, H100 SXM dense bf16 (no sparsity)
VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000)
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000)  # TinyLlama-1.1B's shape
TINY = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=600)


@dataclass
class Scale:
    llm: dict
    cli_llm: dict
    vision_args: dict
    image_size: int
    batch: int  # sequences per forward/backward
    seq: int  # tokens per sequence
    iters: int  # timed forward/backward passes after one warm-up
    new_tokens: int  # forced generation length (and PRPO's max_new_tokens)
    cli_tokens: int  # PRPO max_new_tokens in the CLI run
    device: str
    precision: str
    cli_sets: list[str] = field(default_factory=list)
    cli_steps: tuple[int, int] = (4, 2)  # instruct, prpo
    group: int = 8
    vision: str = "convnext_large_mlp"


SCALES = {
    "gpu": Scale(VICUNA_7B, LLAMA_1B, {}, 320, batch=4, seq=2048, iters=3, new_tokens=128, cli_tokens=64,
                 device="cuda", precision="bf16", cli_sets=["hardware.num_workers=4"]),
    "smoke": Scale(TINY, TINY, {"depths": (1, 1, 1, 1), "dims": (16, 32, 64, 128)}, 64, batch=2, seq=192, iters=1,
                   new_tokens=8, cli_tokens=8, device="cpu", precision="fp32", cli_steps=(2, 1),
                   cli_sets=["hardware.num_workers=0", "hardware.threads=1"]),
}
RESULTS: dict[str, dict] = {}
STARTED = time.perf_counter()
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def report(name: str, **figures: object) -> None:
    RESULTS[name] = {**figures, "done_at_s": round(time.perf_counter() - STARTED, 1)}  # the 8-minute budget
    print(f"check {name}: " + ", ".join(f"{k} {v}" for k, v in RESULTS[name].items()), flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def reset_peak() -> None:
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ---------------------------------------------------------------------- models and data


def dtype_of(scale: Scale) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[scale.precision]


def make_bundle(scale: Scale, shape: dict, tokenizer):
    """A random-init DX-LLaVA with `shape` for its LLM, built on the scale's device in its dtype."""
    from transformers import LlamaConfig

    from dxcli.model.build import build_random

    text = LlamaConfig(**shape, tie_word_embeddings=False)
    bundle = build_random(scale.vision, dict(scale.vision_args), text, tokenizer, scale.image_size, 512,
                          dtype=dtype_of(scale), device=scale.device)
    bundle.model.set_attn_implementation("sdpa")  # model.attn_implementation's default, as dx loads it
    return bundle


def shapes_file(work: Path, name: str, shape: dict, scale: Scale) -> Path:
    """The planner's input for this model (dxcli/profiles/models format), so it plans what runs here."""
    path = work / f"shapes-{name}.json"
    llm = {"model_type": "llama", **shape, "tie_word_embeddings": False}
    path.write_text(json.dumps({"llm": llm, "vision": {"timm": scale.vision, "image_size": scale.image_size}}))
    return path


def planner_sets(scale: Scale, shapes: Path) -> list[str]:
    return [f"model.shapes={shapes}", f"model.vision={scale.vision}", f"model.image_size={scale.image_size}",
            f"hardware.precision={scale.precision}", "hardware.nproc_per_node=1"]


def demo_data(work: Path) -> tuple[Path, list]:
    from dxcli.data.demo import make_demo
    from dxcli.data.records import default_reasoning, records_from_tree

    root = work / "data"
    make_demo(root, seed=0, n_train=16, n_val=2, n_test=2, overwrite=True)
    return root, records_from_tree(root, splits=("train",), reasoning=default_reasoning(root))


# ---------------------------------------------------------------------- 1. forward/backward


def sft_batch(bundle, scale: Scale) -> dict[str, torch.Tensor]:
    """`batch` sequences of exactly `seq` tokens: the real prompt (image tokens included), then
    random answer tokens that the LM loss covers."""
    from dxcli.model.generate import encode_prompts

    ids, _ = encode_prompts(bundle, ["Is this image real or fake?"] * scale.batch)
    first_plain = max(bundle.tokenizer.all_special_ids) + 1  # no <image>, EOS or padding in the answer
    answer = torch.randint(first_plain, len(bundle.tokenizer), (scale.batch, scale.seq - ids.shape[1]))
    ids = torch.cat([ids, answer], 1)
    labels = ids.clone()
    labels[:, :-answer.shape[1]] = -100
    pixels = torch.randn(scale.batch, 3, scale.image_size, scale.image_size)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "pixel_values": pixels,
             "binary_labels": torch.randint(0, 2, (scale.batch,))}
    return {k: v.to(scale.device, dtype_of(scale) if k == "pixel_values" else None) for k, v in batch.items()}


def check_forward_backward(bundle, scale: Scale, shapes: Path) -> None:
    from dxcli import config
    from dxcli.jobs.memory import plan_memory
    from dxcli.training.sft import frozen_parts

    model = bundle.model
    cfg = config.resolve("h100x2", [*planner_sets(scale, shapes), "hardware.zero_stage=0", "model.lora.r=0",
                                    f"hardware.micro_batch={scale.batch}", f"train.max_length={scale.seq}",
                                    "train.grad_checkpointing=true", "instruct.unfreeze_vision=false"]).config
    model.freeze(**frozen_parts("instruct", cfg))
    model.gradient_checkpointing_enable()
    model.config.use_cache = False
    model.train()
    batch = sft_batch(bundle, scale)
    reset_peak()
    for i in range(1 + scale.iters):  # the first pass is the warm-up
        if i == 1:
            sync()
            started = time.perf_counter()
        out = model(**batch)
        (out.loss + 10.0 * out.bin_loss).backward()
        model.zero_grad(set_to_none=False)  # gradients stay allocated, as DeepSpeed's buffers do
    sync()
    seconds = (time.perf_counter() - started) / scale.iters
    peak = peak_gib()
    model.zero_grad(set_to_none=True)
    plan = plan_memory(cfg, "instruct")
    held = ("gradients: 16-bit", "gradients: fp32", "activations", "logits")  # no optimizer here
    planned = sum(r.gib for r in plan.rows if r.item.startswith("parameters") or r.item in held)
    llm = model.model.language_model
    n = sum(p.numel() for p in llm.parameters()) - llm.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    tokens_per_s = scale.batch * scale.seq / seconds
    report("forward_backward", attn=model.config.text_config._attn_implementation, dtype=scale.precision,
           tokens=f"{scale.batch}x{scale.seq}", seconds=round(seconds, 3), tokens_per_s=round(tokens_per_s),
           mfu=round(6 * n * tokens_per_s / H100_BF16_DENSE, 3) if scale.device == "cuda" else None,
           peak_gib=peak, planner_gib=round(planned, 2), planner_total_with_adamw_gib=round(plan.total, 2))


# ---------------------------------------------------------------------- 2. generation


def check_generation(bundle, scale: Scale, image) -> None:
    from dxcli.model.generate import generate

    model = bundle.model
    model.eval()
    model.config.use_cache = True
    args = dict(temperature=1.0, top_p=0.7, samples_per_image=scale.group, seed=0)
    generate(bundle, [image], ["Is this image real or fake?"], max_new_tokens=4, **args)  # warm-up
    model.generation_config.min_new_tokens = scale.new_tokens  # random weights: no early EOS
    reset_peak()
    sync()
    started = time.perf_counter()
    gen = generate(bundle, [image], ["Is this image real or fake?"], max_new_tokens=scale.new_tokens, **args)
    sync()
    seconds = time.perf_counter() - started
    model.generation_config.min_new_tokens = None
    assert all(len(ids) == scale.new_tokens for ids in gen.token_ids), [len(ids) for ids in gen.token_ids]
    report("generation", group=scale.group, new_tokens=scale.new_tokens,
           ms_per_token=round(1000 * seconds / scale.new_tokens, 2),
           tokens_per_s=round(scale.group * scale.new_tokens / seconds), peak_gib=peak_gib())


# ---------------------------------------------------------------------- 3. one PRPO step


def prpo_state(bundle, scale: Scale, shapes: Path, data: Path, records: list, work: Path,
               sets: tuple[str, ...] = (), steps: int = 1, adapt: Callable[[Any], None] | None = None):
    """PRPO's training state around `bundle` as `dxcli.training.prpo.setup` builds it, minus loading:
    the 7B is already on the GPU, and a checkpoint round trip would cost minutes of disk. `sets`
    override the config; `steps` is the schedule's length (its cosine reaches lr 0 at the last);
    `adapt` is called on the LoRA model before DeepSpeed partitions it (e.g. to start the adapters
    elsewhere than peft's B = 0)."""
    from dxcli import config
    from dxcli.model.lora import apply_lora
    from dxcli.rl.rewards import load_lexicon
    from dxcli.runtime.dist import init_distributed
    from dxcli.training import engine as ds
    from dxcli.training import prpo
    from dxcli.training.sampler import ResumableShardSampler

    G = scale.group
    cfg = config.resolve("h100x2", [*planner_sets(scale, shapes), "hardware.zero_stage=3", "prpo.images_per_step=1",
                                    f"prpo.group_size={G}", f"prpo.max_new_tokens={scale.new_tokens}",
                                    f"hardware.micro_batch={G}", "train.grad_checkpointing=true", *sets]).config
    dist = init_distributed()
    bundle.model = apply_lora(bundle.model, cfg.model.lora)  # the profile's LoRA (r=16, PRPO)
    bundle.model.freeze(vision=True, llm=False, projector=True, head=True)
    bundle.model.gradient_checkpointing_enable()
    if adapt is not None:
        adapt(bundle.model)
    ds_config = ds.deepspeed_config(cfg, lr=cfg.prpo.lr, world=1)
    ds_config.update(train_micro_batch_size_per_gpu=G, gradient_accumulation_steps=1, train_batch_size=G)
    engine, scheduler = ds.initialize(bundle.model, ds_config, steps, 0.0)
    bundle.model = engine.module
    job = prpo.PrpoJob(run_dir=str(work), config="", records="", images=str(data), model="")
    return prpo.PrpoState(job, cfg, dist, bundle, engine, scheduler, None, None, load_lexicon(), records,
                          ResumableShardSampler(len(records), 0, 1, 0), total_steps=steps, chunks=1)


def check_prpo_step(bundle, scale: Scale, shapes: Path, data: Path, records: list, work: Path) -> None:
    from dxcli.training import prpo

    bundle.model.generation_config.min_new_tokens = scale.new_tokens
    state = prpo_state(bundle, scale, shapes, data, records, work)
    reset_peak()
    sync()
    started = time.perf_counter()
    row = prpo.train_step(state, prpo.next_batch(state))
    sync()
    report("prpo_step", group=scale.group, lora_r=state.cfg.model.lora.r, zero=3, beta=state.cfg.prpo.beta,
           seconds=round(time.perf_counter() - started, 2), response_tokens=row["response_tokens"],
           kl=row["kl"], peak_gib=peak_gib())
    state.engine.destroy()


# ---------------------------------------------------------------------- 4. the CLI on a 1B shape


def dx(scale: Scale, *args: str) -> float:
    """The dx command line (its parser, config, memory check, launch); seconds taken. On the GPU a
    fresh `python -m dxcli` process as a user runs it; in --smoke the same `app` in this process,
    which saves two interpreter starts (imports dominate at tiny scale). A failure stops the check."""
    started = time.perf_counter()
    if scale.device == "cpu":
        from typer.testing import CliRunner

        from dxcli.cli.main import app

        result = CliRunner().invoke(app, list(args))
        code, output = result.exit_code, result.output + repr(result.exception or "")
    else:
        # this process joined a process group of one for the PRPO step: the CLI must not inherit it
        env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
        done = subprocess.run([sys.executable, "-m", "dxcli", *args], capture_output=True, text=True, env=env)
        code, output = done.returncode, done.stdout[-3000:] + done.stderr[-6000:]
    if code != 0:
        print(output, file=sys.stderr)
        raise SystemExit(f"dx {args[0]} {args[1]} failed (exit {code})")
    return round(time.perf_counter() - started, 1)


def check_cli(scale: Scale, tokenizer, work: Path, data: Path) -> None:
    from dxcli.model.checkpoint import save_checkpoint

    started = time.perf_counter()
    small = make_bundle(scale, scale.cli_llm, tokenizer)
    checkpoint = work / "checkpoint-1b"
    save_checkpoint(small, checkpoint)
    n = sum(p.numel() for p in small.model.parameters())
    del small
    reset_peak()
    built = round(time.perf_counter() - started, 1)
    common = ["--profile", "h100x2", "--nproc-per-node", "1", "--data", str(data)]
    sets = [*planner_sets(scale, shapes_file(work, "1b", scale.cli_llm, scale)), *scale.cli_sets,
            "train.log_every=1"]  # the profile's ZeRO-3, on one process
    flags = [x for s in sets for x in ("--set", s)]
    sft_steps, rl_steps = scale.cli_steps
    instruct = dx(scale, "train", "instruct", *common, "--model", str(checkpoint), "--out", str(work / "instruct"), *flags,
                  "--set", f"train.max_steps={sft_steps}", "--set", "hardware.micro_batch=4",
                  "--set", "train.max_length=512")
    rl = dx(scale, "train", "prpo", *common, "--model", str(work / "instruct"), "--out", str(work / "prpo"), *flags,
            "--set", f"train.max_steps={rl_steps}", "--set", f"prpo.group_size={scale.group}", "--set",
            f"hardware.micro_batch={scale.group}", "--set", f"prpo.max_new_tokens={scale.cli_tokens}")
    steps = [len((work / run / "metrics.jsonl").read_text().splitlines()) for run in ("instruct", "prpo")]
    assert steps == [sft_steps, rl_steps] and (work / "prpo" / "adapter" / "adapter_config.json").is_file(), steps
    report("cli", params_m=round(n / 1e6), build_and_save_s=built, instruct_steps=sft_steps, instruct_s=instruct,
           prpo_lora_steps=rl_steps, prpo_s=rl)


# ---------------------------------------------------------------------- main


def run(scale: Scale, work: Path) -> None:
    from dxcli.base.images import load_rgb
    from dxcli.model.build import train_tokenizer

    data, records = demo_data(work)
    tokenizer = train_tokenizer([r.answer for r in records], scale.llm["vocab_size"])
    started = time.perf_counter()
    bundle = make_bundle(scale, scale.llm, tokenizer)
    report("model", params_b=round(sum(p.numel() for p in bundle.model.parameters()) / 1e9, 3),
           image_tokens=bundle.model.config.image_seq_length, build_s=round(time.perf_counter() - started, 1),
           device=torch.cuda.get_device_name() if scale.device == "cuda" else "cpu")
    shapes = shapes_file(work, "7b", scale.llm, scale)
    check_forward_backward(bundle, scale, shapes)
    check_generation(bundle, scale, load_rgb(data / records[0].image))
    check_prpo_step(bundle, scale, shapes, data, records, work / "prpo-step")
    del bundle
    reset_peak()
    check_cli(scale, tokenizer, work, data)


def process_scale(smoke: bool, scales: dict[str, Scale] | None = None) -> Scale:
    """The scale a script runs at (`scales`, default this script's), with this process set up for
    it: shared by the GPU scripts."""
    scale = (scales or SCALES)["smoke" if smoke else "gpu"]
    if scale.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no GPU: run with --smoke for the CPU version")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if scale.device == "cpu":
        torch.set_num_threads(1)  # tiny matrices, as cpu-tiny: threads only synchronise
    return scale


def leave_launcher_group() -> None:
    """One process on its own: a caller's process-group address is not ours."""
    for name in LAUNCHER_VARIABLES:
        os.environ.pop(name, None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="the same code paths at tiny scale on the CPU")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args(argv)
    scale = process_scale(args.smoke)
    leave_launcher_group()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dx-gpu-check-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        run(scale, work)
    RESULTS["total_s"] = {"seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(RESULTS), flush=True)
    if torch.distributed.is_initialized():  # the PRPO step's group of one; left open, exit waits on it
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
