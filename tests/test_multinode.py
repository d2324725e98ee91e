"""Several nodes: two `dx` processes as node 0 and node 1 on this machine, sharing one --out;
flags that would hang a multi-node run; Ctrl-C forwarded to every worker under DeepSpeed's
hostfile launcher (a fake launcher tree: a real one needs ssh and pdsh)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dxcli.runtime.dist import child_environment, free_port

PRPO_FAST = ["hardware.num_workers=0", "prpo.max_new_tokens=24", "prpo.group_size=3", "prpo.images_per_step=2",
             "train.log_every=1", "hardware.micro_batch=4", "train.max_steps=2"]
SFT_FAST = ["train.max_steps=2", "train.log_every=1", "hardware.num_workers=0", "hardware.micro_batch=1"]
MARKER = ".dx-node0-ready.json"


def dx(*args: str) -> list[str]:
    return [sys.executable, "-m", "dxcli", *args]


def sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def node_env(**extra: str) -> dict[str, str]:
    # this test process may hold a process group of its own; each node starts its own launcher
    return {**child_environment(dict(os.environ)), "OMP_NUM_THREADS": "1", **extra}


def start_node(command: list[str], rank: int, port: int, logs: Path) -> subprocess.Popen:
    """One node's dx; its output goes to files (a pipe nobody reads while both run could fill up)."""
    flags = ["--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
             "--nproc-per-node", "1"]
    logs.mkdir(exist_ok=True)
    with open(logs / f"node{rank}.out", "w") as out, open(logs / f"node{rank}.err", "w") as err:
        proc = subprocess.Popen(command + flags, stdout=out, stderr=err, text=True, env=node_env())
    proc.logs = (logs / f"node{rank}.out", logs / f"node{rank}.err")  # type: ignore[attr-defined]
    return proc


def kill_tree(proc: subprocess.Popen) -> None:
    """dx and everything below it (its launcher runs in a session of its own)."""
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
    proc.kill()


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[str, str]:
    """(stdout, stderr) of a node once it has ended (killed, with everything below it, at `timeout`)."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        proc.wait()
    return proc.logs[0].read_text(), proc.logs[1].read_text()  # type: ignore[attr-defined]


def finish_both(node0: subprocess.Popen, node1: subprocess.Popen, timeout: float = 600) -> list[tuple[str, str]]:
    """Both nodes' output. When one fails, the other would wait for it until torchrun's rendezvous
    timeout: it is killed at once instead."""
    deadline = time.time() + timeout
    while node0.poll() is None or node1.poll() is None:
        failed = any(node.poll() not in (None, 0) for node in (node0, node1))
        if failed or time.time() > deadline:
            for node in (node0, node1):
                if node.poll() is None:
                    kill_tree(node)
            break
        time.sleep(0.2)
    return [finish(node0, 30), finish(node1, 30)]


def steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def wait_for_marker(out: Path, node0: subprocess.Popen, timeout: float = 300) -> None:
    """Until node 0 has prepared --out for this launch (its marker holds a launch id)."""
    deadline = time.time() + timeout
    while "launch_id" not in ((out / MARKER).read_text() if (out / MARKER).is_file() else ""):
        assert node0.poll() is None, f"node 0 exited ({node0.returncode}) early: {finish(node0)[1][-2000:]}"
        assert time.time() < deadline, "node 0 never wrote its marker"
        time.sleep(0.05)


def plant_stale_launch(out: Path, port: int) -> None:
    """What a previous launch could leave in --out: a marker naming this port, its job file and config.
    A node 1 that started on it would run a job whose records do not exist, and fail."""
    from dxcli import config

    out.mkdir(parents=True)
    config.save(config.resolve("cpu-tiny", ["hardware.nnodes=2"]).config, out / "config.yaml")
    job = {"stage": "instruct", "run_dir": str(out), "config": str(out / "config.yaml"),
           "records": str(out / "gone.jsonl"), "images": str(out), "model": None, "resume": False}
    (out / "job-instruct.json").write_text(json.dumps({"task": "instruct", "job": job}))
    (out / MARKER).write_text(json.dumps({"task": "instruct", "job_file": "job-instruct.json", "master_port": port}))


def test_two_nodes_instruct_share_one_run_folder(tmp_path, demo_root, trained):
    """Node 1 starts first, on a folder holding a previous launch's marker: it waits for node 0's
    launcher, never writes or deletes anything, and does not claim the model."""
    out, port = tmp_path / "run", free_port()
    plant_stale_launch(out, port)
    command = dx("train", "instruct", "--data", str(demo_root), "--model", str(trained["align"]), "--out", str(out),
                 *sets(SFT_FAST))
    node1 = start_node(command, 1, port, tmp_path / "logs")
    time.sleep(3)  # node 1 sees the stale marker and has to wait anyway
    assert node1.poll() is None, finish(node1)[1][-2000:]
    node0 = start_node(command, 0, port, tmp_path / "logs")
    wait_for_marker(out, node0)
    written = {name: (out / name).stat() for name in ("config.yaml", "train-records.jsonl", "job-instruct.json")}
    (out / "planted.txt").write_text("node 1 must not delete this")
    (out0, err0), (out1, err1) = finish_both(node0, node1)
    assert (node0.returncode, node1.returncode) == (0, 0), f"node 0: {err0[-2000:]}\nnode 1: {err1[-2000:]}"
    assert steps(out) == [1, 2]
    assert sorted(p.name for p in out.iterdir() if (p / "config.json").is_file()) == ["model"]
    assert (out / "planted.txt").is_file()
    for name, before in written.items():  # node 0's files, neither rewritten nor replaced
        after = (out / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), name
    assert not (out / MARKER).exists()  # node 0 cleans up after its launch
    assert "model in" in out0 and "model in" not in out1 + err1
    assert "node 1 done" in out1 and "waiting for node 0" in err1


def test_two_nodes_prpo(tmp_path, demo_root, trained):
    """Both nodes start together; node 0 alone prepares the records and says what it saved."""
    out, port = tmp_path / "rl", free_port()
    command = dx("train", "prpo", "--model", str(trained["instruct"]), "--data", str(demo_root), "--out", str(out),
                 "--algo", "grpo", *sets(PRPO_FAST))
    node0 = start_node(command, 0, port, tmp_path / "logs")
    node1 = start_node(command, 1, port, tmp_path / "logs")
    wait_for_marker(out, node0)
    records = (out / "prompt-records.jsonl").stat()
    (out0, err0), (out1, err1) = finish_both(node0, node1)
    assert (node0.returncode, node1.returncode) == (0, 0), f"node 0: {err0[-2000:]}\nnode 1: {err1[-2000:]}"
    assert steps(out) == [1, 2]
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert (out / "model" / "config.json").is_file()
    after = (out / "prompt-records.jsonl").stat()
    assert (after.st_ino, after.st_mtime_ns) == (records.st_ino, records.st_mtime_ns)
    assert "grpo done" in out0 and "model in" in out0
    assert "node 1 done" in out1 and "model in" not in out1 + err1
    assert "records ->" in err0 and "records ->" not in err1  # preparation is node 0's alone
    assert "warning" not in err1  # the run's warnings read RUN files: node 0's business


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The one `error:` line (the CLI never wraps it), with no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.mark.parametrize("flags,expected", [
    (["--nnodes", "2"], "--master-addr"),
    (["--node-rank", "1"], "--nnodes"),
    (["--hostfile", "no-such-hostfile"], "no such file"),
])
def test_flags_that_would_hang_fail_at_once_in_one_line(tmp_path, flags, expected):
    started = time.time()
    result = subprocess.run(dx("train", "instruct", "--data", "x", "--out", str(tmp_path / "r"), *flags),
                            capture_output=True, text=True, env=node_env(), timeout=60)
    assert result.returncode == 2 and expected in one_line_error(result)
    assert time.time() - started < 20  # before any heavy import
    assert not (tmp_path / "r").exists()


def test_a_node_without_node_0_fails_in_one_line_naming_the_folder(tmp_path):
    """Nothing answers at node 0's port within the wait: node 1 names the folder and leaves it alone,
    a previous launch's marker included (it is not this launch's). Something answers there but the
    marker never shows: the folder is not shared."""
    import socket

    out, port = tmp_path / "run", free_port()
    plant_stale_launch(out, port)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    command = dx("train", "instruct", "--data", "x", "--out", str(out), "--nnodes", "2", "--node-rank", "1",
                 "--master-addr", "127.0.0.1", "--master-port", str(port))
    started = time.time()
    alone = subprocess.run(command, capture_output=True, text=True, env=node_env(DX_NODE0_WAIT_S="2"), timeout=60)
    assert alone.returncode == 1 and f"prepared {out}." in one_line_error(alone)
    assert time.time() - started < 20
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before
    (out / MARKER).unlink()
    with socket.socket() as listener:  # a node 0 launcher whose run folder this node cannot see
        listener.bind(("127.0.0.1", port))
        listener.listen()
        unshared = subprocess.run(command, capture_output=True, text=True, env=node_env(DX_NODE0_WAIT_S="2"),
                                  timeout=60)
    assert unshared.returncode == 1 and "not shared" in one_line_error(unshared)


def test_launcher_commands_leave_node_0_address_to_the_user_or_deepspeed(tmp_path):
    from dxcli.jobs.launch import LaunchSpec, worker_command

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=2\nnode-b slots=2  # second\n")
    job = tmp_path / "job-prpo.json"
    deepspeed = worker_command(LaunchSpec(nproc_per_node=2, hostfile=str(hostfile)), job)
    assert "--master_addr" not in deepspeed and "--no_local_rank" in deepspeed
    assert deepspeed[-3:] == ["--module", "dxcli.jobs.worker", str(job)]
    given = worker_command(LaunchSpec(hostfile=str(hostfile), master_addr="10.0.0.1"), job)
    assert given[given.index("--master_addr") + 1] == "10.0.0.1"
    torchrun = worker_command(LaunchSpec(nnodes=2, node_rank=1, master_addr="10.0.0.1"), job)
    assert "--master_addr=10.0.0.1" in torchrun and "--master_port=29500" in torchrun
    assert "--master_addr=127.0.0.1" in worker_command(LaunchSpec(nproc_per_node=2), job)


# ---- Ctrl-C under DeepSpeed's launcher: a fake launcher tree with DeepSpeed's signal handling ----

FAKE_WORKER = r"""
import os, signal, sys, time
run = os.path.dirname(os.path.abspath(sys.argv[-1]))
def note(signum, frame):
    open(os.path.join(run, f"worker-{os.getpid()}-{signal.Signals(signum).name}"), "w").close()
    sys.exit(0)
signal.signal(signal.SIGINT, note)
signal.signal(signal.SIGTERM, note)
open(os.path.join(run, f"ready-{os.getpid()}"), "w").close()
while True:
    time.sleep(0.05)
"""

FAKE_LAUNCHER = r"""
# Mimics DeepSpeed: the runner (and each node's deepspeed.launcher.launch) turns a SIGINT or SIGTERM
# into SIGTERM for every worker, i.e. no checkpoint. mode 'local': one host, workers are children of
# a per-node launcher below this runner. mode 'remote': workers started elsewhere (pdsh/ssh), so
# not our descendants: detached here with a double fork into a session of their own.
import os, signal, subprocess, sys, time
mode, job, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
run = os.path.dirname(os.path.abspath(job))
worker = [sys.executable, "-c", sys.argv[4], "-m", "dxcli.jobs.worker", job]
children = []
def kill_all(signum, frame):
    open(os.path.join(run, f"launcher-{os.getpid()}-{signal.Signals(signum).name}"), "w").close()
    for child in children:
        child.terminate()
    sys.exit(1)
signal.signal(signal.SIGINT, kill_all)
signal.signal(signal.SIGTERM, kill_all)
if mode == "local":
    node = [sys.executable, __file__, "node", job, str(n), sys.argv[4]]
    children.append(subprocess.Popen(node))
    sys.exit(children[0].wait())
if mode == "node":
    children.extend(subprocess.Popen(worker) for _ in range(n))
    sys.exit(max(child.wait() for child in children))
detach = "import subprocess, sys; subprocess.Popen(sys.argv[1:], start_new_session=True)"
for _ in range(n):
    subprocess.run([sys.executable, "-c", detach, *worker])
while len([f for f in os.listdir(run) if f.startswith("ready-")]) < n:
    time.sleep(0.05)
pids = [int(f.split("-")[1]) for f in os.listdir(run) if f.startswith("ready-")]
def alive(pid):  # a zombie (exited, not yet reaped by whoever adopted it) is gone
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
while any(alive(pid) for pid in pids):  # as pdsh waits for every host's launcher
    time.sleep(0.05)
"""

FAKE_PDSH = r"""#!/usr/bin/env python3
# pdsh -S -w HOSTS COMMAND: run COMMAND here once per host (the fake hosts' workers live here)
import subprocess, sys
args = sys.argv[1:]
hosts = args[args.index("-w") + 1].split(",")
with open(__file__ + ".log", "a") as log:
    log.write(" ".join(args) + "\n")
sys.exit(max(subprocess.run(["sh", "-c", args[-1]]).returncode for _ in hosts))
"""


@pytest.mark.parametrize("hosts", [[], ["node-a", "node-b"]], ids=["one-host", "two-hosts-over-pdsh"])
def test_ctrl_c_reaches_every_worker_under_the_deepspeed_launcher(tmp_path, monkeypatch, hosts):
    from dxcli.jobs.launch import stop

    run = tmp_path / "run"
    run.mkdir()
    job = run / "job-prpo.json"
    job.write_text("{}")
    launcher, pdsh = tmp_path / "launcher.py", tmp_path / "bin" / "pdsh"
    launcher.write_text(FAKE_LAUNCHER)
    pdsh.parent.mkdir()
    pdsh.write_text(FAKE_PDSH)
    pdsh.chmod(0o755)
    monkeypatch.setenv("PATH", f"{pdsh.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, str(launcher), "remote" if hosts else "local", str(job), "2", FAKE_WORKER],
                            start_new_session=True)
    try:
        deadline = time.time() + 60
        while len(list(run.glob("ready-*"))) < 2:
            assert time.time() < deadline and proc.poll() is None, "the fake workers did not start"
            time.sleep(0.05)
        assert stop(proc, job, hosts, grace_s=60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for ready in run.glob("ready-*"):  # detached workers that stop() missed (pid not reused: same job)
            pid = int(ready.name.split("-")[1])
            with contextlib.suppress(OSError):
                if str(job) in Path(f"/proc/{pid}/cmdline").read_text():
                    os.kill(pid, signal.SIGKILL)
    workers = sorted(int(p.name.split("-")[1]) for p in run.glob("ready-*"))
    assert sorted(int(p.name.split("-")[1]) for p in run.glob("worker-*-SIGINT")) == workers
    assert not list(run.glob("worker-*-SIGTERM")) and not list(run.glob("launcher-*"))  # nothing killed
    if hosts:
        assert "-w node-a,node-b" in Path(f"{pdsh}.log").read_text()


def test_ctrl_c_before_any_worker_started_ends_at_once(tmp_path):
    """A launcher still waiting for the other nodes defers SIGINT (torchrun, in its rendezvous):
    with no worker to save anything, dx stops it at once rather than after the grace period."""
    from dxcli.base.errors import Interrupted
    from dxcli.jobs.launch import stop

    waiting = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(120)"
    proc = subprocess.Popen([sys.executable, "-c", waiting], start_new_session=True)
    started = time.time()
    with pytest.raises(Interrupted, match="before any worker started"):
        stop(proc, tmp_path / "job-prpo.json", grace_s=120)
    assert proc.poll() is not None and time.time() - started < 20
