"""Signals for a launched run's workers, wherever they run.

Ctrl-C must reach the workers themselves: each finishes its step, saves its share of a checkpoint
and exits 0, and the launchers then end on their own. A launcher that gets the signal instead
turns it into a kill: torchrun stops its workers; DeepSpeed's runner sends SIGTERM over pdsh to
each node's `deepspeed.launcher.launch`, which terminates its workers and kills them 30 s later
(a 7B checkpoint takes longer). With several hosts the workers are not even our descendants:
pdsh/ssh started them, so they are found by their command line on each host instead.

A worker is a process started as `python ... -m dxcli.jobs.worker [...] JOB` for this run's job
file: matched on its exact arguments (no pattern that could also match the launcher, pdsh or ssh,
whose command lines carry the same words). `python -m dxcli.jobs.signals SIGNAL JOB` signals the
workers of JOB on the host it runs on; dx runs it on every host of a hostfile through pdsh.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from contextlib import suppress
from pathlib import Path

WORKER_MODULE = "dxcli.jobs.worker"
REMOTE_TIMEOUT_S = 60.0


def worker_pids(job_file: Path, root_pid: int | None = None) -> list[int]:
    """This host's workers of `job_file`: among `root_pid`'s descendants, or among every process
    this user may see when None. A worker's forked children (data loaders) share its command
    line; only the topmost of such a chain is a worker."""
    job = os.path.realpath(job_file)
    candidates = _descendants(root_pid) if root_pid is not None else _all_pids()
    matched = {pid for pid in candidates if _runs_job(pid, job)}
    return sorted(pid for pid in matched if _parent(pid) not in matched)


def signal_local_workers(job_file: Path, sig: int, root_pid: int | None = None) -> list[int]:
    """Send `sig` to this host's workers of `job_file`; returns the pids signalled."""
    sent = []
    for pid in worker_pids(job_file, root_pid):
        with suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
            sent.append(pid)
    return sent


def remote_command(hosts: list[str], job_file: Path, sig: int) -> list[str]:
    """pdsh running `python -m dxcli.jobs.signals` on every host, as DeepSpeed's runner reaches them
    (same interpreter path, same working directory, so a relative job path means the same file)."""
    on_host = (f"cd {shlex.quote(os.getcwd())} && {shlex.quote(sys.executable)} -m dxcli.jobs.signals "
               f"{signal.Signals(sig).name} {shlex.quote(str(job_file))}")
    return ["pdsh", "-S", "-w", ",".join(hosts), on_host]


def signal_remote_workers(hosts: list[str], job_file: Path, sig: int) -> str | None:
    """Send `sig` to the workers of `job_file` on every host; returns a problem to report, or None."""
    env = {**os.environ, "PDSH_RCMD_TYPE": "ssh"}  # as DeepSpeed's runner sets it
    try:
        done = subprocess.run(remote_command(hosts, job_file, sig), env=env, capture_output=True, text=True,
                              timeout=REMOTE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"could not reach the workers on {', '.join(hosts)} through pdsh: {exc}"
    if done.returncode != 0:
        return f"pdsh could not signal every host ({done.stderr.strip()[-300:] or f'exit {done.returncode}'})"
    return None


def _runs_job(pid: int, job: str) -> bool:
    argv = _argv(pid)
    if len(argv) < 3 or not any(a == "-m" and b == WORKER_MODULE for a, b in zip(argv, argv[1:])):
        return False
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    return os.path.realpath(os.path.join(cwd, argv[-1])) == job


def _argv(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0")[:-1]]


def _parent(pid: int) -> int | None:
    try:
        # the command name (field 2) may hold spaces and parentheses: read after its last ')'
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _all_pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def _descendants(root: int) -> list[int]:
    """Every process below `root`, from the parent links in /proc."""
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        parent = _parent(pid)
        if parent is not None:
            children.setdefault(parent, []).append(pid)
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def main(argv: list[str]) -> int:
    """`python -m dxcli.jobs.signals SIGINT|SIGKILL|... JOB`: signal this host's workers of JOB."""
    if len(argv) != 2:
        print("usage: python -m dxcli.jobs.signals SIGNAL JOB_FILE", file=sys.stderr)
        return 2
    sent = signal_local_workers(Path(argv[1]), signal.Signals[argv[0]])
    print(f"{os.uname().nodename}: {argv[0]} to {len(sent)} worker(s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
