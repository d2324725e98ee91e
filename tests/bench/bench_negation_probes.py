"""How each negation rule labels the hand-labelled probes of tests/reward_probes.py.

Run: python tests/bench/bench_negation_probes.py [--words 2,3,4,5,6] [--chars 40,80] [--lexicon FILE]

Scores every probe's label (`dxcli.rl.rewards.paragraph_label`) under the shipped lexicon's terms
and negators (or `--lexicon`'s) with `negation_unit: words` at each `--words` window and
`negation_unit: chars` at each `--chars` window, the other keys as the lexicon sets them. Prints
one row per rule (probes labelled as a careful reader does, and the numbers of the probes it
misses), the probe list, and ends with one JSON line. Instant: no model, no data.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reward_probes import NEGATION_PROBES  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--words", default="2,3,4,5,6", help="word windows, comma-separated")
    parser.add_argument("--chars", default="40,80", help="character windows, comma-separated")
    parser.add_argument("--lexicon", type=Path, default=None, help="lexicon YAML (default: the shipped one)")
    return parser.parse_args(argv)


def score_rules(rules: list[tuple[str, int]], lexicon_path: Path | None) -> list[dict]:
    """One row per (unit, window): how many probes it labels right and which it misses."""
    from dxcli.rl.rewards import load_lexicon, paragraph_label

    base = load_lexicon(lexicon_path)
    rows = []
    for unit, window in rules:
        lexicon = dataclasses.replace(base, negation_unit=unit, negation_window=window)
        labels = [paragraph_label(probe.text, lexicon) for probe in NEGATION_PROBES]
        misses = [i for i, (probe, got) in enumerate(zip(NEGATION_PROBES, labels)) if got != probe.label]
        rows.append({"rule": f"{unit} {window}", "unit": unit, "window": window,
                     "correct": len(NEGATION_PROBES) - len(misses), "misses": misses,
                     "labels": labels})
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rules = [("words", int(n)) for n in args.words.split(",") if n]
    rules += [("chars", int(n)) for n in args.chars.split(",") if n]
    rows = score_rules(rules, args.lexicon)
    total = len(NEGATION_PROBES)
    print(f"{'rule':10s} {'correct':>9s}  misses (probe numbers)")
    for row in rows:
        print(f"{row['rule']:10s} {row['correct']:>4d}/{total:<4d}  {' '.join(map(str, row['misses'])) or '-'}")
    print("\nprobes (human label):")
    for i, probe in enumerate(NEGATION_PROBES):
        print(f"{i:3d} {str(probe.label):5s} {probe.text}")
    print(json.dumps({"bench": "negation_probes", "probes": total,
                      "rules": [{k: row[k] for k in ("rule", "correct", "misses")} for row in rows]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
