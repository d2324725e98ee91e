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


@dataclass(frozen=True)
class Ratio:
    """A metric only some ranks may have (an accuracy over the labelled images, when only some
    are labelled): this rank's numerator and denominator, 0 / 0 without data. Reduced as a pair,
    so the global value is the pooled sum / count over the ranks that had data."""

    total: float
    count: float

    def __float__(self) -> float:
        if self.count <= 0:
            raise ValueError("a Ratio with no data has no value")
        return self.total / self.count


@dataclass(frozen=True)
class MetricKeys:
    """The metrics a loop reduces over ranks, fixed by its config and so the same on every rank.

    Every rank must send the same keys in the same order: a collective over tensors of different
    lengths is silently wrong with gloo (values of different metrics are summed together) and
    hangs with NCCL. So the keys are listed here, never read off one rank's row.
    """

    means: tuple[str, ...]  # every rank has a value: the mean over ranks
    ratios: tuple[str, ...] = ()  # `Ratio` values: sum of totals / sum of counts, absent when no rank had data
    same: tuple[str, ...] = ("step",)  # equal on every rank by construction: passed through, not reduced


def metric_vector(row: dict[str, Any], keys: MetricKeys) -> list[float]:
    """This rank's share of the all-reduce: `keys.means` in order, then (total, count) per ratio.
    A row with a key the spec does not name, or missing one it names, is a bug: it fails here,
    before the collective, rather than logging one rank's value as everyone's."""
    listed = set(keys.means) | set(keys.ratios) | set(keys.same)
    unknown, missing = sorted(set(row) - listed), sorted(listed - set(row))
    if unknown or missing:
        raise ValueError(f"metrics row does not match its declared keys: unknown {unknown}, missing {missing}")
    vector = [float(row[key]) for key in keys.means]
    for key in keys.ratios:
        value = row[key]
        if not isinstance(value, Ratio):
            raise TypeError(f"metric {key!r} is reduced as a ratio: give a Ratio, got {value!r}")
        vector += [float(value.total), float(value.count)]
    return vector


def metrics_from_sums(row: dict[str, Any], keys: MetricKeys, sums: list[float], world: int) -> dict[str, Any]:
    """The logged row from the summed vector (every rank gets the same one), in `row`'s key order.
    A ratio no rank had data for is left out (on every rank: decided from the sums)."""
    means = dict(zip(keys.means, sums))
    pairs = sums[len(keys.means):]
    ratios = {key: (pairs[2 * i], pairs[2 * i + 1]) for i, key in enumerate(keys.ratios)}
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key in means:
            out[key] = means[key] / world
        elif key in ratios:
            total, count = ratios[key]
            if count > 0:
                out[key] = total / count
        else:
            out[key] = value
    return out


def reduce_metrics(row: dict[str, Any], keys: MetricKeys, dist: Dist) -> dict[str, Any]:
    """This rank's metrics row -> the row over all ranks (means, pooled ratios); identical on every rank."""
    return metrics_from_sums(row, keys, all_reduce_sum(metric_vector(row, keys), dist), dist.world)


def barrier(dist: Dist) -> None:
    if dist.world > 1:
        import torch

        torch.distributed.barrier()
