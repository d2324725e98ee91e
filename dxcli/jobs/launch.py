"""Run a task on the processes the profile asks for: in place for one, torchrun (or the DeepSpeed
launcher with a hostfile) for several. Ctrl-C stops every worker; a worker's failure is ours.

Several nodes (torchrun): every node runs dx; node 0 prepares the shared run folder and calls
`launch`, the others `join_run` (see `dxcli.jobs.nodes`). With a hostfile dx runs once."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path
from typing import Any

from dxcli import config as cfgmod
from dxcli.base.errors import DxError, Interrupted
from dxcli.config import DxConfig
from dxcli.jobs.nodes import (LaunchSpec, check_spec, forget_ready, hostfile_hosts, mark_ready, rendezvous_port,
                              wait_for_node0)
from dxcli.jobs.registry import run_task, write_job
from dxcli.jobs.signals import signal_local_workers, signal_remote_workers
from dxcli.runtime.dist import child_environment, cpu_comm_op_built
from dxcli.runtime.env import quiet_libraries
from dxcli.training.state import INTERRUPTED_FILE, pending_interruption

__all__ = ["LaunchSpec", "join_run", "launch", "spec_for", "stop", "worker_command"]

STOP_GRACE_S = 600.0  # how long Ctrl-C waits for the workers' checkpoint before killing them


def spec_for(config: DxConfig, spec: LaunchSpec | None = None) -> LaunchSpec:
    """`spec` (addresses, node rank, hostfile) with the process counts of the run's own config."""
    return replace(spec or LaunchSpec(), nproc_per_node=config.hardware.nproc_per_node,
                   nnodes=config.hardware.nnodes)


def worker_command(spec: LaunchSpec, job_file: Path) -> list[str]:
    """The launcher command line for several processes."""
    if spec.hostfile:
        # no --master_addr unless given: the DeepSpeed launcher then asks the first host for its
        # address (a loopback default would make every other node dial itself); --no_local_rank:
        # the worker takes the job file as its only argument
        address = ["--master_addr", spec.master_addr] if spec.master_addr else []
        return ["deepspeed", "--hostfile", spec.hostfile, "--num_gpus", str(spec.nproc_per_node), *address,
                "--master_port", str(rendezvous_port(spec)), "--no_local_rank", "--module", "dxcli.jobs.worker",
                str(job_file)]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={spec.nproc_per_node}",
            f"--nnodes={spec.nnodes}", f"--node_rank={spec.node_rank}",
            f"--master_addr={spec.master_addr or '127.0.0.1'}", f"--master_port={rendezvous_port(spec)}",
            "-m", "dxcli.jobs.worker", str(job_file)]


def launch(task: str, job: Any, spec: LaunchSpec) -> None:
    """Run `job` (a registry job dataclass) in place for one process, else under the launcher.
    Ctrl-C (or SIGTERM to dx) lets the workers save a checkpoint, then raises `Interrupted`.

    This is node 0's part (or the only node's): it clears what a previous launch left in the run
    folder and writes the job file; with torchrun on several nodes it then tells the other nodes,
    which run `join_run` instead and never write or delete anything in the shared folder."""
    if spec.joins_node0:
        raise ValueError("launch() prepares the run on node 0; the other nodes call join_run()")
    check_spec(spec)
    run_dir = Path(job.run_dir)
    for stale in [*run_dir.glob("error-rank*.txt"), run_dir / INTERRUPTED_FILE]:
        stale.unlink(missing_ok=True)
    job_file = run_dir / f"job-{task}.json"
    write_job(task, job, job_file)
    quiet_libraries()  # also points DeepSpeed at its accelerator and this environment's build folder
    if spec.nproc_per_node * spec.nnodes == 1 and not spec.hostfile:
        run_task(task, job)
        return
    spec = replace(spec, master_port=rendezvous_port(spec))  # the launcher and the marker name one port
    other_nodes_wait = spec.nnodes > 1 and not spec.hostfile
    if other_nodes_wait:
        mark_ready(run_dir, task=task, job_file=job_file, spec=spec)
    try:
        _run_workers(task, spec, job_file, forget_interruption=True)
    finally:
        if other_nodes_wait:  # every node read it before its workers could join ours
            forget_ready(run_dir)


def join_run(task: str, run_dir: Path, spec: LaunchSpec, say: Callable[[str], None] = print) -> Path:
    """A node other than 0 (torchrun, several nodes): wait for node 0 to prepare the shared run
    folder, then run this node's workers on node 0's job file, with the run's process counts.
    Reads the folder only. Returns RUN/model, which node 0 saves."""
    run_dir = Path(run_dir)
    check_spec(spec)
    marker = wait_for_node0(run_dir, spec, say=say)
    if marker["task"] != task:
        raise DxError(f"node {spec.node_rank}: node 0 launched {marker['task']} in {run_dir}, this node {task}: "
                      "run the same command on every node")
    spec = spec_for(cfgmod.load(run_dir / "config.yaml"), replace(spec, master_port=marker["master_port"]))
    quiet_libraries()
    _run_workers(task, spec, run_dir / marker["job_file"], forget_interruption=False)
    return run_dir / "model"


def _run_workers(task: str, spec: LaunchSpec, job_file: Path, *, forget_interruption: bool) -> None:
    """Start the launcher, wait for it (Ctrl-C: `stop`), and turn the workers' outcome into ours.
    Only node 0 deletes the workers' interruption note: the other nodes share the folder."""
    check_cpu_comm_build()
    run_dir = job_file.parent
    env = child_environment(dict(os.environ))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // spec.nproc_per_node)))
    proc = subprocess.Popen(worker_command(spec, job_file), env=env, start_new_session=True)
    with _sigterm_as_interrupt():
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            code = stop(proc, job_file, remote_hosts(spec))
    interrupted = pending_interruption(run_dir, forget=forget_interruption)
    if interrupted is not None:
        raise interrupted
    if code != 0:
        errors = sorted(run_dir.glob("error-rank*.txt"))
        detail = errors[0].read_text() if errors else f"see the worker output above (exit status {code})"
        raise DxError(f"{task} failed: {detail}")


def remote_hosts(spec: LaunchSpec) -> list[str]:
    """The hostfile's hosts when DeepSpeed's runner starts their workers through pdsh (then they
    are not our descendants); a hostfile of one host is launched locally, under the runner."""
    hosts = hostfile_hosts(Path(spec.hostfile)) if spec.hostfile else []
    return hosts if len(hosts) > 1 else []


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


def stop(proc: subprocess.Popen, job_file: Path, hosts: list[str] | None = None,
         grace_s: float = STOP_GRACE_S) -> int:
    """Ask the workers (not the launcher, which would kill them) to stop: each finishes its step,
    saves a checkpoint and exits, and the launchers end on their own. `hosts`: a hostfile's hosts,
    whose workers pdsh started; they are reached through pdsh. A second Ctrl-C, or `grace_s`,
    kills the workers on every host and the launcher's process group."""
    if not _signal_workers(proc, job_file, hosts or [], signal.SIGINT):
        # no worker (yet, or any more): a launcher still waiting for the other nodes sits in a
        # blocking call that defers its signal handlers, and there is nothing to save
        with suppress(subprocess.TimeoutExpired):
            return proc.wait(timeout=2)  # it was ending anyway
        _kill_group(proc)
        raise Interrupted("stopped before any worker started; nothing was saved (a previous checkpoint is "
                          "still resumable with --resume)")
    print("stopping: the workers finish their step and save a checkpoint (Ctrl-C again to kill them)",
          file=sys.stderr, flush=True)
    try:
        return proc.wait(timeout=grace_s)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        _signal_workers(proc, job_file, hosts or [], signal.SIGKILL)
        _kill_group(proc)
        raise Interrupted("stopped without a checkpoint (killed); the last saved checkpoint is still "
                          "resumable with --resume") from None


def _signal_workers(proc: subprocess.Popen, job_file: Path, hosts: list[str], sig: int) -> bool:
    """`sig` to this launch's workers: the launcher's descendants here, and through pdsh those on
    `hosts`. Returns whether any worker was reached (the remote ones are assumed reached)."""
    local = signal_local_workers(job_file, sig, root_pid=proc.pid)
    problem = signal_remote_workers(hosts, job_file, sig) if hosts else None
    if problem:
        print(f"warning: {problem}", file=sys.stderr, flush=True)
    return bool(local or hosts)


def _kill_group(proc: subprocess.Popen) -> None:
    """The launcher and what it started on this host (its own session: start_new_session)."""
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
