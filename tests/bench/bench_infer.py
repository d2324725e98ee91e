"""`dx eval infer` throughput: batch 16 vs one image at a time (how the original code ran).

Same tiny model (trained briefly on the demo data), same questions, greedy decoding, CPU.
Run: python tests/bench/bench_infer.py [--questions 64] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from dxcli import config
from dxcli.data.demo import make_demo
from dxcli.data.questions import generate_questions
from dxcli.jobs.stages import run_infer
from dxcli.base.jsonio import write_jsonl_atomic
from dxcli.jobs.stages import run_sft_stage


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dx-bench-infer-"))
    data = work / "data"
    if not data.exists():
        make_demo(data, seed=0, n_train=100, n_val=8, n_test=40)
    quiet = lambda *_: None  # noqa: E731
    model = work / "instruct" / "model"
    if not model.exists():
        align = run_sft_stage("align", out=work / "align", data=data, say=quiet, force=True,
                              resolved=config.resolve("cpu-tiny", ["train.max_steps=20"]))
        run_sft_stage("instruct", out=work / "instruct", data=data, model=str(align), say=quiet, force=True,
                      resolved=config.resolve("cpu-tiny", []))
    rows, _ = generate_questions(data, n=args.questions, seed=0, balanced=True, split="test")
    questions = work / "questions.jsonl"
    write_jsonl_atomic(questions, rows)

    results = {}
    for batch in (1, 16):
        out = work / f"answers-b{batch}.jsonl"
        out.unlink(missing_ok=True)
        resolved = config.resolve("cpu-tiny", [f"eval.batch_size={batch}"])
        started = time.perf_counter()
        run_infer(model=str(model), questions=questions, images=data, out=out, config=resolved.config)
        seconds = time.perf_counter() - started
        answers = [json.loads(line) for line in out.read_text().splitlines()]
        results[batch] = {"seconds": seconds, "images_per_s": len(answers) / seconds,
                          "texts": [a["text"] for a in answers]}
    same = results[1]["texts"] == results[16]["texts"]
    ratio = results[16]["images_per_s"] / results[1]["images_per_s"]
    print(f"questions: {len(rows)} (greedy, cpu-tiny, includes model load)")
    for batch in (1, 16):
        print(f"batch {batch:>2}: {results[batch]['images_per_s']:.1f} images/s ({results[batch]['seconds']:.1f} s)")
    print(f"speed-up: {ratio:.1f}x; identical texts: {same}")
    print(json.dumps({"bench": "infer", "images": len(rows), "b1_images_per_s": results[1]["images_per_s"],
                      "b16_images_per_s": results[16]["images_per_s"], "ratio": ratio, "identical": same}))


if __name__ == "__main__":
    main()
