"""Per-process settings of torch and the libraries dx drives: threads, dtypes, seeds, RNG state,
quiet logging, and the crash-simulation switch the resume tests use."""

from __future__ import annotations

import os
import random
from typing import Any

from dxcli.runtime.dist import prepare_deepspeed_environment

STOP_AFTER_ENV = "DX_STOP_AFTER_STEP"  # crash simulation: a loop exits right after this step's checkpoint


def stop_after_step() -> int:
    return int(os.environ.get(STOP_AFTER_ENV, 0))


def set_threads(threads: int) -> None:
    """Tiny models on CPU spend more time synchronising threads than computing: let profiles pick."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def torch_dtype(precision: str) -> "torch.dtype":  # noqa: F821
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def quiet_libraries() -> None:
    """Silence what tells a dx user nothing: transformers' per-file progress bars (dx draws its
    own), torch's "no CUDA runtime, using CUDA_HOME" notice when DeepSpeed loads its op builders
    on a CPU machine, and DeepSpeed's accelerator auto-detection line."""
    import logging

    prepare_deepspeed_environment()  # transformers may import DeepSpeed: let it find its accelerator quietly
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


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
