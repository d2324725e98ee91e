"""The README runs as written: every line of its shell blocks is a `dx` command that this test runs,
in README order, in one empty folder (relative paths resolve there, and each command's outputs are the
next one's inputs), or a line that EXEMPT names with its reason. Also: the command table lists every
`dx` command, the two set-up commands are the project brief's (and `.ci/run` runs the second), and
the links of the README and docs/ resolve.

The commands run in this process through Typer's CliRunner on the `dx` entry point's `app`, so torch
and transformers are imported once for all of them (the sequence takes ~35-65 s on 2 cores, most of
it `dx dataset demo` and the imports).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from dxcli.cli.main import app

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SHELL = {"bash", "sh", "shell", "console"}
INSTALL, TESTS = 'pip install -e ".[dev]" && dx demo', "python -m pytest -q"

# Lines of the README's shell blocks that are not run here, each with its reason. Every other line
# must be a plain `dx ...` command (optionally `> FILE`), and is run: a new README command is tested
# unless someone adds a pattern here.
EXEMPT = [
    (r"^pip install\b", "the install line: it installs the package this test runs in; its `dx demo` "
                        "is tests/test_quickstart.py's test"),
    (r"^python -m pytest\b", "the test command: the suite this test is part of"),
    (r"(--profile|-p)[ =]?(h100x2|h200x8)\b", "a GPU profile: needs 2 or 8 GPUs and the 7B weights "
                                               "(`dx profiles show h100x2 --memory` is not exempt: it runs on a CPU)"),
    (r"^(wandb sync|tensorboard)\b", "a tracker's sync or viewer: not dx, and W&B's sync needs the network"),
]


def shell_lines(text: str) -> list[tuple[str, str]]:
    """(language, logical line) for every line of every fenced block; backslash continuations joined,
    blank and comment-only lines dropped."""
    found = []
    for lang, body in re.findall(r"^```(\S*)\n(.*?)^```", text, flags=re.S | re.M):
        for line in body.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                found.append((lang, line.strip()))
    return found


def exemption(line: str) -> str | None:
    return next((reason for pattern, reason in EXEMPT if re.search(pattern, line)), None)


def readme_commands() -> list[str]:
    return [line for lang, line in shell_lines(README.read_text()) if lang in SHELL and not exemption(line)]


def test_shell_lines_are_dx_commands_and_dx_lives_only_in_shell_blocks():
    for lang, line in shell_lines(README.read_text()):
        if lang in SHELL and not exemption(line):
            words = shlex.split(line, comments=True)
            assert words[0] == "dx", f"README shell line is neither a dx command nor exempt: {line}"
            assert not {"&&", "||", "|", ";", "<", ">>"} & set(words), f"only `> FILE` is supported: {line}"
        elif lang not in SHELL:
            assert not line.startswith("dx "), f"a dx command outside a shell block is not run: {line}"


def test_the_two_set_up_commands_and_ci():
    lines = [line for lang, line in shell_lines(README.read_text()) if lang in SHELL]
    assert lines[:2] == [INSTALL, TESTS]
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert [line for line in ci if line and not line.startswith("#")][-1] == TESTS


def run(line: str, folder: Path) -> str | None:
    """Run one README line in FOLDER; None when it exited 0 without an error line and wrote what it
    names (`--out`, `--work`, `> FILE`), else what went wrong."""
    words = shlex.split(line, comments=True)
    target = None
    if ">" in words:
        words, target = words[:words.index(">")], words[words.index(">") + 1]
    result = CliRunner().invoke(app, words[1:])
    if result.exit_code != 0 or "error:" in result.stderr:
        return f"{line}\nexit {result.exit_code}\n{result.output[-3000:]}"
    if not result.stdout.strip():
        return f"{line}: printed nothing"
    if target:
        (folder / target).write_text(result.stdout)
    for flag in ("--out", "--work"):
        if flag in words:
            written = folder / words[words.index(flag) + 1]
            if not (written.is_file() or written.is_dir() and any(written.iterdir())):
                return f"{line}: wrote no {written}"
    return None


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> list[str | None]:
    """Every README command, in order, in one empty folder, up to the first that fails (selecting
    one command with -k still runs the ones before it)."""
    folder = tmp_path_factory.mktemp("readme-session")
    outcomes: list[str | None] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        for line in readme_commands():
            outcomes.append(run(line, folder))
            if outcomes[-1] is not None:
                break
    return outcomes


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(readme_commands())),
                         ids=[line.split("  #")[0].strip() for line in readme_commands()])
def test_readme_command_runs(index, session):
    if index >= len(session):
        pytest.skip("an earlier README command failed")
    assert session[index] is None, session[index]


def leaf_commands(group, prefix="dx") -> set[str]:
    names = set()
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            names |= leaf_commands(command, f"{prefix} {name}")
        else:
            names.add(f"{prefix} {name}")
    return names


def test_the_command_table_lists_every_command():
    text = README.read_text()
    table = text.split("## Commands", 1)[1].split("\n## ", 1)[0]
    rows = set(re.findall(r"^\| `(dx [^`]+)` \|", table, flags=re.M))
    commands = leaf_commands(typer.main.get_command(app))
    assert commands - rows == set(), "commands without a row in the README's command table"
    assert rows - commands == set(), "rows of the README's command table that are not dx commands"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))])
def test_links_resolve(page):
    source = REPO / page
    for target in re.findall(r"\]\(([^)\s]+)\)", source.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (source.parent / path).resolve() if path else source
        assert linked.exists(), f"{page}: broken link {target}"
        if anchor and linked.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.M)
            assert anchor in {slug(h) for h in headings}, f"{page}: no heading for #{anchor} in {path or page}"
