"""Run a task on the processes the profile asks for: in place for one, torchrun (or the DeepSpeed
launcher with a hostfile) for several. Ctrl-C stops every worker; a worker's failure is ours."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dxcli.errors import DxError


@dataclass
class LaunchSpec:
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    hostfile: str | None = None


def spec_for(config, spec: LaunchSpec | None = None) -> LaunchSpec:
    """`spec` (addresses, node rank, hostfile) with the process counts of the run's own config."""
    from dataclasses import replace

    return replace(spec or LaunchSpec(), nproc_per_node=config.hardware.nproc_per_node,
                   nnodes=config.hardware.nnodes)


def worker_command(spec: LaunchSpec, job_file: Path) -> list[str]:
    """The launcher command line for several processes."""
    if spec.hostfile:
        return ["deepspeed", "--hostfile", spec.hostfile, "--num_gpus", str(spec.nproc_per_node),
                "--master_addr", spec.master_addr, "--master_port", str(spec.master_port or 29500),
                "--module", "dxcli.training.worker", str(job_file)]
    from dxcli.training.runtime import free_port

    port = spec.master_port or (free_port() if spec.nnodes == 1 else 29500)
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={spec.nproc_per_node}",
            f"--nnodes={spec.nnodes}", f"--node_rank={spec.node_rank}", f"--master_addr={spec.master_addr}",
            f"--master_port={port}", "-m", "dxcli.training.worker", str(job_file)]


def launch(task: str, job: dict[str, Any], run_dir: Path, spec: LaunchSpec) -> None:
    run_dir = Path(run_dir)
    for stale in run_dir.glob("error-rank*.txt"):
        stale.unlink()
    job_file = run_dir / f"job-{task}.json"
    job_file.write_text(json.dumps({"task": task, "job": job}, indent=2))
    if spec.nproc_per_node * spec.nnodes == 1 and not spec.hostfile:
        from dxcli.training.worker import run_task

        run_task(task, job)
        return
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // spec.nproc_per_node)))
    proc = subprocess.Popen(worker_command(spec, job_file), env=env, start_new_session=True)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        stop(proc)
        raise
    if code != 0:
        errors = sorted(run_dir.glob("error-rank*.txt"))
        detail = errors[0].read_text() if errors else f"see the worker output above (exit status {code})"
        raise DxError(f"{task} failed: {detail}")


def stop(proc: subprocess.Popen) -> None:
    """Interrupt the whole worker group, then kill what does not stop within 15 s."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
