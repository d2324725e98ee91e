"""The paper's table in miniature: leave-one-domain-out SFT, then test-time RL on the held-out domain.

Run: python tests/bench/bench_paper_table.py [--domains diffusion,banding] [--seeds 0,1,2] [--parallel 2]
     [--steps 30] [--max-new-tokens 128] [--final-credit verdict] [--work DIR] [--verbose]

For each seed S and held-out domain D of the hard demo data (`dx dataset demo --hard --seed S`):

1. SFT on the other domains: `loo_sft.loo_sft` (align + instruct, the same `dx` commands and
   work-folder layout as `tests/bench/loo_sft.py`, so a loo_sft.py `--work` folder resumes here).
2. RL from that SFT checkpoint, `dx train prpo` (cpu-tiny, `hardware.threads=1`, VCR off: the
   reward is PCR alone; `--set prpo.clip=FOLDER` turns VCR on), `--steps` steps each:
   - `grpo-maj`: `--algo grpo --labels majority --split test --domain D` (test-time RL, TTRL-style
     majority pseudo-labels on D's unlabeled test images);
   - `prpo-maj`: `--algo prpo --labels majority --split test --domain D` (PRPO uses no label);
   - `prpo-gt`:  `--algo prpo --labels gt --split train --domain <the other domains>` (RL on the
     SFT training domains with labels, then tested on D).
3. `dx eval infer` (greedy) of SFT and each RL model on D's test questions
   (`dx questions gen DATA --split test --domain D`); F1 (fake positive, no verdict = wrong),
   accuracy, invalid rate, binary-head AUC (the head is frozen in RL, so it repeats the SFT
   figure) and reasoning consistency = final-paragraph PCR of the greedy answers (1 when the
   verdict agrees with the majority of the earlier paragraphs' evidence, 0 otherwise or with no
   verdict; `dxcli.rl.rewards.score_response`, the definitions `dx eval rewards --no-clip` uses).

Prints one row per method, domain and seed, then mean and spread (population std) over the seeds,
and ends with one JSON line. Every step whose output exists is skipped: an interrupted run resumes
with the same --work. `--parallel` held-out runs go at once, each on one thread. Time (2-core
machine, `--parallel 2`): about 3.5 min of SFT and eval plus 2-3 min of RL and evals per held-out
domain and seed, so the default (2 domains, 3 seeds) takes about 20 minutes (tests/bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loo_sft import DOMAINS_HARD, Runner, _fmt, fake_variants, loo_sft, recall_by_variant  # noqa: E402

METHODS = ("sft", "grpo-maj", "prpo-maj", "prpo-gt")
METRICS = ("f1", "maj_f1", "accuracy", "invalid_rate", "head_auc", "final_pcr", "evidence_disagree",
           "evidence_right", "recall_shared", "recall_private")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", default="diffusion,banding",
                        help="held-out domains, comma-separated (default: the two lowest SFT F1 in the README)")
    parser.add_argument("--seeds", default="1,2,3",
                        help="demo data seeds, comma-separated (default: the test-time RL protocol's report "
                             "seeds; seed 0 is its validation seed)")
    parser.add_argument("--methods", default=",".join(METHODS[1:]), help="RL rows, comma-separated")
    parser.add_argument("--steps", type=int, default=30, help="train.max_steps of each RL run")
    parser.add_argument("--lr", type=float, default=1e-5,
                        help="prpo.lr (the test-time RL protocol's choice on validation seed 0: tests/bench/README.md)")
    parser.add_argument("--group-size", type=int, default=4, help="prpo.group_size (G)")
    parser.add_argument("--images-per-step", type=int, default=2, help="prpo.images_per_step")
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="prpo.max_new_tokens (demo reasoning is 43-83 tokens with the tiny tokenizer)")
    parser.add_argument("--final-credit", choices=("paragraph", "verdict"), default="verdict",
                        help="prpo.final_credit (verdict: see the PRPO learning bench in tests/bench/README.md)")
    parser.add_argument("--tag", default="",
                        help="suffix of the RL run folders and answer files (another RL setting beside the first)")
    parser.add_argument("--samples", type=int, default=4,
                        help="G of maj@G: sampled answers per test image, at the RL rollouts' temperature and top_p")
    parser.add_argument("--profile", default="cpu-tiny")
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="extra --set for SFT, RL and eval (hardware.threads=1 is always set); "
                             "VCR on: --set prpo.clip=FOLDER (e.g. tests/bench/train_demo_clip.py's --out), "
                             "read by the RL runs only (an existing SFT checkpoint is reused, not retrained)")
    parser.add_argument("--work", type=Path, default=None, help="work folder, kept and reused (default: a temp folder)")
    parser.add_argument("--parallel", type=int, default=2,
                        help="held-out domain runs at once (one thread each; 2 on a 2-core machine)")
    parser.add_argument("--verbose", action="store_true", help="print each dx command and its output")
    args = parser.parse_args(argv)
    args.easy = False  # loo_sft's flag: always the hard demo here
    return args


def rl_sets(args: argparse.Namespace, algo: str) -> list[str]:
    return ["hardware.num_workers=0", "train.log_every=1", "prpo.epochs=100", f"train.max_steps={args.steps}",
            f"prpo.algo={algo}", f"prpo.lr={args.lr}", f"prpo.group_size={args.group_size}",
            f"prpo.images_per_step={args.images_per_step}", f"prpo.max_new_tokens={args.max_new_tokens}",
            f"hardware.micro_batch={args.group_size * args.images_per_step}",
            f"prpo.final_credit={args.final_credit}"]


def rl_command(method: str, data: Path, domain: str, domains_all: list[str]) -> list[str]:
    algo, labels = method.split("-")
    labels = {"maj": "majority", "gt": "gt"}[labels]
    if labels == "gt":  # the SFT training domains, their train split, with labels
        where = ["--split", "train", *[x for d in domains_all if d != domain for x in ("--domain", d)]]
    else:  # the held-out domain's unlabeled test images
        where = ["--split", "test", "--domain", domain]
    return ["--algo", algo, "--labels", labels, *where]


def evaluate(answers: Path, variants: dict[str, str], samples: list[Path], min_share: float) -> dict:
    """Greedy answers on one domain: F1, accuracy, invalid rate, head AUC, final-paragraph PCR,
    the recall of the fakes of each generator variant (shared with the training domains or private
    to the held-out one); maj@G F1 from the `samples` answer files; and the evidence check."""
    from dxcli.evaluation.score import load_answers, score_rows
    from dxcli.rl.rewards import score_response

    rows = load_answers(answers)
    overall = score_rows(rows)["overall"]
    scores = [score_response(row.get("text") or "", keywords=False) for row in rows]
    final_pcr = [s.pcr[s.final_index] for s in scores]
    return {"f1": overall.get("f1"), "maj_f1": majority_f1(rows, samples, min_share), "accuracy": overall.get("accuracy"),
            "invalid_rate": overall.get("invalid_rate"), "head_auc": overall.get("head_auc"),
            "final_pcr": sum(final_pcr) / len(final_pcr), **evidence_check(rows, scores),
            **recall_by_variant(rows, variants), "n": len(rows)}


def majority_f1(rows: list[dict], samples: list[Path], min_share: float) -> float | None:
    """F1 of the majority verdict of G sampled answers per question (maj@G), with the pseudo-label
    rule RL uses (more than `min_share`, prpo.majority_min_share, of all G samples, invalid ones
    counting against it; else no verdict, which scores as wrong): what sampling knows that greedy
    decoding may not say."""
    from dxcli.evaluation.score import load_answers, score_rows
    from dxcli.rl.objective import majority_answer

    if not samples:
        return None
    sampled = [{row["question_id"]: row.get("predict") for row in load_answers(path)} for path in samples]
    voted = [{**row, "predict": majority_answer([s.get(row["question_id"]) for s in sampled], min_share)[0]}
             for row in rows]
    return score_rows(voted)["overall"].get("f1")


def evidence_check(rows: list[dict], scores: list) -> dict:
    """Greedy responses whose earlier paragraphs' evidence (PCR's paragraph labels) names the other
    verdict: their share, and among them the share where the evidence, not the verdict, is right."""
    from dxcli.rl.rewards import majority_label

    disagree = right = 0
    for row, score in zip(rows, scores):
        evidence = majority_label(score.labels[:score.final_index])
        if score.answer is None or evidence is None or evidence == score.answer:
            continue
        disagree += 1
        right += int(evidence == row.get("label"))
    return {"evidence_disagree": disagree / max(len(rows), 1),
            "evidence_right": right / disagree if disagree else None}


def rl_log(run_dir: Path) -> dict:
    """Training-rollout figures from metrics.jsonl: first and last 5 steps."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "reward" in r]
    out = {}
    for key in ("final_pcr", "invalid_rate", "answer_accuracy", "pseudo_label_accuracy", "response_tokens"):
        for name, part in (("first5", rows[:5]), ("last5", rows[-5:])):
            values = [r[key] for r in part if r.get(key) is not None]
            if values:
                out[f"{key}_{name}"] = round(sum(values) / len(values), 4)
    return out


def one_domain(run: Runner, data: Path, seed: int, work: Path, domain: str, domains_all: list[str],
               methods: list[str], args: argparse.Namespace) -> list[dict]:
    sets = [item for s in (["hardware.threads=1"] + args.sets) for item in ("--set", s)]
    common = ["--profile", args.profile, *sets]
    sft = loo_sft(run, data, work, domain, args)  # align + instruct (+ its all-domain eval)
    questions = work / f"questions-{domain}.jsonl"
    if not questions.is_file():
        run.dx("questions", "gen", str(data), "--out", str(questions), "--split", "test", "--domain", domain)
    models = {"sft": work / "instruct"}
    seconds = {"sft": sft["train_s"] or None}  # None: trained in an earlier invocation
    logs: dict[str, dict] = {}
    for method in [m for m in methods if m != "sft"]:
        out = work / f"rl-{method}{args.tag}"
        if not (out / "model" / "config.json").is_file():
            t = time.time()
            algo = method.split("-")[0]
            run.dx("train", "prpo", "--data", str(data), "--model", str(work / "instruct"), "--out", str(out),
                   "--force", *rl_command(method, data, domain, domains_all), *common,
                   *[x for s in rl_sets(args, algo) for x in ("--set", s)])
            seconds[method] = round(time.time() - t, 1)
        models[method] = out / "model"
        logs[method] = rl_log(out)
    rows, variants = [], fake_variants(data, seed)
    from dxcli import config

    prpo = config.resolve(args.profile, args.sets).config.prpo  # the RL's sampling and pseudo-label rule
    for method, model in models.items():
        stem = work / f"answers-{domain}-{method}{'' if method == 'sft' else args.tag}"
        answers = infer_once(run, model, questions, data, stem.with_name(f"{stem.name}.jsonl"), common)
        samples = sampled_answers(run, model, questions, data, stem, common, prpo, args.samples)
        rows.append({"method": method, "held_out": domain,
                     **evaluate(answers, variants, samples, prpo.majority_min_share),
                     "sft_collapsed": sft["collapsed"],
                     "seconds": seconds.get(method), "rollouts": logs.get(method, {})})
    return rows


def infer_once(run: Runner, model: Path, questions: Path, data: Path, out: Path, common: list[str],
               extra: tuple[str, ...] = ()) -> Path:
    """`dx eval infer` into `out` unless an earlier invocation finished it (a partial file never counts)."""
    if not out.is_file():
        partial = out.with_suffix(".partial.jsonl")
        partial.unlink(missing_ok=True)
        run.dx("eval", "infer", "--model", str(model), "--questions", str(questions), "--images", str(data),
               "--out", str(partial), *extra, *common)
        partial.rename(out)
    return out


def sampled_answers(run: Runner, model: Path, questions: Path, data: Path, stem: Path, common: list[str],
                    prpo: Any, samples: int) -> list[Path]:
    """`samples` answer files of `model`, each one sample per question at the RL rollouts'
    temperature and top_p (`prpo`: the profile's prpo section with the run's --set), seeds 0..G-1."""
    sampling = ("--temperature", str(prpo.temperature), "--set", f"eval.top_p={prpo.top_p}")
    # the sampling settings in the name: files of another T or top_p are never reused
    return [infer_once(run, model, questions, data,
                       stem.with_name(f"{stem.name}-t{prpo.temperature:g}-p{prpo.top_p:g}-sample{k}.jsonl"), common,
                       (*sampling, "--set", f"eval.seed={k}")) for k in range(samples)]


def vcr_setting(args: argparse.Namespace) -> str:
    """What the run's last `--set prpo.clip=...` says: the CLIP that scores VCR, or VCR off."""
    clips = [s.split("=", 1)[1] for s in args.sets if s.startswith("prpo.clip=")]
    return f"VCR on (prpo.clip={clips[-1]})" if clips and clips[-1] not in ("", "null", "None") else "VCR off"


def spread(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else None)


def print_tables(rows: list[dict], domains: list[str], methods: list[str]) -> dict:
    head = f"{'method':9s} {'held-out':10s} {'seed':>4s}" + "".join(f"{m:>13s}" for m in METRICS)
    print("\n" + head)
    for row in rows:
        print(f"{row['method']:9s} {row['held_out']:10s} {row['seed']:>4d}"
              + "".join(f"{_fmt(row[m]):>13s}" for m in METRICS)
              + ("  SFT collapsed: one verdict for every image" if row.get("sft_collapsed") else ""))
    summary: dict[str, dict] = {}
    print(f"\nmean ± std over seeds\n{'method':9s} {'held-out':10s} {'seeds':>5s}" + "".join(f"{m:>15s}" for m in METRICS))
    for method in methods:
        for domain in [*domains, "all", "learned"]:
            part = [r for r in rows if r["method"] == method and (domain in ("all", "learned") or r["held_out"] == domain)
                    and not (domain == "learned" and r.get("sft_collapsed"))]
            if not part:
                continue
            cells, entry = [], {"n": len(part)}
            for m in METRICS:
                mean, std = spread([r[m] for r in part])
                entry[m] = {"mean": mean, "std": std}
                cells.append(_fmt(mean) + ("" if std is None else f"±{std:.3f}"))
            summary.setdefault(method, {})[domain] = entry
            print(f"{method:9s} {domain:10s} {len(part):>5d}" + "".join(f"{c:>15s}" for c in cells))
    print("learned: all held-out domains, leaving out the seeds whose SFT collapsed")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    domains = [d for d in args.domains.split(",") if d]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    methods = ["sft", *[m for m in args.methods.split(",") if m]]
    unknown = set(methods) - set(METHODS) | set(domains) - set(DOMAINS_HARD)
    if unknown:
        raise SystemExit(f"unknown method or domain: {sorted(unknown)}")
    work = args.work or Path(tempfile.mkdtemp(prefix="dx-table-"))
    run = Runner(args.verbose)
    started = time.time()
    for seed in seeds:  # the data first: parallel jobs of one seed share it
        data = work / f"data-hard-{seed}"
        if not (data / "reasoning.jsonl").is_file():
            run.dx("dataset", "demo", str(data), "--seed", str(seed), "--force", "--hard")

    def job(seed: int, domain: str) -> list[dict]:
        t, data = time.time(), work / f"data-hard-{seed}"
        rows = one_domain(run, data, seed, work / f"{data.name}-loo-{domain}", domain, list(DOMAINS_HARD), methods,
                          args)
        for row in rows:
            row["seed"] = seed
            print(f"seed {seed} held-out {domain:10s} {row['method']:9s} F1 {_fmt(row['f1'])}  "
                  f"maj@G F1 {_fmt(row['maj_f1'])}  "
                  f"acc {_fmt(row['accuracy'])}  invalid {_fmt(row['invalid_rate'])}  "
                  f"final PCR {_fmt(row['final_pcr'])}", flush=True)
        print(f"seed {seed} held-out {domain}: {time.time() - t:.0f} s this run", flush=True)
        return rows

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:  # each job runs dx in subprocesses
        futures = [pool.submit(job, seed, domain) for seed in seeds for domain in domains]
        rows = [row for future in futures for row in future.result()]
    print(f"\nRL: {args.steps} steps, G={args.group_size}, {args.images_per_step} images/step, lr={args.lr}, "
          f"max_new_tokens={args.max_new_tokens}, final_credit={args.final_credit}, {vcr_setting(args)}; "
          f"{time.time() - started:.0f} s this invocation (finished steps skipped)")
    summary = print_tables(rows, domains, methods)
    print(json.dumps({"bench": "paper_table", "work": str(work), "tag": args.tag, "vcr": vcr_setting(args), "domains": domains, "seeds": seeds,
                      "steps": args.steps, "lr": args.lr, "group_size": args.group_size,
                      "images_per_step": args.images_per_step, "max_new_tokens": args.max_new_tokens,
                      "final_credit": args.final_credit, "rows": rows, "summary": summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
