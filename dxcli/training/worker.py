"""Entry point of one worker process: `python -m dxcli.training.worker RUN/job.json`.

torchrun starts one per rank; a single-process run calls `run_task` in place instead.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from dxcli.errors import DxError


def run_task(task: str, job: dict[str, Any]) -> None:
    if task in ("align", "instruct"):
        from dxcli.training.sft import SftJob, run

        run(SftJob(**job))
    elif task == "prpo":
        from dxcli.rl.prpo import PrpoJob, run

        run(PrpoJob(**job))
    elif task == "infer":
        from dxcli.evaluation.infer import InferJob, run

        run(InferJob(**job))
    else:
        raise ValueError(f"unknown task {task}")


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    try:
        run_task(spec["task"], spec["job"])
    except DxError as exc:
        rank = os.environ.get("RANK", "0")
        Path(spec["job"]["run_dir"], f"error-rank{rank}.txt").write_text(str(exc))
        print(f"error (rank {rank}): {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
