"""One exit-code rule for every command: 2 for a bad flag or a missing input named on the command
line, 1 for a failure, each as one line without a traceback; the same for output paths the user
cannot write to."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from dxcli.cli.main import app

runner = CliRunner()


def one_line_error(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert "Traceback" not in result.output
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


@pytest.mark.parametrize("args", [
    ["dataset", "check", "{missing}"],
    ["questions", "gen", "{missing}", "--out", "{tmp}/q.jsonl"],
    ["detect", "{missing}", "--model", "{tmp}"],
    ["eval", "infer", "--model", "{missing}", "--questions", "{missing}", "--images", "{tmp}", "--out", "{tmp}/a.jsonl"],
    ["eval", "score", "{missing}"],
    ["eval", "rewards", "{missing}"],
    ["train", "align", "--data", "{missing}", "--out", "{tmp}/run"],
])
def test_a_missing_input_named_on_the_command_line_exits_2(args, tmp_path: Path):
    filled = [a.format(missing=tmp_path / "no-such-thing", tmp=tmp_path) for a in args]
    result = runner.invoke(app, filled)
    assert result.exit_code == 2, result.output
    assert "no-such-thing" in one_line_error(result)


def test_an_output_path_under_a_regular_file_is_one_line(tmp_path: Path, demo_root: Path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    cases = [
        ["questions", "gen", str(demo_root), "--out", str(blocker / "q.jsonl")],
        ["dataset", "demo", str(blocker / "data")],
        ["dataset", "split", str(demo_root), "--records", "--out", str(blocker / "records")],
    ]
    for args in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        assert "blocker" in one_line_error(result)


def test_a_file_given_as_the_run_folder_is_one_line(tmp_path: Path, demo_root: Path):
    out = tmp_path / "run"
    out.write_text("not a folder")
    result = runner.invoke(app, ["train", "align", "--data", str(demo_root), "--out", str(out)])
    assert result.exit_code == 1 and "is a file" in one_line_error(result)
