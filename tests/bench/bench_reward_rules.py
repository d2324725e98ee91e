"""Which PCR rules should PRPO train with? Every rule variant trains the same weak instruct
checkpoint, over several seeds, and one fixed yardstick judges them all.

Run: python tests/bench/bench_reward_rules.py [--variants old,verdict,...] [--seeds 0,1,2] [--steps 60]
     [--work DIR] [--parallel 2]

The setting is `bench_prpo_learning.py`'s (demo data, align, an instruct run cut short at 80
steps so many sampled answers are invalid or inconsistent, cpu-tiny, VCR off, PRPO with the
reward PCR alone); the seed is the PRPO run's `train.seed` (its sampling and data order), the
instruct checkpoint is shared. Each variant spells out every rule, so the table means the same
thing whatever the shipped defaults are:

- `final_credit`: which tokens carry the final paragraph's advantage (METHOD.md §11);
- `pcr_no_majority`: the final paragraph's PCR when earlier paragraphs tie or give no votes;
- the lexicon's `negation_window` / `negation_unit`, `section_titles` and `verdict_words` (§9).

The yardstick, the same for every variant, is rule-independent where it can be: invalid rate,
answer accuracy and response length of G samples per test image, greedy F1, and the share of
non-final paragraphs that use a verdict word ("real", "fake": restating the verdict, the cheap way
to earn PCR under `verdict_words: true`). Consistency (final-paragraph PCR) is judged with the
strictest reading, `JUDGE` below: verdict words and titles are no evidence, a 4-word window, and
a tie or no votes scores 0.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

OLD = {"final_credit": "paragraph", "pcr_no_majority": 0.0, "negation_window": 3, "negation_unit": "words",
       "section_titles": True, "verdict_words": True}
VARIANTS = {
    "old": {},
    "verdict": {"final_credit": "verdict"},
    "verdict+tie1": {"final_credit": "verdict", "pcr_no_majority": 1.0},
    "verdict+no-titles": {"final_credit": "verdict", "section_titles": False},
    "verdict+no-verdict-words": {"final_credit": "verdict", "verdict_words": False},
    "verdict+window4": {"final_credit": "verdict", "negation_window": 4},
    "verdict+chars80": {"final_credit": "verdict", "negation_window": 80, "negation_unit": "chars"},
    "new": {"final_credit": "verdict", "verdict_words": False, "section_titles": False, "negation_window": 4},
}
JUDGE = {**OLD, "section_titles": False, "verdict_words": False, "negation_window": 4}
LEXICON_KEYS = ("negation_window", "negation_unit", "section_titles", "verdict_words")
VERDICT_WORD = re.compile(r"\b(?:real|fake)s?\b", re.IGNORECASE)
REPORT_KEYS = ("final_pcr_judge", "invalid_rate", "answer_accuracy", "response_tokens", "restating",
               "greedy_f1", "greedy_invalid", "zero_adv")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="0,1,2", help="PRPO train.seed values, comma-separated")
    parser.add_argument("--steps", type=int, default=60, help="PRPO steps per run")
    parser.add_argument("--lr", type=float, default=5e-5, help="prpo.lr")
    parser.add_argument("--work", type=Path, default=Path("bench-reward-rules"),
                        help="work folder, kept: finished runs are reused")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once (one thread each)")
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    return args


def rules_of(variant: str) -> dict:
    return {**OLD, **VARIANTS[variant]}


def lexicon_file(rules: dict, folder: Path) -> Path:
    """The shipped lexicon with `rules`' lexicon keys set, written beside the run."""
    from importlib import resources

    data = yaml.safe_load(resources.files("dxcli.rl").joinpath("lexicon.yaml").read_text(encoding="utf-8"))
    data.update({key: rules[key] for key in LEXICON_KEYS})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "lexicon.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def rule_sets(rules: dict, folder: Path) -> list[str]:
    return [f"prpo.final_credit={rules['final_credit']}", f"prpo.pcr_no_majority={rules['pcr_no_majority']}",
            f"prpo.lexicon={lexicon_file(rules, folder)}"]


# ---------------------------------------------------------------------- one run (a subprocess)


def learning_args(args: argparse.Namespace, seed: int, sets: list[str]) -> argparse.Namespace:
    import bench_prpo_learning as learning

    return learning.parse_args(["--steps", str(args.steps), "--lr", str(args.lr), "--final-credit", "paragraph",
                                *[f"--set={s}" for s in [*sets, f"train.seed={seed}"]]])


def judge(model: Path, data: Path, args: argparse.Namespace) -> dict[str, float]:
    """G samples per test image scored by the JUDGE rules, plus the restating share."""
    import bench_prpo_learning as learning
    from dxcli import config
    from dxcli.rl.paragraphs import split_paragraphs
    from dxcli.rl.rewards import load_lexicon

    sets = [f"prpo.final_credit={JUDGE['final_credit']}", f"prpo.pcr_no_majority={JUDGE['pcr_no_majority']}"]
    cfg = config.resolve("cpu-tiny", [*learning.prpo_sets(learning_args(args, 0, sets)), "prpo.algo=prpo"]).config.prpo
    means, texts = learning.sampled_rollouts(model, data, cfg, load_lexicon(args.work / "judge" / "lexicon.yaml"),
                                             seed_offset=10_000)
    body = [p for text in texts for p in split_paragraphs(text) if not p.is_final]
    return {"final_pcr_judge": means["final_pcr"], "invalid_rate": means["invalid_rate"],
            "answer_accuracy": means["answer_accuracy"], "response_tokens": means["response_tokens"],
            "restating": sum(bool(VERDICT_WORD.search(p.text)) for p in body) / max(len(body), 1)}


def run_one(args: argparse.Namespace, variant: str, seed: int) -> dict:
    import bench_prpo_learning as learning

    folder = args.work / f"{variant}-s{seed}"
    learn = learning_args(args, seed, rule_sets(rules_of(variant), folder))
    learn.keep = args.work / "base"
    data, instruct = learning.build_weak_instruct(learn.keep, learn)
    model, rows = learning.run_prpo(folder, data, instruct, learn)
    result = judge(model, data, args)
    greedy = learning.greedy_eval(model, args.work / "base" / "questions.jsonl", data, folder / "answers.jsonl")
    result.update(greedy_f1=greedy["f1"], greedy_invalid=greedy["invalid_rate"],
                  zero_adv=statistics.mean(r.get("zero_advantage_share", 0.0) for r in rows))
    return result


# ---------------------------------------------------------------------- driver


def prepare_base(args: argparse.Namespace) -> dict:
    """Data, align and the weak instruct (once), the test questions, and the instruct's own figures."""
    import bench_prpo_learning as learning
    from dxcli.base.jsonio import write_jsonl_atomic
    from dxcli.data.questions import generate_questions

    lexicon_file(JUDGE, args.work / "judge")
    learn = learning_args(args, 0, [])
    learn.keep = args.work / "base"
    data, instruct = learning.build_weak_instruct(learn.keep, learn)
    questions = learn.keep / "questions.jsonl"
    if not questions.is_file():
        write_jsonl_atomic(questions, generate_questions(data, n=None, seed=0, balanced=False, split="test")[0])
    done = learn.keep / "before.json"
    if not done.is_file():
        before = judge(instruct, data, args)
        greedy = learning.greedy_eval(instruct, questions, data, learn.keep / "answers-before.jsonl")
        before.update(greedy_f1=greedy["f1"], greedy_invalid=greedy["invalid_rate"], zero_adv=None)
        done.write_text(json.dumps(before))
    return json.loads(done.read_text())


def launch(args: argparse.Namespace, variant: str, seed: int) -> dict:
    """One run in its own process (a fresh model and RNG), or its saved result."""
    result = args.work / f"{variant}-s{seed}" / "result.json"
    if not result.is_file():
        started = time.time()
        cmd = [sys.executable, __file__, "--one", variant, str(seed), "--steps", str(args.steps),
               "--lr", str(args.lr), "--work", str(args.work)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{variant} seed {seed} failed:\n{proc.stderr[-3000:]}")
        print(f"  {variant} seed {seed}: {time.time() - started:.0f} s", flush=True)
    return json.loads(result.read_text())


def summarise(results: dict[str, list[dict]], before: dict) -> None:
    width = max(len(v) for v in results) + 2
    print(f"\n{'variant':<{width}}" + "".join(f"{k:>18}" for k in REPORT_KEYS))
    print(f"{'instruct (before)':<{width}}" + "".join(f"{'-' if before.get(k) is None else f'{before[k]:.3f}':>18}"
                                                  for k in REPORT_KEYS))
    for variant, rows in results.items():
        cells = []
        for key in REPORT_KEYS:
            values = [r[key] for r in rows]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {spread:.3f}")
        print(f"{variant:<{width}}" + "".join(f"{c:>18}" for c in cells))


def main() -> int:
    args = parse_args()
    args.work = args.work.resolve()
    if args.one:
        variant, seed = args.one[0], int(args.one[1])
        result = run_one(args, variant, seed)
        (args.work / f"{variant}-s{seed}" / "result.json").write_text(json.dumps(result))
        return 0
    started = time.time()
    before = prepare_base(args)
    variants, seeds = args.variants.split(","), [int(s) for s in args.seeds.split(",")]
    jobs = [(v, s) for v in variants for s in seeds]
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        done = list(pool.map(lambda job: launch(args, *job), jobs))
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for (variant, _), result in zip(jobs, done):
        results[variant].append(result)
    print(f"\n{len(jobs)} runs ({args.steps} PRPO steps each, seeds {args.seeds}), {time.time() - started:.0f} s; "
          f"judge: {json.dumps(JUDGE)}")
    summarise(results, before)
    print(json.dumps({"bench": "reward_rules", "steps": args.steps, "lr": args.lr, "seeds": seeds, "judge": JUDGE,
                      "variants": {v: rules_of(v) for v in variants}, "before": before, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
