"""The tasks a worker process can run: name -> (job dataclass, run function).

Every job is a dataclass with `run_dir` and `config` (the resolved config.yaml); it travels to
the workers as `RUN/job-TASK.json` = {"task": name, "job": asdict(job)} and comes back as the
same dataclass. One convention for training stages and inference alike.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from dxcli.evaluation import infer
from dxcli.training import prpo, sft


@dataclass(frozen=True)
class Task:
    job_type: type
    run: Callable[[Any], Any]


TASKS: dict[str, Task] = {
    "align": Task(sft.SftJob, sft.run),
    "instruct": Task(sft.SftJob, sft.run),
    "prpo": Task(prpo.PrpoJob, prpo.run),
    "infer": Task(infer.InferJob, infer.run),
}


def write_job(task: str, job: Any, path: Path) -> None:
    if not isinstance(job, TASKS[task].job_type):
        raise TypeError(f"task {task} takes a {TASKS[task].job_type.__name__}, got {type(job).__name__}")
    Path(path).write_text(json.dumps({"task": task, "job": asdict(job)}, indent=2), encoding="utf-8")


def read_job(path: Path) -> tuple[str, Any]:
    spec = json.loads(Path(path).read_text(encoding="utf-8"))
    task = spec["task"]
    return task, TASKS[task].job_type(**spec["job"])


def run_task(task: str, job: Any) -> Any:
    return TASKS[task].run(job)
