"""Entry point of one worker process: `python -m dxcli.jobs.worker RUN/job-TASK.json`.

torchrun starts one per rank; a single-process run calls `registry.run_task` in place instead.
A user-caused failure is written to RUN/error-rankN.txt so the parent can show it as one line.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any

from dxcli.base.errors import DxError, Interrupted, user_os_error
from dxcli.jobs.registry import read_job, run_task
from dxcli.runtime.dist import from_env
from dxcli.runtime.env import quiet_libraries


def main(argv: list[str]) -> int:
    quiet_libraries()
    job_file = Path(argv[-1])  # the last argument: a launcher may put `--local_rank=N` before it
    rank = from_env().rank
    if not job_file.is_file():
        # another node's worker (DeepSpeed hostfile) that cannot see the run folder: no error file
        # can reach the launching dx, so the reason goes to the output it relays
        print(f"error (rank {rank}, {socket.gethostname()}): {job_file} not found: with several nodes, --out "
              "must be one folder that every node shares, at the same path", file=sys.stderr, flush=True)
        return 1
    task, job = read_job(job_file)
    try:
        run_task(task, job)
    except Interrupted:
        return 0  # checkpoint saved and noted for the launching dx, which tells the user once
    except OSError as exc:
        user = user_os_error(exc)
        if user is None:
            raise
        return _report(job, rank, user)
    except DxError as exc:
        return _report(job, rank, exc)
    return 0


def _report(job: Any, rank: int, exc: DxError) -> int:
    """The error file the launching dx shows as one line; the same on stderr for the log."""
    Path(job.run_dir, f"error-rank{rank}.txt").write_text(str(exc))
    print(f"error (rank {rank}): {exc}", file=sys.stderr, flush=True)
    return exc.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
