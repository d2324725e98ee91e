"""`dx serve`'s safety and modes: a head-only server with a token and a 1 MB cap (one real process
on 127.0.0.1), the refusals made before anything binds, and Ctrl-C with requests in flight.

The server's batching window is 1.5 s on purpose: every model request waits that long for
company, so a request sent just before Ctrl-C is certainly still in flight when it lands.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from typer.testing import CliRunner

from dxcli.cli.main import app
from dxcli.server.options import ServeOptions, is_local
from helpers_serve import data_uri, start_server

TOKEN = "s3cret-token"
WINDOW_S = 1.5
runner = CliRunner()


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    served = start_server(trained["instruct"], tmp_path_factory.mktemp("serve"), "--no-reasoning", "--token", TOKEN,
                          "--max-upload-mb", "1", "--batch-wait-ms", str(WINDOW_S * 1000))
    yield served
    served.stop()


@pytest.fixture(scope="module")
def image(demo_root):
    return sorted(demo_root.glob("*/test/fake/*.png"))[0]


AUTH = {"authorization": f"Bearer {TOKEN}"}


def test_a_non_local_host_is_refused_before_anything_loads():
    started = time.monotonic()
    result = runner.invoke(app, ["serve", "--model", "no-such-model", "--host", "0.0.0.0"])
    assert result.exit_code == 2 and time.monotonic() - started < 5
    assert "--host 0.0.0.0 is reachable from other machines" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert ServeOptions(model=None, host="0.0.0.0", token="t").token == "t"
    assert ServeOptions(model=None, host="10.1.2.3", allow_remote=True).allow_remote
    assert [is_local(h) for h in ("127.0.0.1", "localhost", "::1", "127.8.0.1", "0.0.0.0", "myhost", "10.0.0.1")] == \
        [True, True, True, True, False, False, False]


def test_a_taken_port_is_one_line_before_the_model_loads(server):
    port = server.url.rsplit(":", 1)[1]
    result = runner.invoke(app, ["serve", "--model", "no-such-model", "--port", port])
    assert result.exit_code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.output and len(result.output.strip().splitlines()) == 1


def test_the_token_guards_the_api_not_the_page(server, image):
    for path in ("/v1/models", "/v1/detect", "/v1/chat/completions"):
        method = httpx.get if path == "/v1/models" else httpx.post
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}):
            answer = method(f"{server.url}{path}", headers=headers)
            assert answer.status_code == 401, (path, headers)
            assert answer.json()["error"]["code"] == "invalid_api_key"
            assert answer.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{server.url}/v1/models", headers=AUTH).json()["data"][0]["id"] == "model"
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and 'id="file"' in page.text and "const tokenRequired = true" in page.text
    assert httpx.get(f"{server.url}/health").json()["token_required"] is True


def test_head_only_serves_the_head_and_refuses_text(server, image):
    answer = httpx.post(f"{server.url}/v1/detect", headers=AUTH, files={"image": (image.name, image.read_bytes())})
    assert answer.status_code == 200, answer.text
    row = answer.json()
    assert row["reasoning"] is None and row["paragraphs"] == [] and row["error"] is None
    assert row["verdict"] == ("fake" if row["head_prob"] >= 0.5 else "real")
    asked = httpx.post(f"{server.url}/v1/detect", headers=AUTH, json={"image": data_uri(image), "reasoning": True})
    assert asked.status_code == 400 and asked.json()["error"]["code"] == "no_reasoning"
    chat = httpx.post(f"{server.url}/v1/chat/completions", headers=AUTH, json={"model": "model", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(image)}}]}]})
    assert chat.status_code == 400 and "--no-reasoning" in chat.json()["error"]["message"]


def test_dx_detect_with_server_and_token(server, image, monkeypatch):
    refused = runner.invoke(app, ["detect", str(image), "--server", server.url, "--json", "--no-reasoning"])
    assert refused.exit_code == 1 and "Bearer" in refused.output and "--token" in refused.output
    text = runner.invoke(app, ["detect", str(image), "--server", server.url, "--token", TOKEN])
    assert text.exit_code == 1 and "add --no-reasoning" in text.output
    for flags, says in ((["--token", TOKEN], "--token goes with --server"),
                        (["--server", server.url, "--model", "m"], "drop --model")):
        misused = runner.invoke(app, ["detect", str(image), *flags])
        assert misused.exit_code == 2 and says in misused.output
    monkeypatch.setenv("DX_SERVE_TOKEN", TOKEN)
    result = runner.invoke(app, ["detect", str(image), str(image), "--server", server.url, "--json", "--no-reasoning"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["image"] for r in rows] == [str(image)] * 2 and rows[0]["reasoning"] is None


def test_the_client_loads_no_model_stack(server, image):
    """`dx detect --server` is the light path: no torch, transformers or timm in its process."""
    code = ("import sys\nfrom dxcli.cli.main import app\n"
            f"app(['detect', {str(image)!r}, '--server', {server.url!r}, '--token', {TOKEN!r}, '--json', "
            "'--no-reasoning'], standalone_mode=False)\n"
            "print(sorted(m for m in ('torch', 'transformers', 'timm', 'PIL') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert json.loads(lines[0])["error"] is None and lines[-1] == "[]"


def test_the_upload_cap_is_the_flag(server, image):
    big = image.read_bytes() + b"\0" * (2 * 2**20)  # a valid PNG followed by 2 MB
    answer = httpx.post(f"{server.url}/v1/detect", headers=AUTH, files={"image": ("big.png", big)})
    assert answer.status_code == 413 and "--max-upload-mb 1" in answer.json()["error"]["message"]
    encoded = {"image": base64.b64encode(big).decode()}
    assert httpx.post(f"{server.url}/v1/detect", headers=AUTH, json=encoded).status_code == 413


def test_ctrl_c_answers_the_requests_in_flight_then_exits(server, image):
    """Last: it stops this module's server."""
    answers: list[tuple[int, float]] = []

    def ask() -> None:
        reply = httpx.post(f"{server.url}/v1/detect", headers=AUTH, timeout=60,
                           files={"image": (image.name, image.read_bytes())})
        answers.append((reply.status_code, time.monotonic()))

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(WINDOW_S / 3)  # sent, and waiting in the batching window
    interrupted = time.monotonic()
    server.process.send_signal(signal.SIGINT)
    for thread in threads:
        thread.join()
    assert server.process.wait(timeout=60) == 130
    assert [status for status, _ in answers] == [200] * 3
    assert all(at > interrupted for _, at in answers)  # answered after Ctrl-C
    assert "stopped: dx serve: every request in flight was answered" in server.output()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health")
