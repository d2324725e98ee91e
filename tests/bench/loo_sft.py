"""Leave-one-domain-out SFT on the demo data: held-out and in-domain F1 per domain and seed.

Run: python tests/bench/loo_sft.py [--domains gan,diffusion,...] [--seeds 0,1] [--easy]
     [--work DIR] [--set key=value ...]

For each seed: `dx dataset demo DATA --hard --seed S` (without --hard with `--easy`). For each
held-out domain D: `dx dataset split DATA --records --out REC --holdout D` (train records from
the other domains), `dx train align` + `dx train instruct` on REC/train.json (cpu-tiny profile,
hardware.threads=1; on the hard data also `HARD_SFT_SETS`, instruct.vision_lr=5e-4),
`dx questions gen DATA --split test` (every domain's test split), `dx eval infer` (greedy text
verdict), `dx eval score --json`. The held-out F1 is D's, the in-domain F1 is the F1 over the
other domains' test images pooled.

Every step is the `dx` command itself, in a subprocess (printed with --verbose); a step whose
output exists is skipped, so an interrupted run resumes with the same --work. Prints a table and
ends with one JSON line. One leave-one-out run is a few minutes on one thread.

The RL rows (GRPO / PRPO from each held-out domain's SFT checkpoint) are tests/bench/bench_paper_table.py, which imports this module.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOMAINS_HARD = ("gan", "diffusion", "banding", "resample")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", default=",".join(DOMAINS_HARD), help="held-out domains, comma-separated")
    parser.add_argument("--seeds", default="0", help="demo data seeds, comma-separated")
    parser.add_argument("--easy", action="store_true", help="the default demo data instead of --hard")
    parser.add_argument("--profile", default="cpu-tiny")
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="extra --set for align and instruct (always: hardware.threads=1, and with the hard "
                             "data instruct.vision_lr=5e-4)")
    parser.add_argument("--work", type=Path, default=None, help="work folder, kept and reused (default: a temp folder)")
    parser.add_argument("--verbose", action="store_true", help="print each dx command and its output")
    return parser.parse_args(argv)


class Runner:
    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.env = env

    def dx(self, *args: str, capture: bool = False) -> str:
        command = [sys.executable, "-m", "dxcli", *args]
        if self.verbose:
            print("$ dx " + shlex.join(args), flush=True)
        result = subprocess.run(command, cwd=REPO, env=self.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if self.verbose and not capture:
            print(result.stdout, end="", flush=True)
        if result.returncode:
            raise SystemExit(f"dx {shlex.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}")
        return result.stdout


# The hard demo's SFT recipe on top of cpu-tiny: the tower learns at a quarter of instruct.lr.
# At the full 2e-3 the random-init tower stays at chance (bin_loss 0.693 throughout) in about
# half the runs on these data (tests/bench/README.md, "Hard demo").
HARD_SFT_SETS = ("instruct.vision_lr=5e-4",)


def sft_sets(args: argparse.Namespace) -> list[str]:
    """The --set list of align, instruct and the all-domain eval."""
    return ["hardware.threads=1", *([] if args.easy else HARD_SFT_SETS), *args.sets]


def loo_sft(run: Runner, data: Path, work: Path, domain: str, args: argparse.Namespace) -> dict:
    """Align + instruct on every domain but `domain`; score every domain's test split."""
    sets = [item for s in sft_sets(args) for item in ("--set", s)]
    common = ["--profile", args.profile, *sets]
    records = work / "records"
    if not (records / "train.json").is_file():
        run.dx("dataset", "split", str(data), "--records", "--out", str(records), "--holdout", domain, "--force")
    started = time.time()
    align, instruct = work / "align", work / "instruct"
    if not (align / "model" / "config.json").is_file():
        run.dx("train", "align", "--data", str(records / "train.json"), "--images", str(data),
               "--out", str(align), "--force", *common)
    if not (instruct / "model" / "config.json").is_file():
        run.dx("train", "instruct", "--data", str(records / "train.json"), "--images", str(data),
               "--model", str(align), "--out", str(instruct), "--force", *common)
    train_s = time.time() - started
    questions, answers = work / "questions.jsonl", work / "answers.jsonl"
    if not questions.is_file():
        run.dx("questions", "gen", str(data), "--out", str(questions), "--split", "test")
    if not answers.is_file():
        run.dx("eval", "infer", "--model", str(instruct), "--questions", str(questions), "--images", str(data),
               "--out", str(answers), *common)
    score = json.loads(run.dx("eval", "score", str(answers), "--json", capture=True).strip().splitlines()[-1])
    return {"held_out": domain, "train_s": round(train_s, 1), **summarise(answers, domain), "score": score}


def fake_variants(data: Path, seed: int) -> dict[str, str]:
    """Test-split fake image -> "shared" | "private", the generator variant it was drawn with
    (`dxcli.data.demo_render.hard_fake_trace`), for a `dx dataset demo --hard --seed S` folder."""
    from PIL import Image

    from dxcli.data import demo, demo_render

    counts = {split: len(list((data / "gan" / split).glob("*/*.png"))) for split in ("train", "val", "test")}
    with Image.open(next((data / "gan" / "test").glob("*/*.png"))) as image:
        size = image.width
    jobs = demo.plan_jobs(seed=seed, counts_per_split=counts, size=size, hard=True)
    return {job.rel: demo_render.hard_fake_trace(job)[0] for job in jobs if job.label == "fake" and job.split == "test"}


def recall_by_variant(rows: list[dict], variants: dict[str, str]) -> dict[str, float | None]:
    """Share of the fakes answered `fake`, per generator variant."""
    out: dict[str, float | None] = {}
    for variant in ("shared", "private"):
        hits = [row.get("predict") == "fake" for row in rows if variants.get(row["image"]) == variant]
        out[f"recall_{variant}"] = sum(hits) / len(hits) if hits else None
    return out


def summarise(answers: Path, held_out: str) -> dict:
    """F1 (fake positive, no verdict = wrong) on the held-out domain and on the other domains
    pooled, with the one scorer (`score_rows`, grouped by a held-out / in-domain field)."""
    from dxcli.evaluation.score import load_answers, score_rows

    rows = load_answers(answers)
    for row in rows:
        row["side"] = "held_out" if row["domain"] == held_out else "in_domain"
    sides = score_rows(rows, by="side")["domains"]
    out = {}
    for side in ("held_out", "in_domain"):
        metrics = sides.get(side, {})
        for key, name in (("f1", "f1"), ("acc", "accuracy"), ("invalid", "invalid_rate"), ("auc", "head_auc")):
            out[f"{side}_{key}"] = metrics.get(name)
    out["per_domain_f1"] = {d: m.get("f1") for d, m in score_rows(rows)["domains"].items()}
    # an SFT run whose vision never learned answers one verdict for every image
    out["collapsed"] = len({row["predict"] for row in rows}) == 1
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    domains = [d for d in args.domains.split(",") if d]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    work = args.work or Path(tempfile.mkdtemp(prefix="dx-loo-"))
    run = Runner(args.verbose)
    rows = []
    for seed in seeds:
        data = work / f"data-{'easy' if args.easy else 'hard'}-{seed}"
        if not (data / "reasoning.jsonl").is_file():
            run.dx("dataset", "demo", str(data), "--seed", str(seed), "--force", *([] if args.easy else ["--hard"]))
        for domain in domains:
            result = loo_sft(run, data, work / f"{data.name}-loo-{domain}", domain, args)
            result["seed"] = seed
            rows.append(result)
            print(f"seed {seed} held-out {domain:10s} held-out F1 {_fmt(result['held_out_f1'])}  "
                  f"in-domain F1 {_fmt(result['in_domain_f1'])}  ({result['train_s']} s training)", flush=True)
    print()
    print(f"{'method':8s} {'seed':>4s} {'held-out':10s} {'F1 held-out':>11s} {'F1 in-domain':>12s} "
          f"{'acc held-out':>12s} {'invalid':>7s} {'head AUC in':>11s}")
    for row in rows:
        print(f"{'SFT':8s} {row['seed']:>4d} {row['held_out']:10s} {_fmt(row['held_out_f1']):>11s} "
              f"{_fmt(row['in_domain_f1']):>12s} {_fmt(row['held_out_acc']):>12s} {_fmt(row['held_out_invalid']):>7s} "
              f"{_fmt(row['in_domain_auc']):>11s}{'  collapsed: one verdict for every image' if row['collapsed'] else ''}")
    learned = [r for r in rows if not r["collapsed"]]
    held = [r["held_out_f1"] for r in learned if r["held_out_f1"] is not None]
    inside = [r["in_domain_f1"] for r in learned if r["in_domain_f1"] is not None]
    if held:
        print(f"{'SFT':8s} {'mean':>4s} {'':10s} {_fmt(sum(held) / len(held)):>11s} "
              f"{_fmt(sum(inside) / len(inside)):>12s}   (over {len(learned)} of {len(rows)} runs: "
              "collapsed ones left out)")
    print(json.dumps({"work": str(work), "difficulty": "easy" if args.easy else "hard",
                      "rows": [{k: v for k, v in r.items() if k != "score"} for r in rows]}))
    return 0


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    raise SystemExit(main())
