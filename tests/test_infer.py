"""eval infer (batching, resume, several processes), detect, and the trained model's answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dxcli import config
from dxcli.base.errors import DxError
from dxcli.cli.main import app

runner = CliRunner()


@pytest.fixture(scope="module")
def questions(tmp_path_factory, demo_root) -> Path:
    from dxcli.data.questions import generate_questions
    from dxcli.base.jsonio import write_jsonl_atomic

    rows, mismatches = generate_questions(demo_root, n=12, seed=0, balanced=True, split="test")
    assert not mismatches
    path = tmp_path_factory.mktemp("q") / "questions.jsonl"
    write_jsonl_atomic(path, rows)
    return path


def infer(model: Path, questions: Path, images: Path, out: Path, *sets: str, skip_bad: bool = False) -> int:
    from dxcli.jobs.stages import run_infer

    resolved = config.resolve("cpu-tiny", ["eval.max_new_tokens=48", *sets])
    return run_infer(model=str(model), questions=questions, images=images, out=out, config=resolved.config,
                     skip_bad=skip_bad)


def test_batched_and_one_at_a_time_generation_agree(trained, demo_root):
    from dxcli.model.generate import generate
    from dxcli.model.checkpoint import load_checkpoint
    from dxcli.base.template import DEFAULT_QUESTION
    from dxcli.base.images import load_rgb

    bundle = load_checkpoint(trained["instruct"])
    bundle.model.eval()
    images = [load_rgb(p) for p in sorted(demo_root.glob("*/test/*/*.png"))[:6]]
    questions = [DEFAULT_QUESTION, "Real or fake?", DEFAULT_QUESTION, "Look closely.", DEFAULT_QUESTION, "Is it real?"]
    batched = generate(bundle, images, questions, max_new_tokens=40)
    for i, image in enumerate(images):
        single = generate(bundle, [image], [questions[i]], max_new_tokens=40)
        assert single.token_ids[0] == batched.token_ids[i]
        assert single.head_probs[0] == pytest.approx(batched.head_probs[i], abs=1e-5)


def test_resume_after_a_crash_gives_the_same_file(trained, demo_root, questions, tmp_path):
    whole = tmp_path / "whole.jsonl"
    assert infer(trained["instruct"], questions, demo_root, whole, "eval.batch_size=4") == 12
    lines = whole.read_text().splitlines(keepends=True)
    assert len(lines) == 12
    for line in lines:
        row = json.loads(line)
        assert set(row) >= {"question_id", "image", "domain", "label", "text", "predict", "head_prob", "model"}
        assert row["predict"] in ("real", "fake", None)
    crashed = tmp_path / "crashed.jsonl"
    crashed.write_text("".join(lines[:5]) + lines[5][: len(lines[5]) // 2])  # torn last line
    assert infer(trained["instruct"], questions, demo_root, crashed, "eval.batch_size=3") == 12
    assert crashed.read_text() == whole.read_text()


def test_missing_image_gives_a_null_answer_and_the_run_goes_on(trained, demo_root, questions, tmp_path):
    rows = [json.loads(line) for line in questions.read_text().splitlines()][:3]
    rows[1]["image"] = "gan/test/fake/missing.png"
    broken = tmp_path / "q.jsonl"
    broken.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "a.jsonl"
    with pytest.raises(DxError, match="1 of 3 question.*missing.png.*--skip-bad"):
        infer(trained["instruct"], broken, demo_root, out)
    assert infer(trained["instruct"], broken, demo_root, out, skip_bad=True) == 3  # resumes: nothing redone
    result = runner.invoke(app, ["eval", "infer", "--model", str(trained["instruct"]), "--questions", str(broken),
                                 "--images", str(demo_root), "--out", str(out)])
    assert result.exit_code == 1 and "missing.png" in result.output and "--skip-bad" in result.output
    answers = {r["question_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    bad = answers[rows[1]["question_id"]]
    assert bad["predict"] is None and "error" in bad
    assert all("error" not in answers[rows[i]["question_id"]] for i in (0, 2))


def test_two_process_infer_merges_parts(trained, demo_root, questions, tmp_path):
    out = tmp_path / "answers.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "dxcli", "eval", "infer", "--model", str(trained["instruct"]), "--questions",
         str(questions), "--images", str(demo_root), "--out", str(out), "--nproc-per-node", "2",
         "--max-new-tokens", "48", "--batch-size", "4"],
        capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ids = [json.loads(line)["question_id"] for line in out.read_text().splitlines()]
    expected = sorted(json.loads(line)["question_id"] for line in questions.read_text().splitlines())
    assert ids == expected
    assert not list(tmp_path.glob("answers.jsonl.part-*"))
    single = tmp_path / "single.jsonl"
    infer(trained["instruct"], questions, demo_root, single, "eval.batch_size=4")
    assert [json.loads(x)["text"] for x in single.read_text().splitlines()] == \
        [json.loads(x)["text"] for x in out.read_text().splitlines()]


def test_detect_reports_a_corrupt_image_and_fails(trained, demo_root, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for src in sorted(demo_root.glob("gan/test/*/*.png"))[:2]:
        (folder / src.name).write_bytes(src.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = runner.invoke(app, ["detect", str(folder), "--model", str(trained["instruct"]), "--json",
                                 "--max-new-tokens", "32"])
    assert result.exit_code == 1
    lines = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 3
    broken = [x for x in lines if x["image"].endswith("broken.png")][0]
    assert broken["error"] and broken["verdict"] is None
    good = [x for x in lines if not x["image"].endswith("broken.png")]
    assert all(0.0 <= x["head_prob"] <= 1.0 and x["error"] is None for x in good)


def test_detect_head_only_is_consistent_with_the_head(trained, demo_root):
    image = sorted(demo_root.glob("gan/test/fake/*.png"))[0]
    result = runner.invoke(app, ["detect", str(image), "--model", str(trained["instruct"]), "--json",
                                 "--no-reasoning"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["verdict"] == ("fake" if row["head_prob"] >= 0.5 else "real") and row["reasoning"] is None


def test_plain_transformers_loads_the_model_and_generates_dx_text(trained, demo_root):
    """The lines of docs/interop.md: Auto classes, no remote code, the saved chat template; same greedy text
    as dx's own generate. The weights file is as readable as the other files of the folder."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from dxcli.base.images import load_rgb
    from dxcli.base.template import DEFAULT_QUESTION
    from dxcli.model.checkpoint import load_checkpoint
    from dxcli.model.generate import generate

    path, image = trained["instruct"], sorted(demo_root.glob("gan/test/fake/*.png"))[0]
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": DEFAULT_QUESTION}]}]
    inputs = processor(images=Image.open(image), text=processor.apply_chat_template(messages, add_generation_prompt=True),
                       return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=48, do_sample=False)
    text = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    bundle = load_checkpoint(path)
    bundle.model.eval()
    assert text == generate(bundle, [load_rgb(image)], [DEFAULT_QUESTION], max_new_tokens=48).texts[0]
    assert type(model).__name__ == "FastVlmForConditionalGeneration"
    modes = {f.name: f.stat().st_mode & 0o777 for f in path.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"]


def test_head_only_load_skips_the_llm_and_tokenizer_with_the_same_figures(trained, demo_root, tmp_path):
    """`detect --no-reasoning` loads the image side only; its head probabilities are the full model's."""
    import torch

    from dxcli.base.images import load_rgb
    from dxcli.model.checkpoint import load_checkpoint, load_image_side, save_checkpoint
    from dxcli.model.generate import encode_images

    images = [load_rgb(p) for p in sorted(demo_root.glob("*/test/*/*.png"))[:4]]
    for dtype in (None, torch.bfloat16):  # as trained (fp32), and a bf16 checkpoint as GPU runs save
        path = trained["instruct"]
        if dtype is not None:
            path = tmp_path / "bf16"
            save_checkpoint(load_checkpoint(trained["instruct"], dtype=dtype), path)
        full, head = load_checkpoint(path), load_image_side(path)
        full.model.eval()
        assert head.tokenizer is None
        assert all(p.is_meta for p in head.model.model.language_model.parameters())  # never read
        for whole, part in zip(full.model.image_side(), head.model.image_side()):
            ours = part.state_dict()
            assert all(t.dtype == ours[k].dtype and torch.equal(t, ours[k]) for k, t in whole.state_dict().items())
        assert encode_images(head, images)[1] == encode_images(full, images)[1]
