"""`dx detect`, cold start: whole-process time of one image, and where it goes.

Whole process: `python -m dxcli detect IMAGE --model M --json [--no-reasoning]`, wall clock from
spawn to exit, median of --repeats. Phases, each in a fresh process: interpreter start, the CLI
import, the model stack import (torch, transformers, timm), model load (full checkpoint, and the
image side only that `--no-reasoning` now loads), encode (image decode + preprocessing + tower +
head), generate (greedy, --max-new-tokens). With --big, the same on a random checkpoint whose LLM
is larger (hidden 2048, --big-layers layers), to show what skipping the LLM saves as it grows.

Run: python tests/bench/bench_detect.py [--model M] [--repeats 3] [--big] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASES = r"""
import json, sys, time
marks = [(time.perf_counter(), time.process_time())]
import dxcli.cli.main  # what `dx` imports before parsing: typer, rich, the command modules
marks.append((time.perf_counter(), time.process_time()))
from dxcli.evaluation.detect import open_detector  # torch, transformers, timm, the model classes
from dxcli import config
marks.append((time.perf_counter(), time.process_time()))
reasoning = sys.argv[3] == "reasoning"
bundle = open_detector(sys.argv[1], config.resolve("cpu-tiny", []).config, reasoning=reasoning)
marks.append((time.perf_counter(), time.process_time()))
from dxcli.base.images import load_rgb
from dxcli.model.generate import encode_images, generate
image = load_rgb(sys.argv[2])
encode_images(bundle, [image])
marks.append((time.perf_counter(), time.process_time()))
if reasoning:
    generate(bundle, [image], ["Is this image real or fake?"], max_new_tokens=int(sys.argv[4]))
marks.append((time.perf_counter(), time.process_time()))
names = ["cli_import", "model_stack_import", "load", "encode", "generate"]
wall = {n: b[0] - a[0] for n, a, b in zip(names, marks, marks[1:])}
cpu = {n + "_cpu": b[1] - a[1] for n, a, b in zip(names, marks, marks[1:])}
print(json.dumps({**wall, **cpu}))
"""


def timed(command: list[str]) -> tuple[float, str, float, float]:
    """(wall seconds, stdout, peak resident memory in MB, CPU seconds) of one child process.
    CPU seconds (user + system) move less than wall time when other work shares the machine."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not all children's
        seconds = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode:
            raise SystemExit(f"failed ({child.returncode}): {' '.join(command)[:200]}")
        out.seek(0)
        return seconds, out.read().decode(), usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def evict(model: Path) -> None:
    """Drop the checkpoint's weight files (only those) from the page cache, so a load reads the disk
    as on a first run; other files and processes are untouched."""
    for file in Path(model).glob("*.safetensors"):
        with file.open("rb") as handle:
            os.fsync(handle.fileno())
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def measure(model: Path, image: Path, repeats: int, max_new_tokens: int) -> dict[str, dict[str, float]]:
    """Per mode: whole-process seconds and the phases (medians of `repeats` fresh processes)."""
    results = {}
    for mode in ("reasoning", "no-reasoning"):
        flags = ["--no-reasoning"] if mode == "no-reasoning" else ["--max-new-tokens", str(max_new_tokens)]
        whole = [timed([sys.executable, "-m", "dxcli", "detect", str(image), "--model", str(model), "--json",
                        *flags]) for _ in range(repeats)]
        phases = [json.loads(timed([sys.executable, "-c", PHASES, str(model), str(image), mode,
                                    str(max_new_tokens)])[1].splitlines()[-1]) for _ in range(repeats)]
        results[mode] = {"whole_process": statistics.median(w[0] for w in whole),
                         "whole_process_cpu": statistics.median(w[3] for w in whole), **median_of(phases),
                         "peak_mb": statistics.median(w[2] for w in whole)}
    start = [timed([sys.executable, "-c", "pass"])[0] for _ in range(repeats)]  # python itself
    for mode in results:
        results[mode]["interpreter_start"] = statistics.median(start)
    return results


def load_seconds(model: Path, repeats: int) -> dict[str, dict[str, float]]:
    """Model load alone, full checkpoint vs image side, each in a fresh process after the weights
    were evicted from the page cache: seconds (lazy imports the load triggers included) and peak MB."""
    code = ("import sys, time; from dxcli.model import checkpoint as c; t = time.perf_counter(); "
            "getattr(c, sys.argv[2])(sys.argv[1]); print(time.perf_counter() - t)")
    results = {}
    for name in ("load_checkpoint", "load_image_side"):
        runs = []
        for _ in range(repeats):
            evict(model)
            _, out, peak, _ = timed([sys.executable, "-c", code, str(model), name])
            runs.append({"seconds": float(out.split()[-1]), "peak_mb": peak})
        results[name] = median_of(runs)
    return results


def tiny_model(work: Path) -> tuple[Path, Path]:
    from dxcli import config
    from dxcli.data.demo import make_demo
    from dxcli.jobs.stages import run_sft_stage

    data = work / "data"
    if not data.exists():
        make_demo(data, seed=0, n_train=100, n_val=8, n_test=8)
    model = work / "instruct" / "model"
    if not model.exists():
        quiet = lambda *_: None  # noqa: E731
        align = run_sft_stage("align", out=work / "align", data=data, say=quiet, force=True,
                              resolved=config.resolve("cpu-tiny", ["train.max_steps=10"]))
        run_sft_stage("instruct", out=work / "instruct", data=data, model=str(align), say=quiet, force=True,
                      resolved=config.resolve("cpu-tiny", ["train.max_steps=20"]))
    return model, sorted(data.glob("*/test/fake/*.png"))[0]


def big_model(work: Path, layers: int) -> Path:
    """A random checkpoint with a larger LLM (hidden 2048): load times only, its answers mean nothing."""
    from dxcli import config
    from dxcli.model.build import build_tiny
    from dxcli.model.checkpoint import save_checkpoint

    path = work / f"big-{layers}"
    if not (path / "config.json").exists():
        cfg = config.resolve("cpu-tiny", [f"model.tiny.num_layers={layers}", "model.tiny.hidden_size=2048",
                                          "model.tiny.intermediate_size=5504", "model.tiny.num_heads=16"]).config
        save_checkpoint(build_tiny(cfg.model, ["real fake texture lighting edges"] * 50), path)
    return path


def report(model: Path, results: dict[str, dict[str, float]], repeats: int) -> dict[str, dict[str, float]]:
    size = sum(f.stat().st_size for f in Path(model).glob("*.safetensors")) / 1e6
    print(f"{model} ({size:.1f} MB weights), medians of {repeats} fresh processes: wall and CPU seconds")
    print(f"{'':>22} {'reasoning':>10} {'(cpu)':>7} {'no-reasoning':>13} {'(cpu)':>7}")
    for key in ("whole_process", "interpreter_start", "cli_import", "model_stack_import", "load", "encode",
                "generate"):
        cells = [results[mode].get(name) for mode in results for name in (key, key + "_cpu")]
        print(f"{key:>22} " + " ".join(f"{'' if c is None else f'{c:.2f}':>{w}}" for c, w in zip(cells, (10, 7, 13, 7))))
    print(f"{'peak MB':>22} {results['reasoning']['peak_mb']:>10.0f} {'':>7} {results['no-reasoning']['peak_mb']:>13.0f}")
    return results


def report_big(work: Path, layers: int, repeats: int) -> dict:
    big = big_model(work, layers)
    size = sum(f.stat().st_size for f in big.glob("*.safetensors")) / 1e9
    loads = load_seconds(big, repeats)
    print(f"{big.name} ({size:.2f} GB weights, evicted from the page cache before each load):")
    for name, figures in loads.items():
        print(f"{name:>22} {figures['seconds']:>6.2f} s {figures['peak_mb']:>8.0f} MB peak")
    return {"gb": size, **loads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="checkpoint to time (default: a tiny one trained here)")
    parser.add_argument("--image", type=Path, help="image to check (default: a demo test image)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--big", action="store_true", help="also time loads of a checkpoint with a larger LLM")
    parser.add_argument("--big-layers", type=int, default=8)
    parser.add_argument("--skip-small", action="store_true", help="with --big: only the larger checkpoint's loads")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    if args.model is not None and args.image is None:
        parser.error("--model needs --image")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dx-bench-detect-"))
    line: dict = {"bench": "detect"}
    if not args.skip_small:
        model, image = tiny_model(work) if args.model is None else (args.model, args.image)
        line.update(model=str(model), results=report(model, measure(model, image, args.repeats, args.max_new_tokens),
                                                     args.repeats))
    if args.big:
        line["big"] = report_big(work, args.big_layers, args.repeats)
    # timings of cold processes swing with what else runs: say how busy the machine was
    line["cpus"], line["load_average"] = os.cpu_count(), os.getloadavg()
    print(f"{line['cpus']} CPUs, load average {line['load_average'][0]:.1f} (1 min) at the end")
    print(json.dumps(line))


if __name__ == "__main__":
    main()
