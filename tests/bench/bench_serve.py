"""`dx serve` against `dx detect` started per image: requests/s and p50/p95 latency, in one run.

Three ways to check images one by one, on the same model, images and generation length:
  cold      `python -m dxcli detect IMAGE --model M --json` per image (a new process each time)
  client    `python -m dxcli detect IMAGE --server URL --json` per image (a new, light process each
            time; a running `dx serve` answers)
  server    `POST /v1/detect` (multipart upload) from C concurrent clients for --seconds each, for
            each C in --clients (default 1 and 16), on one warm `dx serve`
Latency is the client's wall clock per image (process start to exit for cold and client, request
to answer for server); requests/s is images answered divided by the wall time they took. The
server's start (spawn to listening, model loaded) is reported once. Every answer must be 200 and
the server's row must equal the cold `dx detect` row for the first image (same greedy text).

Run: python tests/bench/bench_serve.py [--model M --images DIR] [--max-new-tokens 64] [--seconds 20]
     [--clients 1,16] [--cold-images 8] [--no-reasoning] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench_detect import tiny_model


def summary(latencies: list[float], wall: float) -> dict[str, float]:
    """Requests/s, p50 and p95 (seconds) of one way of asking."""
    ordered = sorted(latencies)
    p95 = statistics.quantiles(ordered, n=20, method="inclusive")[-1] if len(ordered) > 1 else ordered[0]
    return {"requests": len(ordered), "requests_per_s": len(ordered) / wall, "p50_s": statistics.median(ordered),
            "p95_s": p95}


def per_process(images: list[Path], flags: list[str]) -> tuple[dict[str, float], list[dict]]:
    """`dx detect IMAGE FLAGS --json`, one new process per image, one after the other."""
    latencies, rows, started = [], [], time.perf_counter()
    for image in images:
        began = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "dxcli", "detect", str(image), "--json", *flags],
                              capture_output=True, text=True)
        latencies.append(time.perf_counter() - began)
        if done.returncode:
            raise SystemExit(f"dx detect failed ({done.returncode}): {done.stderr[-1000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return summary(latencies, time.perf_counter() - started), rows


def start_server(model: Path, work: Path, flags: list[str]) -> tuple[subprocess.Popen, str, float]:
    """`dx serve` on a free port of 127.0.0.1; (process, URL, seconds from spawn to listening)."""
    log = work / "serve.log"
    began = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "dxcli", "serve", "--model", str(model), "--port", "0",
                                    *flags], stdout=out, stderr=subprocess.STDOUT)
    while process.poll() is None:
        text = log.read_text(errors="replace")
        found = re.search(r" at (http://127\.0\.0\.1:\d+)/", text)
        if found and "Application startup complete" in text:
            return process, found.group(1), time.perf_counter() - began
        time.sleep(0.05)
    raise SystemExit(f"dx serve exited with {process.returncode}:\n{log.read_text()[-2000:]}")


def load(url: str, images: list[Path], clients: int, seconds: float) -> dict[str, float]:
    """`clients` threads posting uploads back to back for `seconds`; every answer must be 200."""
    latencies, failures, lock = [], [], threading.Lock()
    stop_at = time.perf_counter() + seconds
    payloads = [(image.name, image.read_bytes()) for image in images]

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            turn = index
            while time.perf_counter() < stop_at:
                began = time.perf_counter()
                answer = http.post("/v1/detect", files={"image": payloads[turn % len(payloads)]})
                with lock:
                    (latencies if answer.status_code == 200 else failures).append(time.perf_counter() - began)
                turn += clients

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise SystemExit(f"{len(failures)} of {len(failures) + len(latencies)} requests failed")
    return summary(latencies, time.perf_counter() - started)


def compare_first(url: str, image: Path, cold_row: dict) -> None:
    """The server answers what `dx detect` answers (the same model, greedy): a bench of the wrong
    thing would be worse than none."""
    with image.open("rb") as handle:
        row = httpx.post(f"{url}/v1/detect", files={"image": (image.name, handle)}, timeout=600).json()
    same = row["verdict"] == cold_row["verdict"] and row["reasoning"] == cold_row["reasoning"] \
        and abs(row["head_prob"] - cold_row["head_prob"]) < 1e-5
    if not same:
        raise SystemExit(f"the server's answer differs from dx detect's:\n{row}\n{cold_row}")


def report(results: dict[str, dict[str, float]]) -> None:
    print(f"{'':>24} {'images':>7} {'req/s':>8} {'p50 s':>8} {'p95 s':>8}")
    for name, figures in results.items():
        print(f"{name:>24} {figures['requests']:>7} {figures['requests_per_s']:>8.2f} {figures['p50_s']:>8.3f} "
              f"{figures['p95_s']:>8.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="checkpoint (default: a tiny one trained here, as bench_detect)")
    parser.add_argument("--images", type=Path, help="folder of images (default: the demo data's test images)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each server load run")
    parser.add_argument("--clients", default="1,16", help="concurrent clients of each server load run")
    parser.add_argument("--cold-images", type=int, default=8, help="images checked by a new process each")
    parser.add_argument("--no-reasoning", action="store_true", help="the binary head alone, on both sides")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    if (args.model is None) != (args.images is None):
        parser.error("--model and --images go together")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dx-bench-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        model, _ = tiny_model(work)
        images = sorted(work.glob("data/*/test/*/*.png"))
    else:
        model, images = args.model, sorted(p for p in args.images.rglob("*") if p.suffix.lower() in (".png", ".jpg"))
    mode = ["--no-reasoning"] if args.no_reasoning else ["--max-new-tokens", str(args.max_new_tokens)]
    results = {}
    results["cold dx detect"], cold_rows = per_process(images[:args.cold_images], ["--model", str(model), *mode])
    process, url, start_s = start_server(model, work, mode)
    try:
        compare_first(url, images[0], cold_rows[0])
        # the client asks with the server's own defaults: its --max-new-tokens is the server's
        client_flags = ["--server", url, *(["--no-reasoning"] if args.no_reasoning else [])]
        results["dx detect --server"], _ = per_process(images[:args.cold_images], client_flags)
        for clients in (int(c) for c in args.clients.split(",")):
            results[f"server, {clients} client{'s' if clients > 1 else ''}"] = load(url, images, clients, args.seconds)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
    print(f"{model}: {'head only' if args.no_reasoning else f'greedy, up to {args.max_new_tokens} new tokens'}; "
          f"dx serve started (spawn to listening) in {start_s:.1f} s")
    report(results)
    line = {"bench": "serve", "model": str(model), "max_new_tokens": args.max_new_tokens,
            "reasoning": not args.no_reasoning, "server_start_s": start_s, "results": results,
            "cpus": os.cpu_count(), "load_average": os.getloadavg()}
    print(f"{line['cpus']} CPUs, load average {line['load_average'][0]:.1f} (1 min) at the end")
    print(json.dumps(line))


if __name__ == "__main__":
    main()
