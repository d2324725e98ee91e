"""A real `dx serve` process on 127.0.0.1 for the server tests, and what they send it."""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

START_TIMEOUT_S = 180  # a cold start on a busy 2-core machine imports torch and loads the model


@dataclass
class Server:
    process: subprocess.Popen
    url: str  # http://127.0.0.1:PORT (no trailing slash)
    log: Path  # the server's stderr and stdout

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


def start_server(model: Path, work: Path, *flags: str) -> Server:
    """`dx serve --model MODEL --port 0 FLAGS` in its own process; returns once it listens (the
    address is read from its start line, so no port is guessed)."""
    log = work / "serve.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("w") as out:
        # SIGINT's default action restored: a test run started in the background inherits it ignored
        process = subprocess.Popen([sys.executable, "-m", "dxcli", "serve", "--model", str(model), "--port", "0",
                                    *flags], stdout=out, stderr=subprocess.STDOUT, env=env,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        found = re.search(r" at (http://127\.0\.0\.1:\d+)/", log.read_text(errors="replace"))
        if found and "Application startup complete" in log.read_text(errors="replace"):
            return Server(process, found.group(1), log)
        if process.poll() is not None:
            pytest.fail(f"dx serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    process.kill()
    pytest.fail(f"dx serve did not start within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def bomb_png() -> bytes:
    """A 65-byte PNG claiming 30000 x 30000 pixels (900 M, ten times Pillow's limit) with no pixel
    data: Pillow refuses it on opening, before decoding anything."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def browser_or_skip() -> tuple[str, str]:
    """(chromium, chromedriver); skipped only off CI (in CI the browser test must run)."""
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if all(found):
        return found
    missing = " and ".join(name for name, path in zip(("chromium", "chromedriver"), found) if not path)
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but {missing} is not installed (.ci/run installs chromium and chromium-driver)")
    pytest.skip(f"{missing} is not installed (apt-get install chromium chromium-driver); CI runs this test")
