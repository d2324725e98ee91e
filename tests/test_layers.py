"""The package's layering, read from the source with `ast` (docs: docs/code.md).

base -> config -> data -> model -> runtime -> rl -> training | evaluation -> jobs -> pipeline -> cli | server:
each layer imports only the layers below it; training and evaluation never import each other, nor do
cli and server, except that `dx serve` (cli/serve.py) starts the server through its options and
its entry point.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dxcli"
LAYERS = {"base": 0, "config": 1, "data": 2, "model": 3, "runtime": 4, "rl": 5, "training": 6,
          "evaluation": 6, "jobs": 7, "pipeline": 8, "cli": 9, "server": 9}
# the one crossing between the two top layers: `dx serve` builds the server's options (light, so an
# unsafe --host is refused before torch loads) and calls its entry point
CLI_STARTS_SERVER = {("dxcli.cli.serve", "dxcli.server.options"), ("dxcli.cli.serve", "dxcli.server.run")}
# what a CLI command may call into: library entry points, never model/runtime/training internals
CLI_MAY_IMPORT = ("dxcli.cli", "dxcli.base", "dxcli.config", "dxcli.data", "dxcli.evaluation",
                  "dxcli.jobs", "dxcli.pipeline", "dxcli.rl.explain")
LAUNCHER_VARIABLES = {"RANK", "WORLD_SIZE", "LOCAL_RANK"}


def modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found.append((name, path))
    return found


def layer_of(module: str) -> tuple[str, int] | None:
    """(layer package, rank) of a dxcli module; None for the package root and __main__."""
    parts = module.split(".")
    if len(parts) < 2 or parts[1] == "__main__":
        return None
    return parts[1], LAYERS[parts[1]]


def dx_imports(tree: ast.AST, module: str) -> list[tuple[str, ast.stmt]]:
    """(imported dxcli module, node) for every import statement anywhere in the file."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node) for alias in node.names if alias.name.startswith("dxcli")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dxcli"):
            # `from dxcli.pkg import sub` may name a submodule: check it as the module it is
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                sub = PACKAGE.parent / Path(*candidate.split("."))
                is_module = sub.with_suffix(".py").is_file() or (sub / "__init__.py").is_file()
                found.append((candidate if is_module else node.module, node))
    return found


def parsed() -> list[tuple[str, Path, ast.AST]]:
    return [(name, path, ast.parse(path.read_text(encoding="utf-8"))) for name, path in modules()]


def test_every_package_has_a_layer():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    packages |= {p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    assert packages == set(LAYERS)


@pytest.mark.parametrize("module,path", modules(), ids=[m for m, _ in modules()])
def test_imports_only_point_down(module: str, path: Path):
    mine = layer_of(module)
    if mine is None:
        return
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for target, node in dx_imports(tree, module):
        theirs = layer_of(target)
        if theirs is None:
            continue
        assert points_down(module, target), (
            f"{module}:{node.lineno} imports {target}: layer {theirs[0]} is not below {mine[0]}")


def points_down(module: str, target: str) -> bool:
    """`module` may import `target`: its own package, a lower layer, or `dx serve` starting the server."""
    (mine, my_rank), (theirs, their_rank) = layer_of(module), layer_of(target)
    return mine == theirs or their_rank < my_rank or (module, target) in CLI_STARTS_SERVER


def test_library_imports_its_own_modules_at_the_top():
    """Outside cli/, a dx import inside a function hides a cycle; heavy third-party ones may be lazy."""
    late = []
    for module, path, tree in parsed():
        if module.startswith("dxcli.cli"):
            continue
        top = set(map(id, tree.body))
        late += [f"{module}:{node.lineno}" for _, node in dx_imports(tree, module) if id(node) not in top]
    assert late == []


def test_cli_calls_library_entry_points_only():
    wrong = []
    for module, _, tree in parsed():
        if module.startswith("dxcli.cli"):
            wrong += [f"{module}:{node.lineno} -> {target}" for target, node in dx_imports(tree, module)
                      if target != "dxcli" and not target.startswith(CLI_MAY_IMPORT)
                      and (module, target) not in CLI_STARTS_SERVER]
    assert wrong == []


def test_the_server_and_the_cli_stay_apart():
    """Beside `dx serve` starting the server, an import between cli and server is reported, either way."""
    assert points_down("dxcli.cli.serve", "dxcli.server.run") and points_down("dxcli.cli.serve", "dxcli.server.options")
    assert not points_down("dxcli.cli.serve", "dxcli.server.app")
    assert not points_down("dxcli.cli.detect", "dxcli.server.run")
    assert not points_down("dxcli.server.run", "dxcli.cli.common")
    assert points_down("dxcli.server.app", "dxcli.evaluation.detections")


def test_only_runtime_reads_the_launcher_variables():
    readers = []
    for module, _, tree in parsed():
        if module.startswith("dxcli.runtime"):
            continue
        readers += [f"{module}:{node.lineno}" for node in ast.walk(tree)
                    if isinstance(node, ast.Constant) and node.value in LAUNCHER_VARIABLES]
    assert readers == []


def test_no_import_time_side_effects_in_the_library():
    """A library module's top level only defines: imports, classes, functions, constants."""
    allowed = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign,
               ast.AnnAssign)
    effects = []
    for module, _, tree in parsed():
        if module.startswith("dxcli.cli") or module == "dxcli.__main__":
            continue
        for node in tree.body:
            docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            guard = isinstance(node, ast.If) and ast.unparse(node.test) in ("__name__ == '__main__'", "TYPE_CHECKING")
            if not (isinstance(node, allowed) or docstring or guard):
                effects.append(f"{module}:{node.lineno}: {ast.unparse(node)[:60]}")
    assert effects == []


def test_the_checker_sees_a_violation(tmp_path: Path):
    """The rule above is not vacuous: an upward import in a model module is reported."""
    tree = ast.parse("from dxcli.training.sft import run\n")
    (target, _), = dx_imports(tree, "dxcli.model.x")
    assert layer_of(target)[1] > layer_of("dxcli.model.x")[1]


def test_functions_and_files_stay_readable_sizes():
    """No library function over 60 lines, no file over 400: a recipe step or a command that grows
    past that is doing two things."""
    long = []
    for module, path, tree in parsed():
        lines = path.read_text(encoding="utf-8").count("\n")
        if lines > 400:
            long.append(f"{module}: {lines} lines")
        long += [f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines" for node in ast.walk(tree)
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60]
    assert long == []
