"""tests/gpu/check_gpu.py --smoke: the GPU check's code paths at tiny scale on the CPU, so the script
that only runs on a GPU machine cannot rot between its runs (tests/gpu/README.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent / "gpu" / "check_gpu.py"


def test_gpu_check_smoke_runs_every_check(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--work", str(tmp_path)], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    lines = result.stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    assert [line.split(":")[0] for line in lines if line.startswith("check ")] == [
        "check model", "check forward_backward", "check generation", "check prpo_step", "check cli"]
    assert figures["forward_backward"]["attn"] == "sdpa" and figures["forward_backward"]["planner_gib"] > 0
    assert figures["generation"]["ms_per_token"] > 0 and figures["prpo_step"]["lora_r"] == 16
    assert figures["cli"]["instruct_steps"] == 2 and figures["cli"]["prpo_lora_steps"] == 1
    assert (tmp_path / "prpo" / "model" / "config.json").is_file()  # the CLI's LoRA PRPO saved its merge
