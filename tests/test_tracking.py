"""train.report_to: TensorBoard event files and an offline W&B run beside metrics.jsonl."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dxcli import config
from dxcli.base.errors import UsageError
from dxcli.cli.main import app


def need(module: str) -> None:
    """Skipped off CI when the tracker is not installed; in CI (`.[dev]` installs both) it must run."""
    if importlib.util.find_spec(module) is not None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but {module} is not installed (the dev extra installs it)")
    pytest.skip(f'{module} is not installed (pip install "dxcli[{module}]")')


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, demo_root) -> Path:
    """A 3-step align run reporting to both trackers (W&B offline: WANDB_MODE unset)."""
    need("tensorboard")
    need("wandb")
    from dxcli.jobs.stages import run_sft_stage

    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("WANDB_MODE", raising=False)
        run = tmp_path_factory.mktemp("tracked") / "align"
        run_sft_stage("align", out=run, data=demo_root, say=lambda *_: None, resolved=config.resolve(
            "cpu-tiny", ["train.max_steps=3", "train.log_every=1", "hardware.num_workers=0",
                         "train.report_to=[tensorboard, wandb]"]))
    return run


def test_tensorboard_events_hold_the_metrics_jsonl_values(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = [json.loads(line) for line in (tracked_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert list((tracked_run / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(tracked_run / "tensorboard"))
    events.Reload()
    assert {"loss", "lm_loss", "bin_loss", "lr", "epoch", "tokens_per_s"} <= set(events.Tags()["scalars"])
    for key in ("loss", "bin_loss", "lr"):
        logged = events.Scalars(key)
        assert [e.step for e in logged] == [r["step"] for r in rows]
        assert [e.value for e in logged] == pytest.approx([r[key] for r in rows], rel=1e-6)


def test_wandb_offline_run_folder_under_the_run(tracked_run):
    folders = list((tracked_run / "wandb").glob("offline-run-*"))
    assert len(folders) == 1, list((tracked_run / "wandb").iterdir())
    (log,) = folders[0].glob("run-*.wandb")  # the run's records, for `wandb sync` later
    run_id = (tracked_run / "wandb" / "dx-run-id").read_text()
    assert log.name == f"run-{run_id}.wandb" and folders[0].name.endswith(run_id)
    data = log.read_bytes()
    assert b"bin_loss" in data and b"tokens_per_s" in data  # the logged series


def test_a_missing_tracker_is_one_line_naming_the_extra(demo_root, tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "align", "--data", str(demo_root), "--out", str(out),
                                      "--set", "train.report_to=wandb", "--set", "train.max_steps=1"])
    assert result.exit_code == 1
    assert 'pip install "dxcli[wandb]"' in result.output and "Traceback" not in result.output
    assert not out.exists()  # checked before the run folder (or any worker) was made


def test_report_to_values_are_checked():
    assert config.resolve("cpu-tiny", ["train.report_to=tensorboard,wandb"]).config.train.report_to == \
        ["tensorboard", "wandb"]
    assert config.resolve("cpu-tiny", []).config.train.report_to == []
    with pytest.raises(UsageError, match="tensorboard, wandb"):
        config.resolve("cpu-tiny", ["train.report_to=[tensorbord]"])
