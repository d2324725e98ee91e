"""Process identity and the process group. Everything else receives a `Dist` instead of reading
the launcher's environment variables."""

from __future__ import annotations

import hashlib
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> "torch.device":  # noqa: F821
        """This rank's GPU when there is one, else the CPU."""
        import torch

        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def from_env() -> Dist:
    """The identity torchrun (or the DeepSpeed launcher) gave this process; rank 0 of 1 otherwise."""
    return Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))


PROCESS_GROUP_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def child_environment(environ: dict[str, str]) -> dict[str, str]:
    """`environ` without this process's group identity: a process it starts (a launcher, or
    another dx) must set up its own group rather than join ours on a port we hold."""
    return {k: v for k, v in environ.items() if k not in PROCESS_GROUP_VARIABLES}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SHM_OP = "deepspeed_shm_comm"  # DeepSpeed's shared-memory all-reduce for several CPU processes


def prepare_deepspeed_environment() -> None:
    """Before DeepSpeed is imported: the CPU accelerator when there is no GPU (then it uses gloo),
    and a build folder for its C++ ops that belongs to this Python environment, so two
    environments on one machine do not rebuild each other's ops."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))


def extensions_dir() -> Path:
    tag = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
    return Path.home() / ".cache" / "dx" / "torch_extensions" / f"py{sys.version_info[0]}{sys.version_info[1]}-{tag}"


def cpu_comm_op_built() -> bool:
    return any(Path(os.environ.get("TORCH_EXTENSIONS_DIR", extensions_dir())).glob(f"{SHM_OP}*/*.so"))


def init_distributed() -> Dist:
    """Join the process group torchrun set up, or make a group of one when run in place."""
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    prepare_deepspeed_environment()
    import warnings

    # torch's deprecation notices for the collectives DeepSpeed calls, once per call per rank
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    import deepspeed
    import torch

    if not torch.distributed.is_initialized():
        if int(os.environ["WORLD_SIZE"]) == 1:
            # one process has no peer to share memory with: skip DeepSpeed's shared-memory comm op
            # (a C++ build of up to two minutes that would also demand a compiler for nothing)
            deepspeed.ops.__compatible_ops__[SHM_OP] = False
        deepspeed.init_distributed(verbose=False)
    dist = from_env()
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.local_rank)
    return dist


def collective_device(backend: str, dist: Dist) -> "torch.device":  # noqa: F821
    """Where a collective's tensor must live: NCCL serves only CUDA tensors (this rank's GPU),
    gloo (DeepSpeed on CPU) CPU tensors."""
    import torch

    if "nccl" in backend.lower():
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


def all_reduce_sum(values: list[float], dist: Dist) -> list[float]:
    """Sum `values` over ranks (float64, on the backend's device); unchanged for one process.
    Every metric reduction of every loop goes through here."""
    if dist.world == 1:
        return list(values)
    import torch

    backend = str(torch.distributed.get_backend())
    tensor = torch.tensor(values, dtype=torch.float64, device=collective_device(backend, dist))
    torch.distributed.all_reduce(tensor)
    return tensor.cpu().tolist()


def mean_over_ranks(row: dict[str, Any], dist: Dist) -> dict[str, Any]:
    """Mean of every float metric over ranks (each rank saw its own data); other values as given."""
    keys = sorted(k for k, v in row.items() if isinstance(v, float))
    sums = all_reduce_sum([row[k] for k in keys], dist)
    return {**row, **{k: v / dist.world for k, v in zip(keys, sums)}}


def barrier(dist: Dist) -> None:
    if dist.world > 1:
        import torch

        torch.distributed.barrier()
