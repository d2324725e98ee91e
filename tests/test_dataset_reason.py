"""`dx dataset reason`: reasoning from a teacher endpoint, checked, appended as it arrives, resumed.

The teacher here is a real HTTP server on 127.0.0.1 speaking the chat-completions protocol; per
image (recognised by the bytes of the `data:` URI it receives) it plays a script of replies: good,
malformed, untitled paragraphs, the wrong label, slow (past the client's timeout), a 500 error.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dxcli.base.jsonio import iter_jsonl
from dxcli.data.reason import ReasonJob, Teacher, reason_tree
from dxcli.data.reason_check import ReplyRules, check_reply
from dxcli.data.records import load_reasoning, records_from_tree
from helpers_images import make_tree

MODEL = "teacher-7b"
SLOW_S = 2.5  # a slow reply; the tests' client gives up after TIMEOUT_S
TIMEOUT_S = 1.0


def good_reply(label: str, tag: str) -> str:
    return (f"**Texture**: The surfaces of image {tag} look {'natural' if label == 'real' else 'overly smooth'}.\n\n"
            f"**Lighting**: The shadows are {'consistent' if label == 'real' else 'inconsistent'} with one light.\n\n"
            f"### Answer: {label}")


class FakeTeacher:
    """A chat-completions server whose reply to an image follows that image's script (a list of
    behaviours, one per request, the last repeated); unscripted images get good replies."""

    def __init__(self, key: str | None = None, delay: float = 0.0, version: str = "v1"):
        self.scripts: dict[str, list[str]] = {}
        self.requests: list[dict] = []
        self.key, self.delay, self.version = key, delay, version
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def calls(self, digest: str) -> int:
        return sum(r["image"] == digest for r in self.requests)

    def reply(self, body: dict) -> tuple[int, dict]:
        content = body["messages"][0]["content"]
        uri = next(part["image_url"]["url"] for part in content if part["type"] == "image_url")
        prompt = next(part["text"] for part in content if part["type"] == "text")
        digest = hashlib.sha256(base64.b64decode(uri.split(",", 1)[1])).hexdigest()
        label = re.search(r"### Answer: (real|fake)", prompt).group(1)
        with self.lock:
            script = self.scripts.get(digest, ["good"])
            behaviour = script[min(self.calls(digest), len(script) - 1)]
            self.requests.append({"image": digest, "prompt": prompt, "uri": uri[:30], "model": body["model"]})
        if behaviour == "slow":
            time.sleep(SLOW_S)
        time.sleep(self.delay)
        if behaviour == "error":
            return 500, {"error": {"message": "the GPU fell over"}}
        wrong = "fake" if label == "real" else "real"
        text = {"good": good_reply(label, f"{digest[:8]}-{self.version}"),
                "slow": good_reply(label, f"{digest[:8]}-{self.version}"),
                "malformed": f"I think this image is {label}.",
                "untitled": f"The texture looks odd.\n\nThe light is odd.\n\n### Answer: {label}",
                "wrong": good_reply(wrong, digest[:8])}[behaviour]
        return 200, {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": text}}]}

    def _handler(self):
        teacher = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def send(self, status: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on a slow reply

            def authorised(self) -> bool:
                if teacher.key is None or self.headers.get("authorization") == f"Bearer {teacher.key}":
                    return True
                self.send(401, {"error": {"message": "invalid api key"}})
                return False

            def do_GET(self) -> None:
                if self.authorised():
                    self.send(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0,
                                                                "owned_by": "test"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                if not self.authorised():
                    return
                if body["model"] != MODEL:
                    return self.send(404, {"error": {"message": f"model {body['model']} not found"}})
                self.send(*teacher.reply(body))

        return Handler


@pytest.fixture
def teacher():
    server = FakeTeacher()
    yield server
    server.close()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    make_tree(root, n=4, domains=("alpha",), splits=("train", "test"))
    return root


def digest_of(root: Path, rel: str) -> str:
    return hashlib.sha256((root / rel).read_bytes()).hexdigest()


def reason(root: Path, url: str, **job) -> object:
    teacher_keys = {k: job.pop(k) for k in ("timeout", "retries", "api_key_env") if k in job}
    spec = Teacher(url=url, model=MODEL, **{"timeout": TIMEOUT_S, "retries": 1, **teacher_keys})
    return reason_tree(ReasonJob(root=root, **job), spec, ReplyRules())


GOOD = good_reply("fake", "x")


@pytest.mark.parametrize("text,label,kind", [
    (GOOD, "fake", None),
    ("**Texture:** smooth.\n\n**Edges:** warped.\n\n  **Answer**: Fake.  ", "fake", None),
    (GOOD, "real", "wrong label"),
    ("It is fake.", "fake", "no answer"),
    ("", "fake", "empty"),
    (GOOD.replace("\n\n### Answer", "\n### Answer"), "fake", "format"),  # the answer shares a paragraph
    ("**A**: Answer: fake here.\n\n**B**: b.\n\n### Answer: fake", "fake", "format"),  # two markers
    ("Texture: smooth.\n\n**Edges**: warped.\n\n### Answer: fake", "fake", "format"),  # no bold title
    ("**Texture**: smooth.\n\n### Answer: fake", "fake", "paragraphs"),  # one paragraph, two needed
])
def test_check_reply_accepts_dx_format_and_names_what_is_wrong(text, label, kind):
    reason = check_reply(text, label, ReplyRules(min_paragraphs=2, max_paragraphs=8))
    assert (reason if reason is None else reason.split(":")[0]) == kind, reason
    assert check_reply(GOOD, "fake", ReplyRules(), finish_reason="length").startswith("cut off")


def test_the_demo_reasoning_passes_the_check_and_the_paragraph_rule_is_the_rl_one():
    """The demo's own texts are dx's format, so the check must accept them; the data layer keeps
    its own copy of METHOD §8's separator (rl sits above it), which must not drift."""
    import numpy as np

    from dxcli.data import reason_check
    from dxcli.data.demo_reasoning import Traces, write_reasoning
    from dxcli.rl.paragraphs import PARAGRAPH_SEPARATOR

    assert reason_check.PARAGRAPH_SEPARATOR.pattern == PARAGRAPH_SEPARATOR.pattern
    rng = np.random.default_rng(0)
    for label in ("real", "fake"):
        traces = Traces(**{name: 0.0 for name in Traces.__dataclass_fields__})
        assert check_reply(write_reasoning(traces, label, rng), label, ReplyRules()) is None


def test_good_replies_fill_reasoning_jsonl_and_bad_ones_are_logged_with_reasons(tree, teacher, monkeypatch):
    monkeypatch.setenv("DX_TEST_TEACHER_KEY", "sekrit")
    teacher.key = "sekrit"
    scripts = {"real_0": ["good"], "real_1": ["malformed", "good"], "real_2": ["wrong"], "real_3": ["slow", "good"],
               "fake_0": ["good"], "fake_1": ["untitled"], "fake_2": ["error", "good"], "fake_3": ["slow"]}
    rel = {name: f"alpha/train/{name.split('_')[0]}/{name}.png" for name in scripts}
    for name, script in scripts.items():
        teacher.scripts[digest_of(tree, rel[name])] = script

    summary = reason(tree, teacher.url, api_key_env="DX_TEST_TEACHER_KEY", reask=1, concurrency=4)

    accepted = {"real_0", "real_1", "real_3", "fake_0", "fake_2"}
    reasoning = load_reasoning(tree / "reasoning.jsonl")
    assert set(reasoning) == {rel[name] for name in accepted}
    for name in accepted:  # exactly the teacher's good reply for that image
        label, digest = name.split("_")[0], digest_of(tree, rel[name])
        assert reasoning[rel[name]] == good_reply(label, f"{digest[:8]}-v1")
    rows = list(iter_jsonl(tree / "reasoning.jsonl"))
    assert all(row["teacher"] == MODEL for row in rows) and len(rows) == len(accepted)
    assert (summary.images, summary.already, summary.asked) == (8, 0, 8)
    assert (summary.accepted, summary.rejected) == (5, 3)
    assert summary.reasons == {"wrong label": 1, "format": 1, "timeout": 1}
    assert (summary.retried, summary.retries) == (6, 6)  # a re-ask or one client retry each
    rejected = list(iter_jsonl(tree / "reasoning-rejected.jsonl"))
    assert sorted(Path(r["image"]).stem for r in rejected) == ["fake_1", "fake_1", "fake_3", "real_1", "real_2", "real_2"]
    assert all(r["reason"] for r in rejected)
    # the wire: only the train split, the image's own bytes as a data: URI, its label in the prompt
    train_digests = {digest_of(tree, r) for r in rel.values()}
    assert {r["image"] for r in teacher.requests} == train_digests
    assert all(r["uri"].startswith("data:image/png;base64,") and r["model"] == MODEL for r in teacher.requests)
    assert len(teacher.requests) == 14
    # what dx train builds from the tree now carries the accepted reasoning
    answers = {r.image: r.answer for r in records_from_tree(tree, reasoning=reasoning)}
    assert answers[rel["real_0"]] == reasoning[rel["real_0"]] and answers[rel["real_2"]] == "### Answer: real"


def test_a_rerun_asks_only_for_missing_images_and_redo_replaces(tree, teacher):
    teacher.scripts[digest_of(tree, "alpha/train/real/real_2.png")] = ["wrong"]
    first = reason(tree, teacher.url, reask=0)
    assert (first.accepted, first.rejected) == (7, 1)
    before = (tree / "reasoning.jsonl").read_bytes()

    teacher.scripts.clear()
    teacher.requests.clear()
    second = reason(tree, teacher.url)
    assert (second.already, second.asked, second.accepted) == (7, 1, 1)
    assert len(teacher.requests) == 1
    assert (tree / "reasoning.jsonl").read_bytes().startswith(before)  # earlier lines untouched

    teacher.version = "v2"
    third = reason(tree, teacher.url, redo=True)
    assert (third.already, third.asked, third.accepted) == (0, 8, 8)
    rows = list(iter_jsonl(tree / "reasoning.jsonl"))
    assert len(rows) == 8 and all("-v2" in row["reasoning"] for row in rows)  # one line per image, the new one


def run_cli(args: list[str], **kwargs) -> subprocess.CompletedProcess | subprocess.Popen:
    command = [sys.executable, "-m", "dxcli", "dataset", "reason", *args]
    if kwargs.pop("background", False):
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, capture_output=True, text=True, timeout=120, **kwargs)


def test_a_killed_run_keeps_whole_lines_and_a_rerun_finishes_it(tree, teacher):
    teacher.delay = 0.4
    args = [str(tree), "--teacher", teacher.url, "--model", MODEL, "--concurrency", "1", "--json"]
    process = run_cli(args, background=True)
    out = tree / "reasoning.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not out.is_file() or out.read_text().count("\n") < 2):
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    kept = list(iter_jsonl(out))  # every line whole
    assert 2 <= len(kept) < 8

    teacher.delay = 0.0
    result = run_cli(args)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["already"], summary["asked"], summary["accepted"]) == (len(kept), 8 - len(kept), 8 - len(kept))
    assert len(load_reasoning(out)) == 8 and len(list(iter_jsonl(out))) == 8
    # each image asked once, but for the one in flight when the kill came
    assert len(teacher.requests) <= 9


def test_user_mistakes_and_a_failed_teacher_are_one_line(tree, teacher, tmp_path):
    from dxcli.cli.main import app

    runner = CliRunner()

    def invoke(*extra: str, url: str = teacher.url, model: str = MODEL):
        result = runner.invoke(app, ["dataset", "reason", str(tree), "--teacher", url, "--model", model,
                                     "--retries", "0", *extra])
        assert "Traceback" not in result.output
        return result

    closed = FakeTeacher()
    closed.close()  # a port nothing answers on any more
    result = invoke(url=closed.url)
    assert result.exit_code == 1 and "cannot reach the teacher" in result.output
    result = invoke("--api-key-env", "DX_TEST_NO_SUCH_VARIABLE")
    assert result.exit_code == 2 and "DX_TEST_NO_SUCH_VARIABLE" in result.output
    result = invoke(model="no-such-model")
    assert result.exit_code == 1 and "404" in result.output and not (tree / "reasoning.jsonl").exists()
    teacher.key = "sekrit"
    result = invoke()
    assert result.exit_code == 1 and "refused the request" in result.output
    teacher.key = None
    for rel in ("real_0", "real_1", "real_2", "real_3", "fake_0", "fake_1", "fake_2", "fake_3"):
        teacher.scripts[digest_of(tree, f"alpha/train/{rel.split('_')[0]}/{rel}.png")] = ["malformed"]
    result = invoke("--json", "--reask", "0", "--limit", "3")
    assert result.exit_code == 1, result.output  # nothing accepted is a failure, the counts still printed
    assert "error: no reply passed the check (3 asked)" in result.stderr
    summary = json.loads(result.stdout)
    assert (summary["asked"], summary["accepted"], summary["rejected"], summary["reasons"]) == (3, 0, 3, {"no answer": 3})
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Say why this {label} image is {label}; end with ### Answer: {label}")
    result = invoke("--prompt", str(prompt), "--limit", "1", "--split", "test")
    assert result.exit_code == 0, result.output
    assert teacher.requests[-1]["prompt"] == "Say why this fake image is fake; end with ### Answer: fake"


def instruct(tree: Path, out: Path, model: str | None = None) -> Path:
    from dxcli import config
    from dxcli.jobs.stages import run_sft_stage

    return run_sft_stage("instruct", out=out, data=tree, model=model, say=lambda *_: None,
                         resolved=config.resolve("cpu-tiny", ["train.max_steps=1", "hardware.num_workers=0"]))


def test_instruct_on_a_tree_without_reasoning_warns_before_loading_anything(tree, capsys):
    """One line naming `dx dataset reason`, printed before the starting model is even looked at
    (here a folder that is no checkpoint, which stops the run right after)."""
    from dxcli.base.errors import DxError

    with pytest.raises(DxError, match="not a dx checkpoint"):
        instruct(tree, tree.parent / "run", model=str(tree.parent))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("warning: instruct: no record has reasoning") and "dx dataset reason" in lines[0]


@pytest.fixture(scope="module")
def taught(tmp_path_factory) -> dict[str, Path]:
    """A tree whose reasoning the fake teacher wrote, and an instruct run on it (1 step)."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("taught") / "data"
    make_tree(root, n=4, domains=("alpha",), splits=("train", "test"))
    server = FakeTeacher()
    try:
        assert reason(root, server.url).accepted == 8
    finally:
        server.close()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        model = instruct(root, root.parent / "run")
    return {"tree": root, "model": model, "run": root.parent / "run", "err": err.getvalue()}


def test_instruct_trains_on_the_teachers_reasoning(taught):
    assert "dx dataset reason" not in taught["err"] and (taught["model"] / "config.json").is_file()
    reasoning = load_reasoning(taught["tree"] / "reasoning.jsonl")
    trained_on = {row["image"]: row["conversations"][1]["value"]
                  for row in iter_jsonl(taught["run"] / "train-records.jsonl")}
    assert trained_on == reasoning


@pytest.fixture
def dx_serve(taught):
    """`dx serve` on the tiny instruct model, on a free port; yields its base URL."""
    process = subprocess.Popen([sys.executable, "-m", "dxcli", "serve", "--model", str(taught["model"]),
                                "--port", "0", "--max-new-tokens", "24"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr] + [lines.put(None)],
                     daemon=True).start()  # keeps the pipe drained while the server runs
    try:
        seen = []
        while True:  # the line naming the address comes once the model is loaded
            line = lines.get(timeout=180)
            if line is None:
                pytest.fail(f"dx serve stopped (exit {process.wait()}): {''.join(seen)[-2000:]}")
            seen.append(line)
            found = re.search(r"at (http://127\.0\.0\.1:\d+)/", line)
            if found:
                break
        yield found.group(1) + "/v1"
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_reason_against_a_real_dx_serve(taught, dx_serve, tmp_path):
    """A tiny model follows no prompt: what is checked is the plumbing and the counts. Every
    image asked gets a reply; each is accepted (and passes the check) or rejected with a reason."""
    out = tmp_path / "reasoning.jsonl"
    result = run_cli([str(taught["tree"]), "--teacher", dx_serve, "--model", "model", "--out", str(out),
                      "--max-tokens", "24", "--reask", "0", "--limit", "4", "--json"])
    assert result.returncode in (0, 1) and "Traceback" not in result.stderr, result.stderr
    summary = json.loads(result.stdout)
    assert summary["asked"] == 4 and summary["accepted"] + summary["rejected"] == 4
    assert result.returncode == (0 if summary["accepted"] else 1)
    assert sum(summary["reasons"].values()) == summary["rejected"]
    rejected = list(iter_jsonl(tmp_path / "reasoning-rejected.jsonl")) if summary["rejected"] else []
    assert len(rejected) == summary["rejected"] and all(r["reply"] is not None and r["reason"] for r in rejected)
    accepted = list(iter_jsonl(out)) if summary["accepted"] else []
    labels = {row["image"]: row["image"].split("/")[2] for row in accepted}
    assert all(check_reply(row["reasoning"], labels[row["image"]], ReplyRules()) is None for row in accepted)


def test_a_max_tokens_the_server_refuses_stops_the_run_in_one_line(taught, dx_serve, tmp_path):
    """`dx serve` answers 400 to a max_tokens over its --max-new-tokens: the same for every image,
    so the run stops at once and names the flag, rather than rejecting image after image."""
    out = tmp_path / "reasoning.jsonl"
    result = run_cli([str(taught["tree"]), "--teacher", dx_serve, "--model", "model", "--out", str(out),
                      "--max-tokens", "100000", "--reask", "0", "--limit", "4"])
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "--max-tokens 100000" in result.stderr and len(result.stderr.strip().splitlines()) <= 2, result.stderr
    assert not out.exists() or not out.read_text().strip()
