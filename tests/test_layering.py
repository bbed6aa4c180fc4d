"""Layers point down (docs/architecture.md): no product module imports a module of a higher layer.

Every module under titan_world/, parallel/, serving/ and launch/ is parsed with `ast`; each import, at module
level or inside a function, is mapped to its layer. Imports under `if TYPE_CHECKING:` are exempt: they never run,
they only name types for annotations.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("titan_world", "parallel", "serving", "launch")

# Lowest first; a module's layer is the first whose pattern (a regex over its dotted name) matches.
# Commands come first: launch/*, every cli module, and the modules a `titan-world` subcommand runs.
COMMANDS = (
    r"launch\.(?!config$).*|.*\.\w*cli"
    r"|titan_world\.(generate|demo|model\.convert|train\.light_decoder|eval\.action_eval)"
)
LAYERS: list[tuple[str, str]] = [
    ("leaf", r"titan_world(\.__init__|\.exit_codes)?"),
    ("diffusion", r"titan_world\.diffusion\..*"),
    ("model", r"titan_world\.(model\..*|conditioning)"),
    ("config", r"titan_world\.config|\w+(\.\w+)?\.config"),  # plain dataclasses and their composition
    ("parallel", r"parallel\..*"),
    ("data", r"titan_world\.data\..*"),
    ("jobs", r"titan_world\.(job|(train|posttrain|eval)\..*)"),
    ("serving", r"serving\..*"),
    ("commands", COMMANDS),
]
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}


def layer_of(module: str) -> str:
    if re.fullmatch(COMMANDS, module):
        return "commands"
    return next(name for name, pattern in LAYERS if re.fullmatch(pattern, module))


MODULES = {
    ".".join(p.relative_to(ROOT).with_suffix("").parts): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
}
KNOWN = set(MODULES) | {m.removesuffix(".__init__") for m in MODULES}  # a package is known by its own name too


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, imported product module) for every import in the file, resolved to the longest module in `known`
    (`from pkg import mod` names pkg.mod); imports under `if TYPE_CHECKING:` are left out."""
    tree = ast.parse(path.read_text(), filename=str(path))
    exempt = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for stmt in node.body
        for n in ast.walk(stmt)
    }
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and id(node) not in exempt:
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and id(node) not in exempt:
            base = node.module or ""
            if node.level:
                base = ".".join(filter(None, [package.rsplit(".", node.level - 1)[0], base]))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.append((node.lineno, name))
                break
    return found


def upward_imports() -> list[str]:
    bad = []
    for module, path in sorted(MODULES.items()):
        here = layer_of(module)
        for line, target in imports_of(module, path, KNOWN):
            there = layer_of(target if target in MODULES else f"{target}.__init__")
            if RANK[there] > RANK[here]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {module} ({here}) imports {target} ({there})")
    return bad


def test_layers_point_down():
    bad = upward_imports()
    assert not bad, "lower layers import higher ones (docs/architecture.md):\n" + "\n".join(bad)


def test_every_command_module_is_in_the_commands_layer():
    """A module with the subcommand protocol (`add_arguments` and `run`) is a command, whatever its folder."""
    for module, path in MODULES.items():
        defs = {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}
        if {"add_arguments", "run"} <= defs:
            assert layer_of(module) == "commands", f"{path}: a command module outside the commands layer"


def test_the_scanner_sees_function_level_and_relative_imports_and_skips_type_checking(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import serving.engine\n"
        "def f():\n    from launch import cli\n    from .codec import latent_frames\n"
    )
    known = {"serving.engine", "launch.cli", "titan_world.model.codec"}
    assert sorted(imports_of("titan_world.model.m", src, known)) == [(5, "launch.cli"), (6, "titan_world.model.codec")]
    assert layer_of("titan_world.model.config") == "model" and layer_of("serving.config") == "config"
    assert layer_of("titan_world.train.cli") == "commands" and layer_of("titan_world.train.loop") == "jobs"
