"""The memory planner: DeepSpeed's own model-state estimates, ZeRO/offload arithmetic, the GPU
profiles' headroom, the pre-training check, and an offline 7B plan in seconds."""

from __future__ import annotations

import json
import re
import resource
import socket
import time

import pytest
from typer.testing import CliRunner

from dxcli import config
from dxcli.cli.main import app
from dxcli.base.errors import DxError, UsageError
from dxcli.jobs import memory, memory_shapes
from dxcli.jobs.memory import GIB, STAGES, check_plan_fits, plan_memory
from dxcli.jobs.memory_checkpoint import CHECKPOINT_SHARE_TARGET, checkpoint_parts

runner = CliRunner()

# ~106M parameters: a Llama with a real vocabulary (its embedding is the largest layer) + convnext_atto
SMALL_LLM = {"model_type": "llama", "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 8,
             "num_attention_heads": 12, "num_key_value_heads": 12, "vocab_size": 31999,
             "tie_word_embeddings": False}


@pytest.fixture
def small(tmp_path):
    """A resolved config for the small model, every part trainable (instruct + unfreeze_vision), as
    DeepSpeed's estimators assume."""
    shapes = tmp_path / "small.json"
    shapes.write_text(json.dumps({"llm": SMALL_LLM, "vision": {"timm": "convnext_atto", "image_size": 64}}))

    def make(*sets: str) -> config.DxConfig:
        return config.resolve("h100x2", [f"model.shapes={shapes}", "model.vision=convnext_atto",
                                         "model.image_size=64", "instruct.unfreeze_vision=true",
                                         "hardware.offload_optimizer=false", *sets]).config
    return make


def _ds_gpu_bytes(zero: int, n: int, largest: int, gpus: int, offload_optimizer: bool, offload_params: bool) -> int:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if zero == 2:
        return estimate_zero2_model_states_mem_needs(n, num_gpus_per_node=gpus, cpu_offload=offload_optimizer)[1]
    return estimate_zero3_model_states_mem_needs(n, largest, num_gpus_per_node=gpus, cpu_offload=offload_optimizer,
                                                 cpu_offload_params=offload_params)[1]


@pytest.mark.parametrize("zero,gpus,offload_optimizer,offload_params", [
    (2, 1, False, False), (2, 2, False, False), (2, 2, True, False),
    (3, 1, False, False), (3, 2, False, False), (3, 2, True, False), (3, 2, True, True),
])
def test_model_states_agree_with_deepspeed_estimators(small, zero, gpus, offload_optimizer, offload_params):
    cfg = small(f"hardware.zero_stage={zero}", f"hardware.nproc_per_node={gpus}",
                f"hardware.offload_optimizer={str(offload_optimizer).lower()}",
                f"hardware.offload_params={str(offload_params).lower()}")
    plan = plan_memory(cfg, "instruct")
    shapes = plan.shapes
    n = shapes.total
    assert 90e6 < n < 130e6
    assert shapes.largest_layer == (SMALL_LLM["vocab_size"] + 1) * SMALL_LLM["hidden_size"]  # embeddings + <image>
    ours = plan.model_states_gib * GIB
    if zero == 3 and not offload_optimizer:
        # stage3.py keeps a 16-bit gradient partition (grad_partitions_flat_buffer) that the
        # stage-3 estimator's 18 bytes per parameter leave out; everything else is the same
        ours -= 2 * n / gpus
    expected = _ds_gpu_bytes(zero, n, shapes.largest_layer, gpus, offload_optimizer, offload_params)
    if zero == 3:
        # the estimator adds 4 B x the largest layer for gathered parameters; dx plans them apart, as
        # what stage3_max_live_parameters lets live (test_zero3_gathered_row_is_deepspeeds_live_limit)
        expected -= 4 * shapes.largest_layer
    assert ours == pytest.approx(expected, rel=0.02)


def test_the_printing_estimator_shows_the_same_figure(small, capsys):
    """The *_all_cold helpers only print; their no-offload line carries the figure compared above."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    plan = plan_memory(small("hardware.zero_stage=2", "hardware.nproc_per_node=1"), "instruct")
    capsys.readouterr()
    estimate_zero2_model_states_mem_needs_all_cold(total_params=plan.shapes.total, num_gpus_per_node=1)
    line = next(l for l in capsys.readouterr().out.splitlines() if "offload_optimizer=none" in l)
    printed = float(re.findall(r"([\d.]+)GB", line)[1])  # "per CPU | per GPU | options"
    assert plan.model_states_gib == pytest.approx(printed, abs=0.006)


def test_offload_optimizer_makes_the_plan_smaller():
    for profile in ("h100x2", "h200x8"):
        for stage in ("instruct", "prpo"):
            full = "model.lora.r=0"  # offload matters for full fine-tuning (LoRA's optimizer is small)
            on = plan_memory(config.resolve(profile, ["hardware.offload_optimizer=true", full]).config, stage)
            off = plan_memory(config.resolve(profile, ["hardware.offload_optimizer=false", full]).config, stage)
            assert off.total - on.total > 10, (profile, stage)  # 18 B of 20 per trainable parameter
            assert on.cpu_gib > 10 and off.cpu_gib == 0


def test_zero3_halves_parameters_per_gpu_on_two_gpus():
    def params(nproc: int) -> float:
        plan = plan_memory(config.resolve("h100x2", [f"hardware.nproc_per_node={nproc}"]).config, "instruct")
        return sum(r.gib for r in plan.rows if r.item.startswith("parameters:"))

    assert params(1) == pytest.approx(2 * params(2))
    zero2 = config.resolve("h100x2", ["hardware.zero_stage=2", "hardware.offload_optimizer=false"])
    rows = plan_memory(zero2.config, "instruct").rows
    assert sum(r.gib for r in rows if r.item.startswith("parameters:")) == pytest.approx(params(1))


def test_7b_shapes_match_the_published_counts():
    shapes = memory_shapes.model_shapes(config.resolve("h100x2").config.model)
    assert shapes.llm == 6_738_415_616 + 2 * 4096  # Vicuna-7B + the <image> row in embeddings and lm_head
    assert shapes.vision == 198_591_168 and shapes.image_tokens == 100
    assert 16 * shapes.lora_per_rank == 39_976_960  # PEFT's count for LoRA r=16 on every Llama-7B linear


def test_every_gpu_profile_stage_fits_with_ten_percent_headroom():
    for profile, capacity in (("h100x2", 79.1), ("h200x8", 139.7)):
        cfg = config.resolve(profile).config
        assert cfg.hardware.gpu_memory_gb == capacity and cfg.prpo.epochs is not None
        for stage in STAGES:
            plan = plan_memory(cfg, stage)
            assert plan.fits and plan.headroom >= 0.10, (profile, stage, plan.total)


def test_lora_drops_the_reference_copy_and_the_llm_optimizer():
    cfg = config.resolve("h100x2", ["hardware.offload_optimizer=false"]).config
    full, lora = plan_memory(cfg, "prpo", lora_r=0), plan_memory(cfg, "prpo", lora_r=16)
    assert plan_memory(cfg, "prpo").total == lora.total  # the profile's own model.lora (r=16, prpo only)
    assert plan_memory(cfg, "instruct").total == plan_memory(cfg, "instruct", lora_r=0).total
    assert not full.fits and lora.fits and lora.headroom >= 0.10
    row = {r.item: r for r in lora.rows}
    assert row["reference model"].gib == 0 and "adapters off" in row["reference model"].note
    assert row["optimizer states"].gib < 0.3 and row["parameters: LoRA r=16"].gib > 0


def test_cli_shows_the_h100x2_prpo_plan_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the memory plan must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    result = runner.invoke(app, ["profiles", "show", "h100x2", "--memory", "--stage", "prpo"], terminal_width=200)
    assert result.exit_code == 0, result.output
    total, capacity, headroom = re.search(r"total ([\d.]+) GiB of ([\d.]+) GiB, headroom (\d+)%", result.output).groups()
    assert float(total) < 79.1 and capacity == "79.1" and int(headroom) >= 10
    for item in ("reference model", "KV cache", "ZeRO-3 gather for generation", "activations", "logits",
                 "optimizer states", "CUDA/NCCL overhead", "ZeRO-3 gathered parameters", "checkpoint 0.5 GB"):
        assert item in result.output
    bad = runner.invoke(app, ["profiles", "show", "h100x2", "--memory", "--stage", "rl"])
    assert bad.exit_code == 2 and "align, instruct, prpo" in bad.output


def test_check_plan_fits_raises_with_a_set_that_fits():
    resolved = config.resolve("h100x2", ["hardware.offload_optimizer=false", "model.lora.r=0"]).config
    with pytest.raises(DxError, match="--set") as info:
        check_plan_fits(resolved, "prpo")
    message = str(info.value)
    assert "hardware.skip_memory_check=true" in message and "optimizer states" in message and "\n" not in message
    fix = re.search(r"try ((?:--set [^ ,]+ ?)+)", message).group(1).split()[1::2]
    assert fix == ["hardware.offload_optimizer=true"]
    full = ["hardware.offload_optimizer=false", "model.lora.r=0"]
    check_plan_fits(config.resolve("h100x2", [*full, *fix]).config, "prpo")
    check_plan_fits(config.resolve("h100x2", [*full, "hardware.skip_memory_check=true"]).config, "prpo")
    check_plan_fits(config.resolve("h100x2", [*full, "hardware.gpu_memory_gb=0"]).config, "prpo")
    check_plan_fits(config.resolve("h100x2").config, "prpo")  # the profile as shipped: LoRA PRPO fits


def test_check_plan_fits_suggests_checkpointing_and_smaller_groups():
    no_ckpt = config.resolve("h100x2", ["train.grad_checkpointing=false"]).config
    with pytest.raises(DxError, match="--set train.grad_checkpointing=true"):
        check_plan_fits(no_ckpt, "instruct")
    squeezed = config.resolve("h200x8", ["hardware.gpu_memory_gb=40", "hardware.offload_optimizer=true"]).config
    with pytest.raises(DxError, match=r"--set prpo\.(images_per_step|group_size)="):
        check_plan_fits(squeezed, "prpo")


def test_a_7b_plan_takes_seconds_and_allocates_nothing():
    import timm  # noqa: F401 - imports are not the planner's time
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    memory_shapes._count_shapes.cache_clear()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    started = time.perf_counter()
    plan = plan_memory(config.resolve("h200x8").config, "prpo")
    assert time.perf_counter() - started < 10  # ~1-2 s on a laptop core: meta tensors only
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 1024**2  # < 1 GiB; fp32 7B is 27
    assert plan.shapes.total > 6.9e9


def test_shapes_must_describe_the_configured_tower():
    with pytest.raises(UsageError, match="point model.shapes at a matching file"):
        memory_shapes.model_shapes(config.resolve("h100x2", ["model.image_size=384"]).config.model)
    with pytest.raises(UsageError, match="dx-llava-7b"):
        memory_shapes.model_shapes(config.resolve("h100x2", ["model.shapes=nope"]).config.model)


def test_train_refuses_a_plan_that_does_not_fit_before_loading_anything(tmp_path, monkeypatch):
    from dxcli.jobs import prepare, stages

    def loads(*args, **kwargs):
        raise AssertionError("a model was loaded or a worker launched before the memory check")

    monkeypatch.setattr(stages, "launch", loads)
    monkeypatch.setattr(prepare, "build_model", loads)
    out = tmp_path / "run"
    # --data and --model do not exist: the check must come first, before any input is read
    result = runner.invoke(app, ["train", "prpo", "--profile", "h100x2", "--set", "hardware.offload_optimizer=false",
                                 "--set", "model.lora.r=0", "--model", str(tmp_path / "instruct"),
                                 "--data", str(tmp_path / "data"), "--out", str(out)], terminal_width=400)
    assert result.exit_code == 1, result.output
    message = result.output.strip().splitlines()[-1]
    assert "prpo needs" in message and "--set " in message and "skip_memory_check" in message
    assert not out.exists()  # nothing to --force away on the next try
    result = runner.invoke(app, ["train", "instruct", "--profile", "h100x2", "--set", "hardware.gpu_memory_gb=20",
                                 "--data", str(tmp_path / "data"), "--out", str(out)], terminal_width=400)
    assert result.exit_code == 1 and "instruct needs" in result.output and not out.exists()
    # overridden: the same command goes on to read its inputs (and stops there, on the missing --data)
    result = runner.invoke(app, ["train", "instruct", "--profile", "h100x2", "--set", "hardware.gpu_memory_gb=20",
                                 "--set", "hardware.skip_memory_check=true", "--data", str(tmp_path / "data"),
                                 "--out", str(out)], terminal_width=400)
    assert result.exit_code == 2 and "no such file or folder" in result.output


# ---------------------------------------------------------------- units, DeepSpeed's limits, checkpoints


def _row_bytes(plan, item: str) -> float:
    return next(r.gib for r in plan.rows if r.item == item) * GIB


def test_gpu_memory_is_gib_as_cuda_reports_the_card():
    """hardware.gpu_memory_gb is GiB as CUDA reports the card (an 80 GB H100: 79.1), below what
    nvidia-smi lists (81559 MiB = 79.6 GiB): a plan between 79.1 and 80 GiB no longer passes."""
    h100 = config.resolve("h100x2", ["train.max_length=3500"]).config
    assert h100.hardware.gpu_memory_gb == 79.1 < 81559 / 1024
    assert config.resolve("h200x8").config.hardware.gpu_memory_gb == 139.7 < 143771 / 1024
    plan = plan_memory(h100, "instruct")
    assert 79.1 < plan.total <= 80 and plan.capacity == 79.1 and not plan.fits
    with pytest.raises(DxError, match="gpu_memory_gb=79.1"):
        check_plan_fits(h100, "instruct")
    h100.hardware.gpu_memory_gb = 80  # the card's name used as its size: the same plan would pass
    check_plan_fits(h100, "instruct")


def test_zero3_gathered_row_is_deepspeeds_live_limit():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from dxcli.training.engine import ZERO3_MAX_LIVE_PARAMETERS, deepspeed_config

    assert DeepSpeedZeroConfig().max_live_parameters == ZERO3_MAX_LIVE_PARAMETERS  # DeepSpeed's default
    cfg = config.resolve("h100x2").config
    zero = deepspeed_config(cfg, lr=1e-5, world=2)["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_max_live_parameters"] == ZERO3_MAX_LIVE_PARAMETERS
    plan = plan_memory(cfg, "instruct")
    assert _row_bytes(plan, "ZeRO-3 gathered parameters") == pytest.approx(ZERO3_MAX_LIVE_PARAMETERS * 2)  # bf16
    assert _row_bytes(plan, "ZeRO-3 gathered parameters") > 3.5 * 4 * plan.shapes.largest_layer  # not 4 x largest
    assert "ZeRO-3 gathered parameters" not in {r.item for r in plan_memory(cfg, "align").rows}  # align: ZeRO-2


def test_sft_logits_row_counts_14_bytes_per_element():
    plan = plan_memory(config.resolve("h100x2").config, "instruct")
    assert memory.SFT_LOGIT_BYTES == 14
    assert _row_bytes(plan, "logits") == pytest.approx(8 * 2048 * 32001 * 14)  # micro 8 x 2048 tok x vocab


def test_align_plans_its_own_zero_stage():
    cfg = config.resolve("h100x2").config
    assert cfg.align.zero_stage == 2 and cfg.hardware.zero_stage == 3
    align = plan_memory(cfg, "align")
    assert _row_bytes(align, "parameters: LLM") == pytest.approx(2 * align.shapes.llm)  # whole, bf16
    assert align.fits and align.headroom >= 0.10
    zero3 = plan_memory(config.resolve("h100x2", ["align.zero_stage=null"]).config, "align")
    assert _row_bytes(zero3, "parameters: LLM") == pytest.approx(align.shapes.llm)  # / 2 GPUs
    # offloading parameters is ZeRO-3's: align's ZeRO-2 keeps them on the GPU
    offload = config.resolve("h100x2", ["hardware.offload_params=true"]).config
    assert _row_bytes(plan_memory(offload, "align"), "parameters: LLM") == pytest.approx(2 * align.shapes.llm)
    # too little memory for align's own stage: the fix changes that key (hardware.zero_stage would not)
    with pytest.raises(DxError, match=r"try --set align\.zero_stage=3,"):
        check_plan_fits(config.resolve("h100x2", ["hardware.gpu_memory_gb=30"]).config, "align")


@pytest.mark.parametrize("zero", [2, 3])
def test_checkpoint_size_matches_deepspeeds_files(tmp_path, zero):
    """The files dx's own checkpoint writer leaves for a small model with a frozen part, bf16 on
    the CPU, against the planner's formula: the frozen part is not written."""
    import deepspeed
    import torch
    from torch import nn

    from dxcli.runtime.dist import Dist, init_distributed
    from dxcli.training.engine import deepspeed_config
    from dxcli.training.state import save_training_state

    init_distributed()
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 512), nn.Linear(512, 128))
    model[1].requires_grad_(False)
    total = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them away
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cfg = config.resolve("cpu-tiny", [f"hardware.zero_stage={zero}", "hardware.precision=bf16"]).config
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=deepspeed_config(cfg, lr=1e-3, world=1))
    engine.backward(engine(torch.randn(2, 256, dtype=torch.bfloat16)).float().square().mean())
    engine.step()
    save_training_state(engine, tmp_path, 1, {}, keep=1, dist=Dist())
    written = sum(f.stat().st_size for f in (tmp_path / "step-0000001").iterdir() if not f.name.startswith("rng-"))
    planned = sum(n for _, n in checkpoint_parts(zero, 2, trainable))
    # + pickling and DeepSpeed's metadata; the frozen layer's 263 kB, were it written, would not fit
    assert written == pytest.approx(planned, rel=0.02, abs=20_000)


def test_the_plan_prints_checkpoint_size_and_cadence():
    """Full fine-tuning saves optimizer + weights, LoRA its adapters; every GPU profile's cadence keeps
    writing under 5% of training time at its assumed disk speed."""
    h200 = plan_memory(config.resolve("h200x8").config, "instruct").checkpoint
    shapes = memory_shapes.model_shapes(config.resolve("h200x8").config.model)
    trainable = shapes.total - shapes.vision
    assert h200.nbytes == pytest.approx(14 * trainable)  # ZeRO-2: optimizer 12 B + bf16 weights, tower frozen
    assert 94e9 < h200.nbytes < 95e9 and h200.write_s == pytest.approx(h200.nbytes / 1e9)
    lora = plan_memory(config.resolve("h100x2").config, "prpo").checkpoint
    assert lora.nbytes == pytest.approx(12 * 16 * shapes.lora_per_rank)  # adapters + their optimizer
    for profile in ("h100x2", "h200x8"):
        cfg = config.resolve(profile).config
        assert cfg.train.save_every == 0 and cfg.train.keep_checkpoints == 2
        for stage in STAGES:
            share = plan_memory(cfg, stage).checkpoint.share
            assert share is not None and share <= CHECKPOINT_SHARE_TARGET, (profile, stage, share)
    result = runner.invoke(app, ["profiles", "show", "h200x8", "--memory", "--stage", "instruct"], terminal_width=400)
    assert result.exit_code == 0, result.output
    line = " ".join(result.output.split())
    assert "checkpoint 94.7 GB" in line and "~95 s at 1 GB/s" in line and "4.3% of training time" in line
