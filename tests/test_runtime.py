"""Process identity and collectives: the rules that only a GPU run would otherwise reveal."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from dxcli.runtime import dist as distmod
from dxcli.runtime.dist import Dist, MetricKeys, all_reduce_sum, collective_device, reduce_metrics

PACKAGE = Path(__file__).resolve().parents[1] / "dxcli"
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "broadcast", "reduce", "reduce_scatter",
               "all_gather_into_tensor", "reduce_scatter_tensor"}


def test_nccl_collectives_get_this_ranks_gpu_and_gloo_the_cpu():
    assert collective_device("nccl", Dist(1, 2, 1)) == torch.device("cuda", 1)
    assert collective_device("NCCL", Dist(0, 8, 3)) == torch.device("cuda", 3)
    assert collective_device("gloo", Dist(1, 2, 1)) == torch.device("cpu")


def test_reduction_hands_the_backend_a_tensor_on_its_device(monkeypatch):
    """What the loops' metric reduction gives NCCL: a CUDA tensor, never a CPU one."""
    seen = []
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(distmod, "collective_device", lambda backend, d: seen.append(backend) or torch.device("meta"))
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor: seen.append(tensor.device))
    with pytest.raises(NotImplementedError):  # a meta tensor cannot be read back: we only look at devices
        all_reduce_sum([1.0, 2.0], Dist(0, 2, 0))
    assert seen == ["nccl", torch.device("meta")]


def test_reductions_average_over_ranks_with_gloo(monkeypatch):
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a: "gloo")
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor: tensor.mul_(2))  # two equal ranks
    row = reduce_metrics({"loss": 1.5, "step": 3, "name": "x"}, MetricKeys(means=("loss",), same=("step", "name")),
                         Dist(0, 2, 0))
    assert row == {"loss": 1.5, "step": 3, "name": "x"}
    assert all_reduce_sum([1.0], Dist(0, 1, 0)) == [1.0]  # one process: no collective at all


def test_collectives_are_called_only_from_the_runtime():
    """A loop calling torch.distributed.all_reduce itself would skip the device rule above."""
    callers = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "runtime":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES:
                callers.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.attr}")
    assert callers == []


def test_identity_comes_from_the_launcher_environment(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distmod.from_env() == Dist(3, 4, 1)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key)
    assert distmod.from_env() == Dist(0, 1, 0) and distmod.from_env().main


def test_progress_fits_80_columns_with_bar_count_elapsed_and_eta():
    import io

    from rich.console import Console

    from dxcli.runtime.progress import ProgressView

    out = io.StringIO()
    console = Console(file=out, width=80, force_terminal=True, color_system=None)
    view = ProgressView(300, "instruct", True, console=console)
    metrics = {"loss": 5.2451, "lm_loss": 1.0392, "bin_loss": 0.4205, "lr": 1.9e-05, "tokens_per_s": 10234.5}
    view.update(150, metrics)
    view._progress.refresh()
    view.close()
    screen = [line for line in out.getvalue().replace("\r", "\n").split("\n") if "150/300" in line]
    assert screen, out.getvalue()
    first = screen[-1]
    assert len(first.rstrip()) <= 80 and "instruct" in first and "━" in first
    assert "eta" in first and first.count(":") >= 4  # elapsed h:mm:ss and remaining h:mm:ss
    assert "loss 5.245" in out.getvalue()  # the metrics line below
