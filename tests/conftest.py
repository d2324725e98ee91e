"""Shared, session-scoped artefacts: a small demo dataset and a tiny model trained on it once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    from dxcli.data.demo import make_demo

    root = tmp_path_factory.mktemp("demo") / "data"
    make_demo(root, seed=0, n_train=100, n_val=8, n_test=24)
    return root


@pytest.fixture(scope="session")
def trained(tmp_path_factory, demo_root) -> dict[str, Path]:
    """align then instruct with the cpu-tiny profile on the small demo set (in this process)."""
    from dxcli import config
    from dxcli.jobs.stages import run_sft_stage

    runs = tmp_path_factory.mktemp("runs")
    align = run_sft_stage("align", out=runs / "align", data=demo_root, say=lambda *_: None,
                          resolved=config.resolve("cpu-tiny", ["train.max_steps=6", "hardware.num_workers=0"]))
    instruct = run_sft_stage("instruct", out=runs / "instruct", data=demo_root, model=str(align),
                             say=lambda *_: None,
                             resolved=config.resolve("cpu-tiny", ["hardware.num_workers=0"]))
    return {"align": align, "instruct": instruct, "runs": runs}


@pytest.fixture(scope="session")
def toy(tmp_path_factory) -> dict[str, Path]:
    """The trivially learnable RL setting of tests/helpers_rl.py: its data tree (bright = real,
    dark = fake) and a tiny model that answers in the format, at random (~20 s, once)."""
    from helpers_rl import make_toy_data, train_toy_model

    work = tmp_path_factory.mktemp("toy")
    data = make_toy_data(work / "data")
    return {"data": data, "model": train_toy_model(work / "sft", data)}
