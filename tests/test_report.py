"""`dx eval report`: one self-contained HTML page, checked as text and in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from PIL import Image, ImageDraw, ImageStat
from typer.testing import CliRunner

from dxcli.cli import main as cli_main
from dxcli.base.errors import DxError, UsageError
from dxcli.evaluation import html_report
from dxcli.evaluation import score as scoring

runner = CliRunner()
PARAGRAPHS = ("**Skin Texture**: The skin is unnaturally smooth, with no pores.",
              "**Lighting**: The shadow under the nose falls against the key light.",
              "**Edges**: The hairline melts into the background.")
# (question_id, domain, label, verdict, head_prob); q3 is the worst mistake: wrong, and the
# head is surest of the wrong class (0.95 fake for a real image).
ROWS = [("q1", "ddim", "fake", "fake", 0.90), ("q2", "ddim", "real", "real", 0.20),
        ("q3", "ddim", "real", "fake", 0.95), ("q4", "sd", "fake", None, 0.40),
        ("q5", "sd", "fake", "real", 0.10), ("q6", "sd", "real", "real", 0.30),
        ("q7", "sd", "real", "fake", 0.60), ("q8", "ddim", "fake", "fake", None)]


def write_answers(folder, name="answers.jsonl", rows=ROWS, model="sft", missing=("q7",)):
    """Answers and one small PNG per question, except the images of `missing`."""
    lines = []
    for index, (qid, domain, label, verdict, prob) in enumerate(rows):
        image = f"{domain}/test/{label}/{qid}.png"
        if qid not in missing:
            draw_face(folder / "images" / image, index)
        answer = f"\n\n### Answer: {verdict}" if verdict else ""
        lines.append({"question_id": qid, "image": image, "domain": domain, "label": label,
                      "text": "\n\n".join(PARAGRAPHS) + answer, "predict": verdict,
                      "head_prob": prob, "model": model})
    path = folder / name
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def draw_face(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (64, 48), (40 * seed % 256, 90, 200 - 20 * seed % 200))
    ImageDraw.Draw(image).ellipse((16, 6, 48, 42), fill=(230, 190, 160))
    image.save(path)


def rewards_for(answers_path, folder):
    """What `dx eval rewards --json --no-clip` writes for these answers."""
    result = runner.invoke(cli_main.app, ["eval", "rewards", str(answers_path), "--no-clip",
                                          "--json"])
    assert result.exit_code == 0, result.output
    path = folder / "rewards.json"
    path.write_text(result.stdout)
    return path


def build(tmp_path, *argv):
    return runner.invoke(cli_main.app, ["eval", "report", *map(str, argv)])


def test_worst_mistakes_come_first_and_only_mistakes():
    rows = [dict(zip(("question_id", "domain", "label", "predict", "head_prob"), row))
            for row in ROWS]
    # wrong-class probability: q3 0.95, q5 0.90, q4 0.60 (null verdict), q7 0.60
    assert [r["question_id"] for r in html_report.worst_mistakes(rows, 10)] == [
        "q3", "q5", "q4", "q7"]
    assert [r["question_id"] for r in html_report.worst_mistakes(rows, 2)] == ["q3", "q5"]
    assert html_report.worst_mistakes(rows, 0) == []


def test_report_page_holds_metrics_cards_and_inlined_pictures(tmp_path):
    answers = write_answers(tmp_path)
    out = tmp_path / "report.html"
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"question_id": "q3", "image": "x.png", "label": "real",
                                     "text": "Is this face real or fake?"}) + "\n")
    result = build(tmp_path, answers, "--images", tmp_path / "images", "--out", out,
                   "--rewards", rewards_for(answers, tmp_path), "--questions", questions)
    assert result.exit_code == 0, result.output
    assert "4 mistakes shown" in result.stdout and "warning" not in result.output
    page = out.read_text()
    overall = scoring.score_file(answers)["overall"]
    for key in ("f1", "balanced_accuracy", "ap", "eer"):
        assert f"<td>{100 * overall[key]:.1f}</td>" in page, key
    assert page.count('<article class="card mistake">') == 4
    assert page.index(">q3 &middot;") < page.index(">q5 &middot;")  # worst first
    assert "<strong>Skin Texture</strong>" in page and "PCR 1" in page
    assert '<p class="question">Is this face real or fake?</p>' in page
    assert page.count("data:image/jpeg;base64,") == 3  # q7's picture is missing
    assert '<div class="placeholder">image not found</div>' in page
    assert page.count("data:image/png;base64,") == 2  # ROC and precision-recall
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing fetched


def test_several_files_side_by_side(tmp_path):
    first = write_answers(tmp_path, "sft.jsonl")
    flipped = [(q, d, label, label, p) for q, d, label, _, p in ROWS]  # every verdict right
    second = write_answers(tmp_path, "prpo.jsonl", rows=flipped, model="prpo")
    out = tmp_path / "compare.html"
    result = build(tmp_path, first, second, "--out", out, "--worst", "2")
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert '<table class="metrics compare">' in page
    assert '<th class="file" colspan="8">sft.jsonl</th>' in page
    assert '<th class="file" colspan="8">prpo.jsonl</th>' in page
    assert "prpo.jsonl: 0 of 0 mistakes" in page and "sft.jsonl: 2 of 4 mistakes" in page
    assert "no --images root given" in page  # placeholders, not a crash


def test_text_is_escaped(tmp_path):
    answers = write_answers(tmp_path)
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    rows[2]["text"] = "<script>alert(1)</script> looks **fake**\n\n### Answer: fake"
    answers.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "report.html"
    assert build(tmp_path, answers, "--out", out).exit_code == 0
    page = out.read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_existing_out_is_refused_without_force(tmp_path, monkeypatch, capsys):
    answers = write_answers(tmp_path)
    out = tmp_path / "report.html"
    out.write_text("an earlier report")
    monkeypatch.setattr(sys, "argv", ["dx", "eval", "report", str(answers), "--out", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        cli_main.run()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and str(out) in err and "--force" in err
    assert len(err.strip().splitlines()) == 1 and out.read_text() == "an earlier report"
    assert build(tmp_path, answers, "--out", out, "--force").exit_code == 0
    assert out.read_text().startswith("<!DOCTYPE html>")


def test_rewards_of_other_answers_match_nothing_and_say_so(tmp_path):
    answers = write_answers(tmp_path)
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{"image": "x.png", "responses": [
        {"answer": "fake", "paragraphs": [{"text": "Other words.", "pcr": 1.0, "vcr": None}]}]}]))
    result = build(tmp_path, answers, "--out", tmp_path / "r.html", "--rewards", other)
    assert result.exit_code == 0, result.output
    assert "no shown mistake matched a --rewards response" in result.stderr
    with pytest.raises(DxError, match="not a row of `dx eval rewards --json`"):
        html_report.load_rewards([answers])  # an answers file is not a rewards file


def test_missing_matplotlib_and_bad_paths_are_user_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    with pytest.raises(DxError, match=re.escape('pip install "dxcli[plot]"')):
        html_report.write_report([write_answers(tmp_path)], tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()
    with pytest.raises(UsageError, match="is a folder"):
        html_report.write_report([write_answers(tmp_path)], tmp_path)
    with pytest.raises(UsageError, match="no such folder"):
        html_report.write_report([write_answers(tmp_path)], tmp_path / "r.html",
                                 images_root=tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------
# In a browser


def chromium_or_skip() -> str:
    """The Chromium binary; skipped only off CI (in CI the browser test must run)."""
    binary = shutil.which("chromium")
    if binary:
        return binary
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("CI=true but chromium is not installed (.ci/run installs it)")
    pytest.skip("chromium is not installed (apt-get install chromium); CI runs this test")


def run_chromium(binary: str, profile, *args: str) -> subprocess.CompletedProcess:
    # a profile folder of its own: two runs at once would otherwise share (and lock) one
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--no-first-run", f"--user-data-dir={profile}", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_report_in_headless_chromium(tmp_path):
    binary = chromium_or_skip()
    answers = write_answers(tmp_path)
    out = tmp_path / "report.html"
    result = build(tmp_path, answers, "--images", tmp_path / "images", "--out", out)
    assert result.exit_code == 0, result.output
    url = out.resolve().as_uri()
    shot = tmp_path / "shot.png"
    run_chromium(binary, tmp_path / "profile", f"--screenshot={shot}",
                 "--window-size=1200,2400", url)
    with Image.open(shot) as image:
        assert image.format == "PNG" and image.size == (1200, 2400)
        # a blank (all white) page has variance 0; text, tables and pictures give thousands
        assert ImageStat.Stat(image.convert("L")).var[0] > 500
    dom = run_chromium(binary, tmp_path / "profile", "--dump-dom", url).stdout
    assert "<title>dx evaluation report</title>" in dom
    f1 = f"{100 * scoring.score_file(answers)['overall']['f1']:.1f}"
    assert re.search(rf'<tr class="overall">.*?<td>{re.escape(f1)}</td>', dom, re.S)
    card = re.search(r'<article class="card mistake">(.*?)</article>', dom, re.S)
    assert card and "q3" in card.group(1) and "verdict: fake" in card.group(1)
