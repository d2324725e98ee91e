"""align / instruct: masking, what learns, that it learns, multi-process, resume, and user errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dxcli import config
from dxcli.cli.main import app
from dxcli.runtime.dist import child_environment
from dxcli.training.sft_data import IGNORE_INDEX, tokenize_pair

runner = CliRunner()


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def test_only_the_assistant_reply_is_supervised(trained):
    from dxcli.model.checkpoint import load_checkpoint

    bundle = load_checkpoint(trained["align"])
    item = tokenize_pair(bundle.tokenizer, "Is it real?", "**Edges**: crisp.\n\n### Answer: real", 9, 384)
    supervised = [t for t in item.labels if t != IGNORE_INDEX]
    first = item.labels.index(supervised[0])
    assert all(label == IGNORE_INDEX for label in item.labels[:first])  # prompt (and image tokens) masked
    assert item.input_ids[first:] == supervised  # everything after the prompt is learned
    assert supervised[-1] == bundle.tokenizer.eos_token_id
    assert bundle.tokenizer.decode(supervised, skip_special_tokens=True).strip() == "**Edges**: crisp.\n\n### Answer: real"
    assert item.input_ids.count(bundle.tokenizer.convert_tokens_to_ids("<image>")) == 9


def test_truncation_is_counted_not_silent(trained):
    from dxcli.model.checkpoint import load_checkpoint

    bundle = load_checkpoint(trained["align"])
    short = tokenize_pair(bundle.tokenizer, "q", "word " * 400, 9, 120)
    assert short.truncated and len(short.input_ids) == 120


def test_align_trains_only_projector_and_head(trained):
    before = state(trained["runs"] / "align" / "base-model")
    after = state(trained["align"])
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "align changed nothing"
    assert all("multi_modal_projector" in k or "binary_head" in k for k in changed), sorted(changed)[:5]
    assert any("binary_head" in k for k in changed) and any("multi_modal_projector" in k for k in changed)


def test_vision_lr_is_the_towers_own_learning_rate(tmp_path, demo_root, trained):
    """With a near-zero instruct.vision_lr the unfrozen tower stays put while the LLM learns at
    instruct.lr; without it the tower moves as much as the rest."""
    from dxcli.jobs.stages import run_sft_stage

    def change(sets: list[str], out: Path) -> dict[str, float]:
        run = run_sft_stage("instruct", out=out, data=demo_root, model=str(trained["align"]),
                            say=lambda *_: None,
                            resolved=config.resolve("cpu-tiny", ["hardware.num_workers=0", "train.max_steps=3",
                                                                 "train.warmup_ratio=0", *sets]))
        before, after = state(trained["align"]), state(run)
        parts = {"vision": "vision_tower", "llm": "language_model"}
        return {part: max((after[k] - before[k]).abs().max().item() for k in before if mark in k)
                for part, mark in parts.items()}

    slow = change(["instruct.vision_lr=1e-9"], tmp_path / "slow")
    assert slow["vision"] < 1e-6 < 1e-4 < slow["llm"], slow
    same = change([], tmp_path / "same")
    assert same["vision"] > 1e-4, same


def test_instruct_lowers_lm_loss_and_head_separates_test_split(trained, demo_root):
    from sklearn.metrics import roc_auc_score

    from dxcli.model.generate import pixel_values
    from dxcli.model.checkpoint import load_checkpoint
    from dxcli.base.images import load_rgb

    rows = metrics(trained["runs"] / "instruct")
    assert rows[-1]["lm_loss"] <= 0.7 * rows[0]["lm_loss"], (rows[0], rows[-1])
    bundle = load_checkpoint(trained["instruct"])
    bundle.model.eval()
    paths = sorted(demo_root.glob("*/test/*/*.png"))
    labels = [int(p.parent.name == "fake") for p in paths]
    with torch.no_grad():
        feats = bundle.model.image_features(pixel_values(bundle, [load_rgb(p) for p in paths], torch.float32,
                                                         torch.device("cpu")))
        probs = torch.sigmoid(bundle.model.head_logits_from_features(feats)).tolist()
    assert roc_auc_score(labels, probs) >= 0.75


@pytest.mark.parametrize("stage", ["instruct", "align"])
def test_stop_and_resume_continues_where_it_stopped(tmp_path, demo_root, trained, monkeypatch, stage):
    """instruct trains every part (cpu-tiny unfreezes the tower); align leaves the LLM frozen, and
    its checkpoint leaves the LLM out: --resume takes it from the starting model again."""
    from dxcli.jobs.stages import run_sft_stage

    sets = ["hardware.num_workers=0", "train.max_steps=6", "train.log_every=1", "hardware.micro_batch=4"]
    whole = run_sft_stage(stage, out=tmp_path / "whole", data=demo_root, model=str(trained["align"]),
                          resolved=config.resolve("cpu-tiny", sets), say=lambda *_: None)
    monkeypatch.setenv("DX_STOP_AFTER_STEP", "3")
    with pytest.raises(SystemExit):
        run_sft_stage(stage, out=tmp_path / "split", data=demo_root, model=str(trained["align"]),
                      resolved=config.resolve("cpu-tiny", sets), say=lambda *_: None)
    assert [r["step"] for r in metrics(tmp_path / "split")] == [1, 2, 3]
    if stage == "align":  # optimizer + projector and head only: less than the frozen LLM's fp32 weights
        llm = sum(v.numel() for k, v in state(trained["align"]).items() if "language_model" in k or "lm_head" in k)
        written = sum(f.stat().st_size for f in (tmp_path / "split" / "checkpoints").rglob("*") if f.is_file())
        assert written < 4 * llm, (written, llm)
    monkeypatch.delenv("DX_STOP_AFTER_STEP")
    run_sft_stage(stage, out=tmp_path / "split", model=str(trained["align"]), resume=True,
                  resolved=config.resolve("cpu-tiny", []), say=lambda *_: None)
    resumed, full = metrics(tmp_path / "split"), metrics(tmp_path / "whole")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(resumed, full):  # same data in the same order, same optimizer and schedule state
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
        assert a["lr"] == pytest.approx(b["lr"])
    assert (whole / "config.json").is_file() and (tmp_path / "split" / "model" / "config.json").is_file()
    resumed_model, whole_model = state(tmp_path / "split" / "model"), state(whole)
    assert all(torch.allclose(resumed_model[k], whole_model[k], atol=1e-6) for k in whole_model)


@pytest.fixture(scope="module")
def one_process_reference(tmp_path_factory, demo_root, trained) -> Path:
    """instruct for 2 steps in one process, two micro-batches of 1 per step (the 2-rank runs'
    samples), the tower in its own parameter group at a near-zero instruct.vision_lr."""
    from dxcli.jobs.stages import run_sft_stage

    out = tmp_path_factory.mktemp("one") / "run"
    sets = ["train.max_steps=2", "hardware.num_workers=0", "hardware.micro_batch=1", "hardware.grad_accum=2",
            "instruct.vision_lr=1e-9"]
    return run_sft_stage("instruct", out=out, resolved=config.resolve("cpu-tiny", sets), data=demo_root,
                         model=str(trained["align"]), say=lambda *_: None)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_process_zero_run(tmp_path, demo_root, trained, zero_stage, one_process_reference):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "dxcli", "train", "instruct", "--data", str(demo_root), "--model", str(trained["align"]),
         "--out", str(out), "--nproc-per-node", "2", "--set", "train.max_steps=2", "--set", "train.log_every=1",
         "--set", f"hardware.zero_stage={zero_stage}", "--set", "hardware.num_workers=0", "--set",
         "hardware.micro_batch=1", "--set", "instruct.vision_lr=1e-9"],
        capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout + result.stderr
    assert [r["step"] for r in metrics(out)] == [1, 2]
    # two ranks of micro-batch 1 take the same samples per step as one process accumulating two
    # micro-batches (rank r's shard is order[r::2]): the weights must agree, and under ZeRO-3 they
    # were gathered from both ranks before saving
    two, one = state(out / "model"), state(one_process_reference)
    assert two.keys() == one.keys()
    # 1% of the largest move two Adam steps at cpu-tiny's instruct.lr (2e-3) can make: Adam's
    # normalised update amplifies the summation-order noise of ZeRO-3's reduce in rows whose
    # gradient is tiny (embeddings of rare tokens: 1.4e-5 measured on one machine)
    assert all(torch.allclose(two[k], one[k], atol=4e-5) for k in one)
    start = state(trained["align"])
    moved = {part: max((two[k] - start[k]).abs().max().item() for k in start if part in k)
             for part in ("vision_tower", "language_model")}
    # the tower's own parameter group (instruct.vision_lr) holds on both ranks and both stages
    assert moved["vision_tower"] < 1e-6 < 1e-4 < moved["language_model"], moved


def test_worker_failure_is_the_command_failure(tmp_path, demo_root, trained):
    records = tmp_path / "records.jsonl"
    records.write_text((trained["runs"] / "align" / "train-records.jsonl").read_text())
    result = subprocess.run(
        [sys.executable, "-m", "dxcli", "train", "align", "--data", str(records), "--images", str(demo_root),
         "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "fail"), "--nproc-per-node", "2"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "error" in result.stderr.lower() and "nope" in result.stderr


def test_missing_data_is_a_usage_error(tmp_path):
    result = runner.invoke(app, ["train", "align", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "--data is required" in result.output


def test_existing_run_needs_resume_or_force(tmp_path, demo_root):
    out = tmp_path / "run"
    (out / "checkpoints" / "step-0000003").mkdir(parents=True)
    (out / "config.yaml").write_text("{}")
    result = runner.invoke(app, ["train", "align", "--data", str(demo_root), "--out", str(out)])
    assert result.exit_code == 1 and "--resume" in result.output
    assert (out / "config.yaml").read_text() == "{}"  # nothing overwritten


def test_a_run_that_failed_before_its_first_step_does_not_block_the_retry(tmp_path, demo_root, trained):
    out = tmp_path / "run"
    base = ["train", "align", "--model", str(trained["align"]), "--out", str(out), "--set", "train.max_steps=1",
            "--set", "hardware.num_workers=0"]
    bad = runner.invoke(app, [*base, "--data", str(tmp_path / "no-such-data")])
    assert bad.exit_code == 2 and "no-such-data" in bad.output
    good = runner.invoke(app, [*base, "--data", str(demo_root)])
    assert good.exit_code == 0, good.output
    assert (out / "model" / "config.json").is_file()


def test_bad_images_stop_training_unless_skipped(tmp_path, demo_root):
    from dxcli.jobs.prepare import prepare_records

    tree = tmp_path / "tree"
    shutil.copytree(demo_root, tree)
    victim = sorted(tree.glob("gan/train/fake/*.png"))[0]
    victim.write_bytes(b"not an image")
    with pytest.raises(Exception) as err:
        prepare_records(tree, None, tmp_path)
    assert victim.name in str(err.value) and "--skip-bad" in str(err.value)
    prepared = prepare_records(tree, None, tmp_path, skip_bad=True)
    assert len(prepared.skipped) == 1 and prepared.skipped[0][0].endswith(victim.name)


def default_sigint() -> None:
    """In the child before exec: Ctrl-C's default action. A test run started in the background
    (`pytest &` in a script) has SIGINT ignored, every child inherits that, and Python then never
    raises KeyboardInterrupt: the Ctrl-C under test would never arrive."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for_metrics(out: Path, rows: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= rows:
            return
        time.sleep(0.2)
    detail = proc.communicate()[1][-3000:] if proc.poll() is not None else ""
    raise AssertionError(f"training did not reach {rows} logged steps (exit {proc.poll()}): {detail}")


def test_ctrl_c_stops_every_worker_after_a_checkpoint(tmp_path, demo_root, trained):
    import signal

    import psutil

    out = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dxcli", "train", "align", "--data", str(demo_root), "--model", str(trained["align"]),
         "--out", str(out), "--nproc-per-node", "2", "--set", "align.epochs=50", "--set", "hardware.num_workers=0",
         "--set", "train.log_every=1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        preexec_fn=default_sigint)
    wait_for_metrics(out, 2, proc)
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert len(workers) >= 3  # torchrun and its two workers
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
    assert "Traceback" not in stderr and "stopped:" in stderr and "--resume" in stderr
    assert list((out / "checkpoints").glob("step-*")), "no checkpoint was saved on Ctrl-C"


def test_sigint_then_resume_matches_an_uninterrupted_run(tmp_path, demo_root, trained):
    """Ctrl-C mid-run saves the step it finished; --resume continues there and ends like a run
    that was never stopped, with each step in metrics.jsonl once."""
    import signal

    def command(out: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "dxcli", "train", "align", "--data", str(demo_root), "--model",
                str(trained["align"]), "--out", str(out), "--set", "train.max_steps=24", "--set",
                "train.log_every=1", "--set", "hardware.num_workers=0", *extra]

    split, whole = tmp_path / "split", tmp_path / "whole"
    env = child_environment(dict(os.environ))  # this test process may hold a process group of its own
    proc = subprocess.Popen(command(split), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=default_sigint)
    wait_for_metrics(split, 5, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "checkpoint saved" in stderr, stderr[-2000:]
    (tag,) = [p.name for p in (split / "checkpoints").glob("step-*")]
    stopped_at = int(tag.split("-")[1])
    assert 5 <= stopped_at < 24
    resumed = subprocess.run(command(split, "--resume"), capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {tag}" in resumed.stdout + resumed.stderr
    subprocess.run(command(whole), capture_output=True, text=True, check=True, env=env)
    steps = [row["step"] for row in metrics(split)]
    assert steps == list(range(1, 25))
    assert metrics(split)[-1]["loss"] == pytest.approx(metrics(whole)[-1]["loss"], rel=1e-4, abs=1e-5)


def test_resume_without_a_checkpoint_says_so(tmp_path, demo_root):
    out = tmp_path / "never"
    out.mkdir()
    (out / "config.yaml").write_text("{}")
    result = runner.invoke(app, ["train", "align", "--data", str(demo_root), "--out", str(out), "--resume"])
    assert result.exit_code == 1 and "no checkpoint" in result.output


def test_a_head_left_at_chance_is_reported(tmp_path):
    """An instruct run whose binary head ended at ln 2 (no better than a coin) says so; a head
    that learned, a smoke-length run, and a run without metrics say nothing."""
    from dxcli.jobs.stages import sft_head_warning

    def warning(losses: list[float], every: int = 5) -> str | None:
        rows = [{"step": every * (i + 1), "bin_loss": loss} for i, loss in enumerate(losses)]
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return sft_head_warning(tmp_path)

    assert sft_head_warning(tmp_path / "missing") is None
    chance = warning([0.693, 0.692, 0.694, 0.691, 0.694, 0.693])  # logged up to step 30
    assert chance is not None and "binary head did not learn" in chance and "0.693" in chance
    assert warning([0.69, 0.5, 0.3, 0.2, 0.1, 0.05]) is None  # it learned
    assert warning([0.693] * 6, every=2) is None  # 12 steps: a smoke test, too short to judge
    assert warning([0.3, 0.2, 0.693, 0.692, 0.694, 0.693, 0.69]) is not None  # the end counts
