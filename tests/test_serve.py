"""`dx serve` as a client meets it: one real server process on 127.0.0.1 serving the tiny trained
model, called by the official `openai` client, by plain HTTP (httpx), by `dx detect --server`,
by headless Chromium through Selenium, and by 16 clients at once."""

from __future__ import annotations

import base64
import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from typer.testing import CliRunner

from dxcli.cli.main import app
from helpers_serve import bomb_png, browser_or_skip, data_uri, start_server

MAX_NEW_TOKENS = 24
runner = CliRunner()


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    # the run folder, as a user passes it: the model id is its name
    served = start_server(trained["instruct"].parent, tmp_path_factory.mktemp("serve"),
                          "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-wait-ms", "50")
    yield served
    assert served.stop() == 130  # Ctrl-C: answered what was in flight, then "stopped:" and 130
    assert "Traceback" not in served.output() and "stopped: dx serve" in served.output()


@pytest.fixture(scope="module")
def images(demo_root) -> list[Path]:
    return sorted(demo_root.glob("*/test/*/*.png"))[:8]


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def chat(image: Path, **options) -> dict:
    text = options.pop("text", None)
    parts = [{"type": "image_url", "image_url": {"url": data_uri(image)}}]
    parts += [{"type": "text", "text": text}] if text else []
    return {"model": "instruct", "messages": [{"role": "user", "content": parts}], **options}


def test_models_and_health(server):
    assert [model.id for model in client(server).models.list()] == ["instruct"]
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["reasoning"] is True and health["device"] in ("cpu", "cuda:0")


def test_detect_answers_what_dx_detect_answers(server, trained, images, tmp_path):
    """The upload, the base64 body and `dx detect --server` give `dx detect --json`'s row."""
    local = runner.invoke(app, ["detect", *map(str, images[:2]), "--model", str(trained["instruct"]), "--json",
                                "--max-new-tokens", str(MAX_NEW_TOKENS)])
    assert local.exit_code == 0, local.output
    expected = [json.loads(line) for line in local.stdout.splitlines() if line.startswith("{")]
    for image, row in zip(images, expected):
        with image.open("rb") as handle:
            uploaded = httpx.post(f"{server.url}/v1/detect", files={"image": (image.name, handle, "image/png")})
        as_json = httpx.post(f"{server.url}/v1/detect", json={"image": base64.b64encode(image.read_bytes()).decode()})
        for answer in (uploaded, as_json):
            assert answer.status_code == 200, answer.text
            got = answer.json()
            assert {k: got[k] for k in ("verdict", "reasoning", "error")} == {k: row[k] for k in ("verdict", "reasoning", "error")}
            assert got["head_prob"] == pytest.approx(row["head_prob"], abs=1e-5)
            assert got["model"] == "instruct" and got["seconds"] > 0
            assert got["paragraphs"] == [p.strip() for p in re.split(r"\n\s*\n", row["reasoning"]) if p.strip()]
        assert uploaded.json()["image"] == image.name
    remote = runner.invoke(app, ["detect", *map(str, images[:2]), "--server", server.url, "--json"])
    assert remote.exit_code == 0, remote.output
    rows = [json.loads(line) for line in remote.stdout.splitlines() if line.startswith("{")]
    assert [{**r, "seconds": 0, "head_prob": round(r["head_prob"], 5)} for r in rows] == \
        [{**r, "seconds": 0, "head_prob": round(r["head_prob"], 5)} for r in expected]


def test_chat_completions_through_the_openai_client(server, images):
    api = client(server)
    greedy = api.chat.completions.create(**chat(images[0], temperature=0))
    detected = httpx.post(f"{server.url}/v1/detect", json={"image": data_uri(images[0])}).json()
    # no text: dx's default question, the question `dx detect` asks; greedy: the same tokens
    assert greedy.choices[0].message.content == detected["reasoning"]
    assert greedy.model == "instruct" and greedy.object == "chat.completion"
    sampled = api.chat.completions.create(**chat(images[1], text="Is this image real or fake?", n=3,
                                                 temperature=1.2, top_p=0.9, max_tokens=6))
    assert [choice.index for choice in sampled.choices] == [0, 1, 2]
    assert all(choice.finish_reason in ("stop", "length") and choice.message.role == "assistant"
               for choice in sampled.choices)
    usage = sampled.usage
    assert 3 <= usage.completion_tokens <= 18 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens > 9  # the image's tokens and the prompt's
    one = api.chat.completions.create(**chat(images[1], n=4, temperature=1.5, max_tokens=1, seed=3))
    # one token each: a choice with text was cut ("length"); "stop" (the token was the end) shows nothing
    assert any(c.message.content for c in one.choices)
    assert all(c.finish_reason == "length" for c in one.choices if c.message.content)
    assert all(c.message.content == "" for c in one.choices if c.finish_reason == "stop")
    assert one.usage.completion_tokens == 4
    seeded = [api.chat.completions.create(**chat(images[2], n=2, temperature=1.5, seed=7)) for _ in range(2)]
    assert [c.message.content for c in seeded[0].choices] == [c.message.content for c in seeded[1].choices]
    assert 0 <= sampled.model_extra["dx"]["head_prob"] <= 1


def test_bad_inputs_get_one_line_json_errors_and_the_server_goes_on(server, images):
    png = images[0].read_bytes()
    uploads = {"not an image": b"hello, I am text", "truncated": png[: len(png) // 3], "empty": b"",
               "bomb": bomb_png()}
    for what, data in uploads.items():
        answer = httpx.post(f"{server.url}/v1/detect", files={"image": ("x.png", data, "image/png")})
        assert answer.status_code == 400, (what, answer.text)
        error = answer.json()["error"]
        assert error["code"] == "invalid_image" and "\n" not in error["message"], what
    assert "too many pixels" in httpx.post(f"{server.url}/v1/detect", files={"image": ("b.png", bomb_png())}).text
    bad_requests = [
        ("detect", {"files": {"picture": ("x.png", png)}}, 400, "missing_image"),
        ("detect", {"content": b"x", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
        ("detect", {"json": {"image": "@@@"}}, 400, "invalid_image"),
        ("detect", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, None),
        ("detect", {"json": {"image": data_uri(images[0]), "max_new_tokens": 10**6}}, 400, "max_tokens_too_large"),
        ("chat", {"json": chat(images[0], max_tokens=10**6)}, 400, "max_tokens_too_large"),
        ("chat", {"json": {**chat(images[0]), "model": "gpt-4o"}}, 404, "model_not_found"),
        ("chat", {"json": {**chat(images[0]), "stream": True}}, 400, "unsupported_parameter"),
        ("chat", {"json": {"model": "instruct", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}}, 400, "remote_url_refused"),
        ("chat", {"json": {"model": "instruct", "messages": [{"role": "user", "content": "hello"}]}}, 400, "missing_image"),
        ("chat", {"json": {"model": "instruct", "messages": [{"role": "system", "content": "be brief"},
                                                              *chat(images[0])["messages"]]}}, 400, None),
        ("chat", {"json": {**chat(images[0]), "n": 99}}, 400, None),
    ]
    paths = {"detect": "/v1/detect", "chat": "/v1/chat/completions"}
    for route, request, status, code in bad_requests:
        answer = httpx.post(f"{server.url}{paths[route]}", **request)
        assert answer.status_code == status, (route, request.get("json", ""), answer.text)
        assert answer.json()["error"]["code"] == code and answer.json()["error"]["message"]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    assert httpx.post(f"{server.url}/v1/detect", files={"image": ("ok.png", png)}).status_code == 200


def test_uploads_over_the_cap_are_refused_without_reading_them(server):
    # a declared 100 MB body: the 413 comes back before a byte of it is sent
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000000\r\n\r\n")
        assert sock.recv(200).startswith(b"HTTP/1.1 413 ")
    # no declared length (chunked): counted as it streams, refused once past 20 MB
    sent = [0]

    def chunks():
        while sent[0] < 64 * 2**20:
            sent[0] += 2**20
            yield b"0" * 2**20

    answer = httpx.post(f"{server.url}/v1/detect", content=chunks(), headers={"content-type": "application/json"})
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "upload_too_large"
    assert sent[0] < 64 * 2**20  # the server answered before the client had sent everything


def test_concurrent_requests_share_batches(server, images):
    before = httpx.get(f"{server.url}/health").json()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda image: httpx.post(f"{server.url}/v1/detect", timeout=120,
                                                         json={"image": data_uri(image)}), images))
    assert [a.status_code for a in answers] == [200] * 8
    after = httpx.get(f"{server.url}/health").json()
    assert after["answered"] - before["answered"] == 8
    assert after["batches"] - before["batches"] < 8  # several requests per generate call


def test_load_run_answers_every_request(server, images):
    """16 clients for 10 s, detect and chat mixed: every request answered with 200."""
    stop_at, statuses, lock = time.monotonic() + 10, [], threading.Lock()

    def client_loop(index: int) -> None:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            turn = 0
            while time.monotonic() < stop_at:
                image = images[(index + turn) % len(images)]
                if turn % 2:
                    answer = http.post("/v1/chat/completions", json=chat(image, temperature=0.8, max_tokens=12))
                else:
                    answer = http.post("/v1/detect", files={"image": (image.name, image.read_bytes())})
                with lock:
                    statuses.append(answer.status_code)
                turn += 1

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(statuses) >= 32 and set(statuses) == {200}, statuses
    assert httpx.get(f"{server.url}/health").json()["pending"] == 0


def test_page_in_headless_chromium(server, images, tmp_path):
    chromium, chromedriver = browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    try:
        driver.get(server.url + "/")
        assert "instruct" in driver.title
        driver.find_element(By.ID, "file").send_keys(str(images[3]))
        WebDriverWait(driver, 120).until(lambda d: d.find_element(By.ID, "verdict").text
                                         or d.find_element(By.ID, "error").text)
        assert driver.find_element(By.ID, "error").text == ""
        expected = httpx.post(f"{server.url}/v1/detect", json={"image": data_uri(images[3])}).json()
        assert driver.find_element(By.ID, "verdict").text.lower() == (expected["verdict"] or "no answer")
        assert driver.find_element(By.ID, "head-prob").text == f"{expected['head_prob']:.3f}"
        assert float(driver.find_element(By.ID, "seconds").text) > 0
        shown = driver.find_elements(By.CSS_SELECTOR, "#paragraphs p")
        assert len(shown) == len(expected["paragraphs"]) >= 1
        # a file that is no image: the page says so, and the next image works again
        bad = tmp_path / "notes.png"
        bad.write_text("not an image")
        driver.find_element(By.ID, "file").send_keys(str(bad))
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "error").text)
        assert "not an image" in driver.find_element(By.ID, "error").text
    finally:
        driver.quit()
