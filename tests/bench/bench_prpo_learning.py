"""Does PRPO learn? N steps of `dx train prpo` from a deliberately weak tiny instruct checkpoint.

Run: python tests/bench/bench_prpo_learning.py [--steps 60] [--lr 5e-5] [--group-size 4]
     [--algo prpo|grpo] [--final-credit paragraph|verdict] [--updates-per-rollout N] [--keep DIR]

On the demo data (smaller than `dx demo`'s, for speed) with the cpu-tiny profile, offline, ~2 min
on 2 cores: demo data -> align (6 steps) -> instruct cut short (`--instruct-steps`, so a good share
of sampled answers are invalid or inconsistent) -> eval -> PRPO (VCR off: no CLIP weights offline,
so the reward is PCR alone) -> eval again.

Reports
- training rollouts, from RUN/metrics.jsonl (each row is the rollout of the weights *before* that
  step's update): mean PCR, final-paragraph PCR, invalid rate, reward at step 0, over the first 5
  and over the last 5 steps (8 samples a step: noisy);
- sampled test eval (G samples per test image at the training temperature / top_p, scored by the
  PRPO rollout code itself, so the same definitions; ~400 samples): before and after;
- greedy test eval (`eval infer` + `eval score`): F1, invalid rate, final-paragraph consistency.
Ends with one JSON line.

`--algo grpo` (ground-truth labels) is the control: same loop, one reward per response.
`--final-credit` sets `prpo.final_credit` (default `verdict`, dx's own default): only the verdict
word's tokens carry the final paragraph's (PCR) advantage; the rest of the final paragraph (the
answer marker, EOS) takes the mean advantage of the response's other tokens (`paragraph`, the
original rule, gives it to all of them; see the note in tests/bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROLLOUT_KEYS = ("pcr", "final_pcr", "invalid_rate", "reward", "answer_accuracy", "response_tokens",
                "zero_advantage_share", "clip_fraction")
EVAL_KEYS = ("pcr", "final_pcr", "invalid_rate", "answer_accuracy", "response_tokens")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="PRPO steps")
    parser.add_argument("--lr", type=float, default=5e-5, help="prpo.lr")
    parser.add_argument("--algo", choices=("prpo", "grpo"), default="prpo")
    parser.add_argument("--group-size", type=int, default=4, help="prpo.group_size (G)")
    parser.add_argument("--images-per-step", type=int, default=2, help="prpo.images_per_step")
    parser.add_argument("--temperature", type=float, default=1.0, help="prpo.temperature")
    parser.add_argument("--top-p", type=float, default=0.9, help="prpo.top_p")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="prpo.max_new_tokens")
    parser.add_argument("--instruct-steps", type=int, default=80, help="instruct optimizer steps (weak on purpose)")
    parser.add_argument("--n-train", type=int, default=100, help="demo train images per domain")
    parser.add_argument("--n-test", type=int, default=24, help="demo test images per domain")
    parser.add_argument("--final-credit", choices=("paragraph", "verdict"), default="verdict",
                        help="prpo.final_credit (paragraph: METHOD.md §11; verdict: only the verdict word)")
    parser.add_argument("--updates-per-rollout", type=int, default=1, help="prpo.updates_per_rollout")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="extra --set for the PRPO run")
    parser.add_argument("--keep", type=Path, default=None,
                        help="work folder, kept and reused (data, align, instruct); default: a temp folder")
    return parser.parse_args(argv)


def quiet(*_: object) -> None:
    pass


# ---------------------------------------------------------------------- stages


def build_weak_instruct(work: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """Demo data, align, and an instruct run stopped early; returns (data, instruct model)."""
    from dxcli import config
    from dxcli.data.demo import make_demo
    from dxcli.jobs.stages import run_sft_stage

    data = work / "data"
    if not (data / "reasoning.jsonl").is_file():
        make_demo(data, seed=0, n_train=args.n_train, n_val=4, n_test=args.n_test, overwrite=True)
    common = ["hardware.num_workers=0"]
    align = work / "align" / "model"
    if not (align / "config.json").is_file():
        run_sft_stage("align", out=work / "align", data=data, say=quiet, force=True,
                      resolved=config.resolve("cpu-tiny", [*common, "train.max_steps=6"]))
    instruct = work / f"instruct-{args.instruct_steps}" / "model"
    if not (instruct / "config.json").is_file():
        run_sft_stage("instruct", out=instruct.parent, data=data, model=str(align), say=quiet, force=True,
                      resolved=config.resolve("cpu-tiny", [*common, f"train.max_steps={args.instruct_steps}"]))
    return data, instruct


def prpo_sets(args: argparse.Namespace) -> list[str]:
    return ["hardware.num_workers=0", "train.log_every=1", f"prpo.algo={args.algo}", "prpo.labels=gt",
            "prpo.epochs=100", f"train.max_steps={args.steps}", f"prpo.lr={args.lr}",
            f"prpo.group_size={args.group_size}", f"prpo.images_per_step={args.images_per_step}",
            f"prpo.temperature={args.temperature}", f"prpo.top_p={args.top_p}",
            f"prpo.max_new_tokens={args.max_new_tokens}",
            f"hardware.micro_batch={args.group_size * args.images_per_step}",
            f"prpo.final_credit={args.final_credit}", f"prpo.updates_per_rollout={args.updates_per_rollout}",
            *args.sets]


def run_prpo(work: Path, data: Path, instruct: Path, args: argparse.Namespace) -> tuple[Path, list[dict]]:
    from dxcli import config
    from dxcli.jobs.stages import run_prpo_stage

    run = work / "prpo"
    model = run_prpo_stage(out=run, resolved=config.resolve("cpu-tiny", prpo_sets(args)), model=str(instruct),
                           data=data, force=True, say=quiet)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return model, rows


# ---------------------------------------------------------------------- evaluation


def greedy_eval(model: Path, questions: Path, data: Path, out: Path) -> dict[str, float]:
    """Greedy answers on the test questions: F1, invalid rate, final-paragraph consistency."""
    from dxcli import config
    from dxcli.jobs.stages import run_infer
    from dxcli.evaluation.score import score_file
    from dxcli.base.jsonio import iter_jsonl
    from dxcli.rl.rewards import score_response

    out.unlink(missing_ok=True)
    run_infer(model=str(model), questions=questions, images=data, out=out, config=config.resolve("cpu-tiny").config)
    overall = score_file(out)["overall"]
    scores = [score_response(row["text"] or "") for row in iter_jsonl(out)]
    final_pcr = [s.pcr[s.final_index] for s in scores]
    return {"f1": overall["f1"], "accuracy": overall["accuracy"], "invalid_rate": overall["invalid_rate"],
            "final_pcr": sum(final_pcr) / len(final_pcr)}


def sampled_eval(model: Path, data: Path, args: argparse.Namespace) -> dict[str, float]:
    """G samples per test image at the training temperature, scored by the PRPO rollout itself
    (the definitions of metrics.jsonl), with fixed seeds: far less noisy than a few training steps."""
    from dxcli import config
    from dxcli.rl.rewards import load_lexicon

    cfg = config.resolve("cpu-tiny", [*prpo_sets(args), "prpo.algo=prpo"]).config.prpo
    return sampled_rollouts(model, data, cfg, load_lexicon())[0]


def sampled_rollouts(model: Path, data: Path, cfg, lexicon, seed_offset: int = 0,
                     chunk: int = 16) -> tuple[dict[str, float], list[str]]:
    """PRPO rollouts (`cfg`: a prpo section) of every test image, `chunk` images at a time with
    seed `seed_offset + start`: the EVAL_KEYS means over the images, and every response text."""
    import torch

    from dxcli.base.images import load_rgb
    from dxcli.data.questions import generate_questions
    from dxcli.model.checkpoint import load_checkpoint
    from dxcli.training.prpo import rollout

    torch.set_num_threads(1)
    bundle = load_checkpoint(model)
    questions = generate_questions(data, n=None, seed=0, balanced=False, split="test")[0]
    totals, texts = dict.fromkeys(EVAL_KEYS, 0.0), []
    for start in range(0, len(questions), chunk):
        batch = questions[start:start + chunk]
        roll = rollout(bundle, [load_rgb(data / q["image"]) for q in batch], [q["text"] for q in batch],
                       [q["label"] for q in batch], cfg=cfg, clip=None, lexicon=lexicon, seed=seed_offset + start)
        for key in EVAL_KEYS:
            totals[key] += float(roll.stats[key]) * len(batch)  # accuracies are Ratios
        texts += roll.texts
    return {key: value / len(questions) for key, value in totals.items()}, texts


def window_mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if key in r]
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------------- report


def print_table(title: str, keys: tuple[str, ...], rows: dict[str, dict[str, float | None]]) -> None:
    widths = [max(16, len(k) + 2) for k in keys]
    print(f"\n{title:<22}" + "".join(f"{k:>{w}}" for k, w in zip(keys, widths)))
    for name, values in rows.items():
        cells = [values.get(k) for k in keys]
        print(f"{name:<22}" + "".join(f"{'-':>{w}}" if v is None else f"{v:>{w}.3f}" for v, w in zip(cells, widths)))


def main() -> int:
    args = parse_args()
    started = time.time()
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)

        t = time.time()
        data, instruct = build_weak_instruct(work, args)
        seconds["data+align+instruct"] = time.time() - t

        from dxcli.data.questions import generate_questions
        from dxcli.base.jsonio import write_jsonl_atomic

        questions = work / "questions.jsonl"
        write_jsonl_atomic(questions, generate_questions(data, n=None, seed=0, balanced=False, split="test")[0])
        t = time.time()
        greedy_before = greedy_eval(instruct, questions, data, work / "answers-before.jsonl")
        sampled_before = sampled_eval(instruct, data, args)
        seconds["eval before"] = time.time() - t

        t = time.time()
        model, rows = run_prpo(work, data, instruct, args)
        seconds[args.algo] = time.time() - t

        t = time.time()
        greedy_after = greedy_eval(model, questions, data, work / "answers-after.jsonl")
        sampled_after = sampled_eval(model, data, args)
        seconds["eval after"] = time.time() - t

    windows = {"step 0": rows[:1], "first 5": rows[:5], "last 5": rows[-5:]}
    training = {name: {k: window_mean(part, k) for k in ROLLOUT_KEYS} for name, part in windows.items()}
    print(f"\n{args.algo.upper()} from a weak instruct ({args.instruct_steps} steps): {len(rows)} steps, "
          f"G={args.group_size}, {args.images_per_step} images/step, lr={args.lr}, T={args.temperature}, "
          f"top_p={args.top_p}, max_new_tokens={args.max_new_tokens}, VCR off, final_credit={args.final_credit}, "
          f"updates/rollout={args.updates_per_rollout}; "
          f"{time.time() - started:.0f} s in all")
    print_table("training rollouts", ROLLOUT_KEYS, training)
    print_table("test, sampled", EVAL_KEYS, {"before": sampled_before, "after": sampled_after})
    print_table("test, greedy", tuple(greedy_before), {"before": greedy_before, "after": greedy_after})
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    print(json.dumps({"bench": "prpo_learning", "algo": args.algo, "final_credit": args.final_credit, "steps": len(rows),
                      "lr": args.lr, "group_size": args.group_size, "images_per_step": args.images_per_step,
                      "temperature": args.temperature, "top_p": args.top_p, "instruct_steps": args.instruct_steps,
                      "updates_per_rollout": args.updates_per_rollout,
                      "training": training, "sampled_before": sampled_before, "sampled_after": sampled_after,
                      "greedy_before": greedy_before, "greedy_after": greedy_after,
                      "seconds": {k: round(v, 1) for k, v in seconds.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
