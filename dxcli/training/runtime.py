"""What every worker shares: distributed set-up, seeding, the DeepSpeed config, metrics and progress."""

from __future__ import annotations

import json
import os
import random
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dxcli.config import DxConfig


STOP_AFTER_ENV = "DX_STOP_AFTER_STEP"  # crash simulation: a loop exits right after this step's checkpoint


def stop_after_step() -> int:
    return int(os.environ.get(STOP_AFTER_ENV, 0))


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def use_cpu_accelerator_if_no_gpu() -> None:
    """DeepSpeed must be told before import when there is no GPU (then it uses gloo)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def init_distributed() -> Dist:
    """Join the process group torchrun set up, or make a group of one when run in place."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    use_cpu_accelerator_if_no_gpu()
    import warnings

    # torch's deprecation notices for the collectives DeepSpeed calls, once per call per rank
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    import deepspeed
    import torch

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(verbose=False)
    dist = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.local_rank)
    return dist


def device() -> "torch.device":  # noqa: F821
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def set_threads(threads: int) -> None:
    """Tiny models on CPU spend more time synchronising threads than computing: let profiles pick."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def torch_dtype(precision: str) -> "torch.dtype":  # noqa: F821
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def deepspeed_config(cfg: DxConfig, *, lr: float, weight_decay: float | None = None) -> dict[str, Any]:
    """The DeepSpeed config for one training stage, from the profile's hardware and train keys."""
    hw, train = cfg.hardware, cfg.train
    world = int(os.environ.get("WORLD_SIZE", 1))
    zero: dict[str, Any] = {"stage": hw.zero_stage}
    if hw.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    # config validation guarantees ZeRO 2/3 for the optimizer and ZeRO-3 for parameter offload
    if hw.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if hw.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    optimizer_params: dict[str, Any] = {"lr": lr, "weight_decay": train.weight_decay if weight_decay is None else weight_decay,
                                        "betas": [0.9, 0.999], "eps": 1e-8}
    if not hw.offload_optimizer:
        optimizer_params["torch_adam"] = True  # no fused-op build; offload needs DeepSpeed's CPU Adam
    return {
        "train_micro_batch_size_per_gpu": hw.micro_batch,
        "gradient_accumulation_steps": hw.grad_accum,
        "train_batch_size": hw.micro_batch * hw.grad_accum * world,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": hw.precision == "bf16"},
        "fp16": {"enabled": hw.precision == "fp16", "auto_cast": False},
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class MetricsLog:
    """Appends one JSON line per logged step to RUN/metrics.jsonl (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(clean) + "\n")


class ProgressView:
    """Rank 0 draws a rich progress bar on a TTY, plain log lines otherwise; other ranks stay quiet."""

    def __init__(self, total: int, description: str, enabled: bool, start: int = 0):
        self.enabled = enabled
        self.total = total
        self.description = description
        self.tty = sys.stderr.isatty()
        self.started = time.time()
        self.start_step = start
        self._progress = None
        self._last_line, self._last_step = time.time(), start
        if enabled and self.tty:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                      transient=False)
            self._task = self._progress.add_task(description, total=total, completed=start, info="")
            self._progress.start()

    def update(self, step: int, info: dict[str, Any]) -> None:
        if not self.enabled:
            return
        text = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items())
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=text)
        elif self._due(step):  # no TTY: a plain line per ~10% or 30 s, and the last step
            elapsed = time.time() - self.started
            done = max(step - self.start_step, 1)
            eta = elapsed / done * (self.total - step)
            print(f"[{self.description}] step {step}/{self.total}  {text}  eta {eta:.0f}s", file=sys.stderr, flush=True)

    def _due(self, step: int) -> bool:
        now = time.time()
        tenth = max(1, self.total // 10)
        if step >= self.total or now - self._last_line >= 30 or step // tenth > self._last_step // tenth:
            self._last_line, self._last_step = now, step
            return True
        return False

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


def checkpoint_tags(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).glob("step-*") if p.is_dir())


def save_training_state(engine, folder: Path, step: int, state: dict[str, Any], keep: int) -> None:
    """DeepSpeed checkpoint (model, optimizer, scheduler) + loop position + this rank's RNG.

    Every rank must call it. Older checkpoints beyond `keep` are removed: they are superseded.
    """
    import shutil

    import torch

    tag = f"step-{step:07d}"
    engine.save_checkpoint(str(folder), tag=tag, client_state={**state, "step": step, "tag": tag})
    torch.save(rng_state(), Path(folder) / tag / f"rng-rank{int(os.environ.get('RANK', 0))}.pt")
    torch.distributed.barrier()
    if int(os.environ.get("RANK", 0)) == 0:
        for old in checkpoint_tags(folder)[:-keep]:
            shutil.rmtree(Path(folder) / old, ignore_errors=True)
    torch.distributed.barrier()


def load_training_state(engine, folder: Path) -> dict[str, Any] | None:
    """Restore the newest checkpoint into `engine`; returns the loop state saved with it, or None."""
    import torch

    if not checkpoint_tags(folder):
        return None
    _, client = engine.load_checkpoint(str(folder))
    rng_file = Path(folder) / client["tag"] / f"rng-rank{int(os.environ.get('RANK', 0))}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client


def save_final_model(engine, bundle, out_dir: Path, zero_stage: int) -> None:
    """The final `save_pretrained` folder; under ZeRO-3 the weights are gathered first (all ranks)."""
    import torch

    state = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else None
    if int(os.environ.get("RANK", 0)) == 0:
        from dxcli.model import save_checkpoint

        bundle.model = engine.module
        save_checkpoint(bundle, out_dir, state_dict=state)
    torch.distributed.barrier()
