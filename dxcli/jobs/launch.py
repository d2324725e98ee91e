"""Run a task on the processes the profile asks for: in place for one, torchrun (or the DeepSpeed
launcher with a hostfile) for several. Ctrl-C stops every worker; a worker's failure is ours."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dxcli.base.errors import DxError, Interrupted
from dxcli.config import DxConfig
from dxcli.jobs.registry import run_task, write_job
from dxcli.runtime.dist import child_environment, cpu_comm_op_built, free_port
from dxcli.runtime.env import quiet_libraries
from dxcli.training.state import INTERRUPTED_FILE, pending_interruption


STOP_GRACE_S = 600.0  # how long Ctrl-C waits for the workers' checkpoint before killing them


@dataclass
class LaunchSpec:
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    hostfile: str | None = None


def spec_for(config: DxConfig, spec: LaunchSpec | None = None) -> LaunchSpec:
    """`spec` (addresses, node rank, hostfile) with the process counts of the run's own config."""
    return replace(spec or LaunchSpec(), nproc_per_node=config.hardware.nproc_per_node,
                   nnodes=config.hardware.nnodes)


def worker_command(spec: LaunchSpec, job_file: Path) -> list[str]:
    """The launcher command line for several processes."""
    if spec.hostfile:
        return ["deepspeed", "--hostfile", spec.hostfile, "--num_gpus", str(spec.nproc_per_node),
                "--master_addr", spec.master_addr, "--master_port", str(spec.master_port or 29500),
                "--module", "dxcli.jobs.worker", str(job_file)]
    port = spec.master_port or (free_port() if spec.nnodes == 1 else 29500)
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={spec.nproc_per_node}",
            f"--nnodes={spec.nnodes}", f"--node_rank={spec.node_rank}", f"--master_addr={spec.master_addr}",
            f"--master_port={port}", "-m", "dxcli.jobs.worker", str(job_file)]


def launch(task: str, job: Any, spec: LaunchSpec) -> None:
    """Run `job` (a registry job dataclass) in place for one process, else under the launcher.
    Ctrl-C (or SIGTERM to dx) lets the workers save a checkpoint, then raises `Interrupted`."""
    run_dir = Path(job.run_dir)
    for stale in [*run_dir.glob("error-rank*.txt"), run_dir / INTERRUPTED_FILE]:
        stale.unlink(missing_ok=True)
    job_file = run_dir / f"job-{task}.json"
    write_job(task, job, job_file)
    quiet_libraries()  # also points DeepSpeed at its accelerator and this environment's build folder
    if spec.nproc_per_node * spec.nnodes == 1 and not spec.hostfile:
        run_task(task, job)
        return
    check_cpu_comm_build()
    env = child_environment(dict(os.environ))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // spec.nproc_per_node)))
    proc = subprocess.Popen(worker_command(spec, job_file), env=env, start_new_session=True)
    with _sigterm_as_interrupt():
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            code = stop(proc)
    interrupted = pending_interruption(run_dir)
    if interrupted is not None:
        raise interrupted
    if code != 0:
        errors = sorted(run_dir.glob("error-rank*.txt"))
        detail = errors[0].read_text() if errors else f"see the worker output above (exit status {code})"
        raise DxError(f"{task} failed: {detail}")


def check_cpu_comm_build() -> None:
    """Several CPU processes need DeepSpeed's shared-memory comm op, built once with a C++ compiler:
    say so before any worker starts (a missing compiler would otherwise be a 100-line traceback)."""
    import torch

    if torch.cuda.is_available() or cpu_comm_op_built():
        return
    if not (shutil.which("c++") or shutil.which("g++")):
        raise DxError("several CPU processes need DeepSpeed's shared-memory comm op, built once with a C++ "
                      "compiler, and none was found: install one (e.g. apt-get install g++) or run one process")
    print("DeepSpeed builds its CPU communication op once for this environment (about a minute)...",
          file=sys.stderr, flush=True)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """A scheduler's SIGTERM to dx is handled like Ctrl-C: the workers get to save."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> int:
    """Ask the workers (not the launcher, whose own shutdown report is noise) to stop: each finishes
    its step, saves a checkpoint and exits. A second Ctrl-C, or `grace_s`, kills the whole group."""
    workers = _children(proc.pid) or [proc.pid]
    print("stopping: the workers finish their step and save a checkpoint (Ctrl-C again to kill them)",
          file=sys.stderr, flush=True)
    for pid in workers:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
    try:
        return proc.wait(timeout=grace_s)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise Interrupted("stopped without a checkpoint (killed); the last saved checkpoint is still "
                          "resumable with --resume") from None


def _children(pid: int) -> list[int]:
    """The launcher's child processes (the workers), read from /proc; empty where there is none."""
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        return [int(c) for task in tasks for c in (task / "children").read_text().split()]
    except OSError:
        return []
