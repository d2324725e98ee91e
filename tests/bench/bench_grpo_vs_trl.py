"""One GRPO step of `dx train prpo --algo grpo` against TRL's GRPOTrainer, same model, same work.

Run: python tests/bench/bench_grpo_vs_trl.py [--images-per-step 2] [--group-size 4] [--max-new-tokens 64]
     [--steps 6] [--threads 1] [--keep DIR]
Needs TRL (bench-only: `pip install -e ".[bench]"` or `pip install trl`).

Both sides train the identical tiny DX-LLaVA checkpoint (a `DxLlavaForConditionalGeneration`, loaded
from the same folder) as a vision-language model: TRL 1.x's GRPOTrainer drives it through its VLM path
(conversational prompts + an "image" column + the checkpoint's LlavaProcessor, to which the bench
gives a chat template that renders dx's Vicuna prompt; the bench checks the prompt ids are equal).
Same per step: prompts (images), G samples each, max completion length, temperature, top_p, one
update (TRL num_iterations=1, beta=0 on both, so no reference model, no vLLM), fp32, the same
trainable parameters (the LLM; vision tower, projector and head frozen), AdamW at the same lr,
the same reward (1 if the parsed answer equals the ground-truth label). Generation lengths are
forced equal: min_new_tokens = max_new_tokens on both (for dx through the checkpoint's
generation_config, which dx's generate inherits; for TRL through `generation_kwargs`), and the
mean generated tokens per sequence are reported to prove it.

Each side runs in its own subprocess with the same torch thread count (default 1, what cpu-tiny
uses), one after the other. A step's time is the wall time between the ends of consecutive steps
(generation + rewards + log-probs + update + the trainer's own bookkeeping); the first step is the
warm-up and is excluded; the median of the remaining `--steps - 1` is reported.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SIDES = ("dx", "trl")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-per-step", type=int, default=2, help="prompts (images) per step")
    parser.add_argument("--group-size", type=int, default=4, help="G: samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="completion length (forced on both)")
    parser.add_argument("--steps", type=int, default=6, help="steps per side; the first is the warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--keep", type=Path, default=None, help="work folder, kept and reused (data, checkpoint)")
    parser.add_argument("--side", choices=SIDES, default=None, help=argparse.SUPPRESS)  # internal: one side
    parser.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def quiet(*_: object) -> None:
    pass


# ---------------------------------------------------------------------- shared set-up


def build_checkpoint(work: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """Small demo data and a tiny instruct checkpoint whose generation config forces the length.

    Returns (data, checkpoint). Weights do not matter for speed once lengths are forced.
    """
    from transformers import GenerationConfig

    from dxcli import config
    from dxcli.data.demo import make_demo
    from dxcli.jobs.stages import run_sft_stage

    data = work / "data"
    if not (data / "reasoning.jsonl").is_file():
        make_demo(data, seed=0, n_train=16, n_val=2, n_test=2, overwrite=True)
    common = ["hardware.num_workers=0"]
    align = work / "align" / "model"
    if not (align / "config.json").is_file():
        run_sft_stage("align", out=work / "align", data=data, say=quiet, force=True,
                      resolved=config.resolve("cpu-tiny", [*common, "train.max_steps=4"]))
    instruct = work / "instruct" / "model"
    if not (instruct / "config.json").is_file():
        run_sft_stage("instruct", out=work / "instruct", data=data, model=str(align), say=quiet, force=True,
                      resolved=config.resolve("cpu-tiny", [*common, "train.max_steps=10"]))
    checkpoint = work / f"checkpoint-len{args.max_new_tokens}"
    shutil.rmtree(checkpoint, ignore_errors=True)
    shutil.copytree(instruct, checkpoint)
    generation = GenerationConfig.from_pretrained(checkpoint)
    generation.min_new_tokens = args.max_new_tokens  # dx's generate() inherits this: no EOS before the end
    generation.save_pretrained(checkpoint)
    return data, checkpoint


def train_images(data: Path) -> list[tuple[Path, str]]:
    return [(path, path.parent.name) for path in sorted(data.glob("*/train/*/*.png"))]


def summarise(ends: list[float], tokens_per_step: list[float], warmup: int = 1) -> dict[str, float]:
    """Median seconds per step (intervals between step ends, warm-up excluded) and tokens."""
    intervals = [b - a for a, b in itertools.pairwise(ends)][warmup - 1:]
    timed_tokens = tokens_per_step[warmup:]
    median = statistics.median(intervals)
    tokens = statistics.fmean(timed_tokens)
    return {"median_s": median, "min_s": min(intervals), "max_s": max(intervals), "timed_steps": len(intervals),
            "generated_tokens_per_step": tokens, "ms_per_generated_token": 1000 * median / tokens,
            "step_seconds": intervals}


# ---------------------------------------------------------------------- dx side


def run_dx(work: Path, data: Path, checkpoint: Path, args: argparse.Namespace) -> dict:
    from dxcli import config
    from dxcli.runtime.metrics import MetricsLog
    from dxcli.jobs.stages import run_prpo_stage

    ends: list[float] = []
    write = MetricsLog.write

    def stamped(self, row):  # the loop logs every step (train.log_every=1): stamp each step's end
        write(self, row)
        ends.append(time.perf_counter())

    MetricsLog.write = stamped
    sequences = args.images_per_step * args.group_size
    sets = ["hardware.num_workers=0", f"hardware.threads={args.threads}", "train.log_every=1",
            f"train.max_steps={args.steps}", "prpo.epochs=100", "prpo.algo=grpo", "prpo.labels=gt", "prpo.beta=0",
            f"prpo.group_size={args.group_size}", f"prpo.images_per_step={args.images_per_step}",
            f"prpo.max_new_tokens={args.max_new_tokens}", f"prpo.temperature={args.temperature}",
            f"prpo.top_p={args.top_p}", f"prpo.lr={args.lr}", f"hardware.micro_batch={sequences}",
            "train.warmup_ratio=0"]
    run = work / "dx-run"
    run_prpo_stage(out=run, resolved=config.resolve("cpu-tiny", sets), model=str(checkpoint), data=data,
                   force=True, say=quiet)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    result = summarise(ends, [r["response_tokens"] * sequences for r in rows])
    result["loop_seconds_median"] = statistics.median(r["seconds"] for r in rows[1:])  # the loop's own timer
    return result


# ---------------------------------------------------------------------- TRL side


def vicuna_chat_template() -> str:
    """A Jinja chat template rendering exactly dxcli.base.template.prompt(question) (BOS added by the tokenizer)."""
    from dxcli.base import template

    return ("{%- for message in messages -%}{%- if message['role'] == 'user' -%}"
            + template.SYSTEM + " USER: "
            "{%- if message['content'] is string -%}{{ ' ' + message['content'] }}{%- else -%}"
            "{%- for part in message['content'] -%}{%- if part['type'] == 'image' -%}{{ ' " + template.IMAGE_TOKEN
            + "\\n' }}{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}{%- endfor -%}"
            "{%- endif -%}{{ ' ASSISTANT:' }}{%- endif -%}{%- endfor -%}")


def check_same_prompt(bundle, processor, image) -> None:
    """TRL's prompt ids (chat template + processor) must equal dx's (template + <image> expansion)."""
    from dxcli.model.generate import encode_prompts
    from dxcli.base.template import DEFAULT_QUESTION

    dx_ids = encode_prompts(bundle, [DEFAULT_QUESTION])[0][0].tolist()
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": DEFAULT_QUESTION}]}]
    trl_ids = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"][0]
    if list(trl_ids) != dx_ids:
        raise SystemExit(f"prompt ids differ:\n dx  {dx_ids}\n trl {list(trl_ids)}")


def run_trl(work: Path, data: Path, checkpoint: Path, args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from dxcli.base.answer import parse_answer
    from dxcli.model.checkpoint import load_checkpoint
    from dxcli.base.template import DEFAULT_QUESTION
    from dxcli.base.images import load_rgb

    torch.set_num_threads(args.threads)
    bundle = load_checkpoint(checkpoint)
    model = bundle.model
    model.freeze(vision=True, llm=False, projector=True, head=True)  # what dx's RL loop trains
    processor = bundle.processor
    processor.chat_template = vicuna_chat_template()
    images = train_images(data)
    check_same_prompt(bundle, processor, load_rgb(images[0][0]))
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": DEFAULT_QUESTION}],
                                  "image": load_rgb(path), "label": label} for path, label in images])

    def correct_answer(completions, label, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [1.0 if parse_answer(text) == truth else 0.0 for text, truth in zip(texts, label)]

    ends: list[float] = []
    tokens: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            ends.append(time.perf_counter())
            lengths = trainer._metrics["train"]["completions/mean_length"]
            tokens.append(lengths[-1] * args.images_per_step * args.group_size)

    config = GRPOConfig(
        output_dir=str(work / "trl-run"), per_device_train_batch_size=args.images_per_step * args.group_size,
        num_generations=args.group_size, gradient_accumulation_steps=1, num_iterations=1, beta=0.0,
        max_completion_length=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=0,
        generation_kwargs={"min_new_tokens": args.max_new_tokens}, learning_rate=args.lr, weight_decay=0.0,
        max_grad_norm=1.0, max_steps=args.steps, loss_type="dapo", scale_rewards="group", epsilon=0.2,
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, use_vllm=False,
        dataloader_num_workers=0, logging_steps=10**6, save_strategy="no", report_to="none",
        disable_tqdm=True, log_completions=False, seed=0)
    trainer = GRPOTrainer(model=model, reward_funcs=correct_answer, args=config, train_dataset=dataset,
                          processing_class=processor, callbacks=[StepClock()])
    trainer.train()
    return {**summarise(ends, tokens), "vision_language_path": trainer._is_vlm,
            "optimizer_steps": trainer.state.global_step}


# ---------------------------------------------------------------------- driver


def run_side(args: argparse.Namespace) -> int:
    work = args.work
    data, checkpoint = work / "data", work / f"checkpoint-len{args.max_new_tokens}"
    result = (run_dx if args.side == "dx" else run_trl)(work, data, checkpoint, args)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def spawn(side: str, work: Path, argv: list[str], threads: int) -> dict:
    # the parent's in-process training set these (and still holds that port): each side starts afresh
    inherited = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in inherited}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    command = [sys.executable, __file__, *argv, "--side", side, "--work", str(work)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{side} side failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> int:
    args = parse_args()
    if args.side:
        return run_side(args)
    if args.steps < 6:
        raise SystemExit("--steps must be at least 6 (1 warm-up + 5 timed)")
    import trl  # fail early, before any work, when the bench dependency is missing

    argv = sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        build_checkpoint(work, args)
        results = {side: spawn(side, work, argv, args.threads) for side in SIDES}

    import torch
    import transformers

    dx, ref = results["dx"], results["trl"]
    ratio = ref["median_s"] / dx["median_s"]
    print(f"\nGRPO step, identical tiny DX-LLaVA (vision-language; TRL {trl.__version__}, transformers "
          f"{transformers.__version__}, torch {torch.__version__}), CPU, {args.threads} thread(s): "
          f"{args.images_per_step} prompts x G={args.group_size}, {args.max_new_tokens} new tokens forced, "
          f"T={args.temperature}, top_p={args.top_p}; median of {dx['timed_steps']} steps after 1 warm-up")
    print(f"{'':<6}{'s/step':>10}{'min':>10}{'max':>10}{'tokens/step':>14}{'ms/token':>10}")
    for name, r in (("dx", dx), ("trl", ref)):
        print(f"{name:<6}{r['median_s']:>10.3f}{r['min_s']:>10.3f}{r['max_s']:>10.3f}"
              f"{r['generated_tokens_per_step']:>14.1f}{r['ms_per_generated_token']:>10.2f}")
    print(f"TRL / dx time per step: {ratio:.2f}x ({'dx faster' if ratio > 1 else 'TRL faster'})")
    print(json.dumps({"bench": "grpo_vs_trl", "comparison": "vision-language model, both sides",
                      "images_per_step": args.images_per_step, "group_size": args.group_size,
                      "max_new_tokens": args.max_new_tokens, "threads": args.threads, "trl_version": trl.__version__,
                      "dx": dx, "trl": ref, "trl_over_dx": ratio}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
