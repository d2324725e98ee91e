"""Several nodes: where the launcher meets (`LaunchSpec`), what each node may do, and how the
nodes other than node 0 learn that node 0 has prepared the run.

With torchrun every node runs the same `dx` command with its own `--node-rank`, on one run folder
that every node shares. Node 0 alone prepares it (config, records, starting model, job file),
then writes RUN/.dx-node0-ready.json and starts its launcher; the other nodes never write or
delete anything in it: they wait for node 0, then start their own workers on node 0's job file.
With a DeepSpeed hostfile dx runs once, on the first host, and the launcher reaches the others.

Standard library only: the CLI checks flags and waits for node 0 before any heavy import, so a
missing flag or a node 0 that never started is a one-line error within seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dxcli.base.errors import DxError, UsageError
from dxcli.runtime.dist import free_port

READY_MARKER = ".dx-node0-ready.json"  # in the run folder: node 0 prepared it for this launch
WAIT_ENV = "DX_NODE0_WAIT_S"  # how long a node other than node 0 waits for node 0 (seconds)
DEFAULT_WAIT_S = 3600.0  # node 0 may check every image of a large dataset before it is ready
SHARED_GRACE_S = 90.0  # NFS may hide a new file for up to a minute (attribute caching)
POLL_S = 0.5
DEFAULT_PORT = 29500  # torchrun's and DeepSpeed's default rendezvous port


@dataclass
class LaunchSpec:
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None  # None: 127.0.0.1 on one node; the DeepSpeed launcher's choice with a hostfile
    master_port: int | None = None
    hostfile: str | None = None

    @property
    def joins_node0(self) -> bool:
        """Whether this dx only runs its node's workers in a run that node 0 prepares."""
        return self.node_rank > 0 and not self.hostfile


def check_spec(spec: LaunchSpec) -> None:
    """One-line UsageErrors for flags that would hang or wreck a multi-node run, before anything
    is prepared. `spec.nnodes` is the run's (flag, profile or saved config: `launch.spec_for`)."""
    if spec.hostfile:
        if not Path(spec.hostfile).is_file():
            raise UsageError(f"--hostfile {spec.hostfile}: no such file")
        if spec.node_rank != 0:
            raise UsageError("--node-rank is for torchrun runs (dx on every node); with --hostfile run dx once, "
                             "on the first host: the DeepSpeed launcher starts every node's workers")
        hosts = hostfile_hosts(Path(spec.hostfile))
        if len(hosts) > 1 and not shutil.which("pdsh"):
            raise DxError(f"--hostfile {spec.hostfile} names {len(hosts)} hosts: the DeepSpeed launcher reaches "
                          "them with pdsh (over ssh), which is not installed here (e.g. apt-get install pdsh)")
        return
    if spec.nnodes <= 1 and spec.node_rank != 0:
        raise UsageError(f"--node-rank {spec.node_rank} needs --nnodes (the number of nodes, 2 or more)")
    if not 0 <= spec.node_rank < spec.nnodes:
        raise UsageError(f"--node-rank {spec.node_rank} is outside 0..{spec.nnodes - 1} (--nnodes {spec.nnodes})")
    if spec.nnodes > 1 and not spec.master_addr:
        # a loopback default would make every other node dial itself and hang
        raise UsageError(f"--nnodes {spec.nnodes} needs --master-addr: node 0's address, reachable from every "
                         "node (run the same command on each node with its own --node-rank and the same --master-port)")


def rendezvous_port(spec: LaunchSpec) -> int:
    """The port every node's launcher meets on; one node without a port picks a free one."""
    if spec.master_port:
        return spec.master_port
    if spec.nnodes == 1 and spec.node_rank == 0 and not spec.hostfile:
        return free_port()
    return DEFAULT_PORT


def hostfile_hosts(path: Path) -> list[str]:
    """The hosts of a DeepSpeed hostfile (`HOST slots=N` lines; `#` starts a comment)."""
    lines = (line.split("#", 1)[0].strip() for line in Path(path).read_text().splitlines())
    return [line.split()[0] for line in lines if line]


def forget_ready(run_dir: Path) -> None:
    """Node 0, before it prepares a reused run folder (--resume): no node may start on the
    previous launch's marker while this launch's job is not written yet."""
    (Path(run_dir) / READY_MARKER).unlink(missing_ok=True)


def mark_ready(run_dir: Path, *, task: str, job_file: Path, spec: LaunchSpec) -> None:
    """Node 0, after preparing and writing the job file, just before starting its launcher on
    `spec.master_port` (already resolved: `rendezvous_port`)."""
    marker = {"launch_id": uuid.uuid4().hex, "task": task, "job_file": Path(job_file).name,
              "master_addr": spec.master_addr, "master_port": spec.master_port, "nnodes": spec.nnodes,
              "host": socket.gethostname(), "written_at": time.time()}
    path = Path(run_dir) / READY_MARKER
    scratch = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    scratch.write_text(json.dumps(marker, indent=2))
    os.replace(scratch, path)  # a reader sees the whole marker or none


def wait_for_node0(run_dir: Path, spec: LaunchSpec, *, say: Callable[[str], None] = print,
                   wait_s: float | None = None) -> dict:
    """On a node other than 0: wait until node 0 has prepared RUN for this launch; returns its marker.

    Freshness comes from the rendezvous port, not from clocks. Node 0 writes the marker and only
    then starts its launcher, which listens on --master-addr:--master-port until every node has
    joined; a previous launch's launcher has exited. So once that port answers, the marker this
    node reads belongs to this launch, even when an older one from a quick relaunch in the same
    folder (--resume) was there when this node started. Comparing the marker's time with this
    node's start would need synchronised clocks and still accept a marker seconds old. The
    marker's port must also be ours (a marker left by a launch on another port is not this one).
    Node 0 also deletes the marker before preparing a reused folder and after its launch; and
    another program on that port would make node 0's own launcher fail to start.
    """
    run_dir, port = Path(run_dir), rendezvous_port(spec)
    wait_s = node0_wait_s() if wait_s is None else wait_s
    deadline = time.monotonic() + wait_s
    said = False
    while not _port_answers(spec.master_addr, port):
        if not said:  # once, and only when there is a wait (dx checks twice: the CLI, then the stage)
            say(f"node {spec.node_rank}: waiting for node 0 ({spec.master_addr}:{port}) to prepare {run_dir}")
            said = True
        if time.monotonic() > deadline:
            raise DxError(f"node {spec.node_rank}: no node 0 within {wait_s:g} s: nothing answers at "
                          f"{spec.master_addr}:{port}, where node 0's launcher listens once node 0 has prepared "
                          f"{run_dir}. Start the same command with --node-rank 0 on {spec.master_addr}; --out must "
                          f"be a folder every node shares, at the same path ({WAIT_ENV} sets this wait)")
        time.sleep(POLL_S)
    marker_deadline = time.monotonic() + min(SHARED_GRACE_S, wait_s)  # node 0 wrote it before its launcher
    while (marker := _read_marker(run_dir, port)) is None:
        if time.monotonic() > marker_deadline:
            raise DxError(f"node {spec.node_rank}: node 0's launcher answers at {spec.master_addr}:{port} but "
                          f"{run_dir / READY_MARKER} never appeared: --out {run_dir} is not shared with node 0; "
                          "every node needs the same folder at the same path (a shared filesystem)")
        time.sleep(POLL_S)
    return marker


def node0_wait_s() -> float:
    value = os.environ.get(WAIT_ENV, "")
    try:
        return float(value) if value else DEFAULT_WAIT_S
    except ValueError:
        raise UsageError(f"{WAIT_ENV}={value!r}: not a number of seconds") from None


def _port_answers(addr: str | None, port: int) -> bool:
    """Whether something accepts connections at addr:port (node 0's launcher, once it is up).
    The connection is closed at once without a byte sent, which its store takes as a peer gone."""
    try:
        with socket.create_connection((addr or "127.0.0.1", port), timeout=2.0):
            return True
    except OSError:
        return False


def _read_marker(run_dir: Path, port: int) -> dict | None:
    """Node 0's marker when present, whole, and written for a launcher on `port`; else None."""
    try:
        marker = json.loads((run_dir / READY_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if marker.get("master_port") != port or not (run_dir / str(marker.get("job_file"))).is_file():
        return None
    return marker
