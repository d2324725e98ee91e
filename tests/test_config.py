"""The one config system: precedence, validation, profiles, and a CLI that starts instantly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dxcli import config
from dxcli.cli.main import app
from dxcli.base.errors import UsageError

runner = CliRunner()


def test_precedence_defaults_profile_set_flag(tmp_path):
    profile = tmp_path / "mine.yaml"
    profile.write_text("train:\n  max_steps: 7\n  seed: 3\n")
    resolved = config.resolve(str(profile), ["train.seed=5", "eval.batch_size=4"], {"eval.batch_size": 9})
    c, s = resolved.config, resolved.sources
    assert (c.train.max_steps, s["train.max_steps"]) == (7, f"profile {profile}")
    assert (c.train.seed, s["train.seed"]) == (5, "--set")
    assert (c.eval.batch_size, s["eval.batch_size"]) == (9, "flag")
    assert (c.train.warmup_ratio, s["train.warmup_ratio"]) == (0.03, "default")


def test_unknown_keys_suggest_the_close_match(tmp_path):
    with pytest.raises(UsageError, match="did you mean 'train.max_steps'"):
        config.resolve(None, ["train.max_step=3"])
    typo = tmp_path / "typo.yaml"
    typo.write_text("hardwre:\n  zero_stage: 3\n")
    with pytest.raises(UsageError, match="did you mean 'hardware'"):
        config.resolve(str(typo))
    with pytest.raises(UsageError, match="did you mean 'cpu-tiny'"):
        config.resolve("cpu-tiyn")


@pytest.mark.parametrize("item,message", [
    ("train.max_steps=abc", "train.max_steps: expected an integer"),
    ("instruct.lr=fast", "instruct.lr: expected a number"),
    ("train.grad_checkpointing=maybe", "train.grad_checkpointing: expected true/false"),
    ("hardware.precision=fp8", "precision: must be one of"),
    ("prpo.algo=ppo", "algo: must be one of"),
    ("model.tiny.vision_dims=3", "model.tiny.vision_dims: expected a list"),
    ("train.seed", "--set expects key.sub=value"),
])
def test_values_are_typed(item, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        config.resolve(None, [item])


def test_numbers_lists_and_null_parse_from_set():
    c = config.resolve(None, ["instruct.lr=1e-4", "model.tiny.vision_dims=[8,16,32,64]", "model.vision_weights=null",
                              "align.epochs=2"]).config
    assert c.instruct.lr == 1e-4 and c.model.tiny.vision_dims == [8, 16, 32, 64] and c.align.epochs == 2.0


def test_every_shipped_profile_resolves_and_roundtrips(tmp_path):
    names = config.list_profiles()
    assert {"cpu-tiny", "h100x2", "h200x8"} <= set(names)
    for name in names:
        resolved = config.resolve(name)
        saved = tmp_path / f"{name}.yaml"
        config.save(resolved.config, saved)
        assert config.load(saved) == resolved.config
    assert config.resolve("h100x2").config.hardware.zero_stage == 3
    assert config.resolve("cpu-tiny").config.model.preset == "tiny"


def test_profiles_are_shipped_inside_the_package():
    packaged = Path(config.profiles_dir())
    repo = Path(__file__).resolve().parents[1] / "profiles"
    for path in repo.glob("*.yaml"):
        assert (packaged / path.name).read_text() == path.read_text()
        assert isinstance(yaml.safe_load(path.read_text()), dict)


def test_profiles_cli_list_and_show():
    listed = runner.invoke(app, ["profiles", "list"])
    assert listed.exit_code == 0 and "h200x8" in listed.output
    shown = runner.invoke(app, ["profiles", "show", "cpu-tiny", "--set", "train.max_steps=4"], terminal_width=200)
    assert shown.exit_code == 0
    assert "train.max_steps" in shown.output and "--set" in shown.output and "profile cpu-tiny" in shown.output
    bad = runner.invoke(app, ["profiles", "show", "cpu-tiny", "--set", "train.max_stepz=4"])
    assert bad.exit_code == 2 and "did you mean" in bad.output


def test_help_imports_no_heavy_library_and_lists_every_group():
    code = ("import sys; from dxcli.cli.main import app; "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy', 'sklearn', 'PIL', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    help_ = subprocess.run([sys.executable, "-m", "dxcli", "--help"], capture_output=True, text=True)
    assert help_.returncode == 0
    for group in ("dataset", "questions", "train", "eval", "detect", "profiles", "demo"):
        assert group in help_.stdout


def test_every_command_has_an_example_in_its_help():
    import typer.main

    root = typer.main.get_command(app)

    def walk(command, path):
        if hasattr(command, "commands"):
            for name, sub in command.commands.items():
                yield from walk(sub, path + [name])
        else:
            yield path, command

    commands = list(walk(root, []))
    assert len(commands) >= 14
    for path, command in commands:
        assert "Example: dx" in (command.help or ""), " ".join(path)


def test_offload_keys_need_their_zero_stage_whatever_the_order():
    with pytest.raises(UsageError, match="offload_params needs hardware.zero_stage=3"):
        config.resolve("cpu-tiny", ["hardware.offload_params=true"])
    with pytest.raises(UsageError, match="offload_optimizer needs hardware.zero_stage 2 or 3"):
        config.resolve("cpu-tiny", ["hardware.zero_stage=1", "hardware.offload_optimizer=true"])
    both = config.resolve("cpu-tiny", ["hardware.offload_params=true", "hardware.zero_stage=3"]).config
    assert both.hardware.offload_params and both.hardware.zero_stage == 3
    with pytest.raises(UsageError, match="did you mean 'hardware.offload"):
        config.resolve("cpu-tiny", ["hardware.offload=true"])


def test_deepspeed_config_offloads_what_the_keys_say():
    from dxcli.training.engine import deepspeed_config

    h100 = deepspeed_config(config.resolve("h100x2", ["hardware.offload_optimizer=true"]).config, lr=1e-5, world=2)
    assert h100["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in h100["zero_optimization"] and "torch_adam" not in h100["optimizer"]["params"]
    params = deepspeed_config(config.resolve("h100x2", ["hardware.offload_params=true",
                                                        "hardware.offload_optimizer=false"]).config, lr=1e-5, world=2)
    assert params["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert "offload_optimizer" not in params["zero_optimization"] and params["optimizer"]["params"]["torch_adam"]


@pytest.mark.parametrize("bad,message", [
    ("train.max_steps=-3", "train.max_steps must be >= 0"),
    ("prpo.group_size=1", "prpo.group_size must be >= 2"),
    ("hardware.micro_batch=0", "hardware.micro_batch must be >= 1"),
    ("instruct.lr=0", "instruct.lr must be > 0"),
    ("prpo.pcr_no_majority=1.5", "prpo.pcr_no_majority must be between 0 and 1"),
    ("prpo.pcr_no_majority=-0.1", "prpo.pcr_no_majority must be between 0 and 1"),
    ("hardware.precision=fp8", "hardware.precision: must be one of"),
])
def test_values_out_of_range_are_usage_errors_naming_the_key(bad, message):
    with pytest.raises(UsageError, match=message):
        config.resolve("cpu-tiny", [bad])


def test_train_refuses_negative_steps_before_doing_anything(tmp_path):
    result = CliRunner().invoke(app, ["train", "align", "--data", str(tmp_path), "--out", str(tmp_path / "r"),
                                      "--set", "train.max_steps=-3"])
    assert result.exit_code == 2 and "train.max_steps must be >= 0" in result.output
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- the GPU profiles as the paper ran them


def test_align_zero_stage_reaches_the_align_deepspeed_config(tmp_path, monkeypatch):
    """align.zero_stage is what align's DeepSpeed engine gets; instruct keeps hardware.zero_stage."""
    from dxcli.data.demo import make_demo
    from dxcli.jobs.stages import run_sft_stage
    from dxcli.training import engine

    class Built(Exception):
        """Stops the stage once DeepSpeed would start: nothing trains."""

    seen = []

    def initialize(model, ds_config, *args, **kwargs):
        seen.append(ds_config["zero_optimization"])
        raise Built

    monkeypatch.setattr(engine, "initialize", initialize)
    data = tmp_path / "data"
    make_demo(data, seed=0, n_train=4, n_val=2, n_test=2)
    sets = ["hardware.zero_stage=3", "align.zero_stage=2", "hardware.num_workers=0"]
    for stage in ("align", "instruct"):
        with pytest.raises(Built):
            run_sft_stage(stage, out=tmp_path / stage, data=data, resolved=config.resolve("cpu-tiny", sets),
                          say=lambda *_: None)
    assert [z["stage"] for z in seen] == [2, 3]
    assert "stage3_max_live_parameters" not in seen[0] and seen[1]["stage3_max_live_parameters"] == 10**9
    assert config.resolve("h100x2").config.align.zero_stage == 2


@pytest.mark.parametrize("bad,message", [
    ("align.zero_stage=4", "align.zero_stage must be 0, 1, 2 or 3"),
    ("align.zero_stage=-1", "align.zero_stage must be >= 0"),
    ("hardware.checkpoint_write_gbps=0", "hardware.checkpoint_write_gbps must be > 0"),
])
def test_new_keys_are_validated(bad, message):
    with pytest.raises(UsageError, match=message):
        config.resolve("h100x2", [bad])


def test_an_align_zero_stage_keeps_only_the_offloads_it_supports():
    from dxcli.training.engine import deepspeed_config

    cfg = config.resolve("h100x2", ["hardware.offload_params=true", "hardware.offload_optimizer=true"]).config
    align = deepspeed_config(cfg, lr=1e-3, world=2, zero_stage=config.zero_stage_for(cfg, "align"))["zero_optimization"]
    assert align["stage"] == 2 and "offload_param" not in align and "offload_optimizer" in align
    zero1 = deepspeed_config(cfg, lr=1e-3, world=2, zero_stage=1)
    assert "offload_optimizer" not in zero1["zero_optimization"] and zero1["optimizer"]["params"]["torch_adam"]


def test_lora_below_1e_6_warns_full_fine_tuning_does_not():
    def warnings(*sets: str) -> list[str]:
        return config.stage_warnings(config.resolve("h100x2", list(sets)).config, "prpo")

    low, = warnings("prpo.lr=3e-7")  # the paper's full-fine-tuning rate, through LoRA r=16
    assert "model.lora.r=16" in low and "prpo.lr=3e-07" in low and "--set prpo.lr=3e-06" in low and "\n" not in low
    assert warnings() == []  # the profile's own 3e-6
    assert warnings("prpo.lr=3e-7", "model.lora.r=0") == []  # full fine-tuning at the paper's rate
    assert config.stage_warnings(config.resolve("h200x8").config, "prpo") == []
    assert config.stage_warnings(config.resolve("h100x2", ["model.lora.stages=[instruct]", "instruct.lr=5e-7"]).config,
                                 "instruct")
    h100, h200 = config.resolve("h100x2").config.prpo, config.resolve("h200x8").config.prpo
    assert h100.lr == pytest.approx(10 * h200.lr)  # the stated rule: LoRA lr = 10 x full-FT lr


def test_train_shows_the_lora_warning_before_anything_loads(tmp_path):
    result = runner.invoke(app, ["train", "prpo", "--profile", "h100x2", "--set", "prpo.lr=3e-7",
                                 "--model", str(tmp_path / "sft"), "--data", str(tmp_path / "data"),
                                 "--out", str(tmp_path / "run")], terminal_width=400)
    assert result.exit_code == 2 and "no such file or folder" in result.output  # it then stops on --data
    warning, = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert "LoRA" in warning and "prpo.lr=3e-07" in warning


def test_gpu_profiles_agree_on_epochs_and_evaluation_length():
    for name in ("h100x2", "h200x8"):
        c = config.resolve(name).config
        epochs = {stage: getattr(c, stage).epochs or c.train.epochs for stage in ("align", "instruct", "prpo")}
        assert epochs == {"align": 1, "instruct": 3, "prpo": 1}, name
        assert c.eval.max_new_tokens == c.prpo.max_new_tokens == 1024, name
