"""Experiment trackers the metrics sink forwards each logged row to (`train.report_to`).

TensorBoard writes event files to RUN/tensorboard/ (`tensorboard --logdir RUN`). W&B writes its run
folder under RUN/wandb/, offline unless the user set WANDB_MODE (training machines often have no
network; `wandb sync RUN/wandb/offline-run-*` uploads it later). Both are optional extras:
`check_installed` runs in the parent, before any worker starts, so a missing one is one line.
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from dxcli.base.errors import DxError

# tracker -> (module that must be importable, pip extra that installs it)
REQUIREMENTS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}
WANDB_ID_FILE = "dx-run-id"  # in RUN/wandb: a resumed run continues the same W&B run


class Tracker(Protocol):
    def log(self, values: dict[str, float], step: int | None) -> None: ...

    def close(self, failed: bool = False) -> None: ...


def check_installed(names: Sequence[str]) -> None:
    """A DxError naming the pip extra for the first tracker asked for but not installed."""
    for name in dict.fromkeys(names):
        module, extra = REQUIREMENTS[name]
        if importlib.util.find_spec(module) is None:
            raise DxError(f'train.report_to lists {name}, which is not installed: pip install "dxcli[{extra}]"')


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The row's numbers (bools and the step itself left out): each becomes one scalar series."""
    return {key: float(value) for key, value in row.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


class TensorBoardTracker:
    def __init__(self, run_dir: Path):
        # torch's writer needs only the `tensorboard` package (tensorboardX would be one more)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, values: dict[str, float], step: int | None) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a crashed run still shows its curves up to the last logged step

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, run_dir: Path, config: Mapping[str, Any] | None):
        import wandb

        run_dir = Path(run_dir)
        (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        mode = os.environ.get("WANDB_MODE", "offline")
        try:
            self.run = wandb.init(
                dir=str(run_dir), mode=mode, project=os.environ.get("WANDB_PROJECT", "dx"),
                name=run_dir.resolve().name, id=wandb_run_id(run_dir), resume="allow", config=dict(config or {}),
                # console capture would wrap dx's own output and progress bar
                settings=wandb.Settings(console="off", silent=True))
        except Exception as exc:  # no login or no network when online: the user's to fix, in one line
            raise DxError(f"W&B did not start (WANDB_MODE={mode}): {exc}; unset WANDB_MODE to log offline") from None

    def log(self, values: dict[str, float], step: int | None) -> None:
        self.run.log(values, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def wandb_run_id(run_dir: Path) -> str:
    """The run's W&B id, made once and kept in RUN/wandb, so `--resume` extends the same W&B run."""
    path = Path(run_dir) / "wandb" / WANDB_ID_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8").strip()
    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id, encoding="utf-8")
    return run_id


def open_trackers(names: Sequence[str], run_dir: Path, config: Mapping[str, Any] | None = None) -> list[Tracker]:
    """One tracker per name (duplicates once); `config` is the resolved run config W&B records."""
    check_installed(names)
    opened: list[Tracker] = []
    for name in dict.fromkeys(names):
        opened.append(TensorBoardTracker(run_dir) if name == "tensorboard" else WandbTracker(run_dir, config))
    return opened
