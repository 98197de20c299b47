"""The package's imports run one way. Every module of avgalign sits in a layer; a module may import
from modules of earlier layers, and from modules listed before it in its own layer, never from a
later one. Every import counts: at module level, inside functions (the lazy imports that keep
`--help` torch-free) and under TYPE_CHECKING. The only exception is code under
`if __name__ == "__main__":`, which runs as a program and never when the module is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "avgalign"

# (layer, modules in order). A module not listed fails the test: place it when you add it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("leaves", ("avgalign", "errors", "seeding", "stopping", "versions", "loss_specs",
                "attention")),
    ("config", ("config",)),
    ("data", ("data",)),
    ("losses", ("losses",)),
    ("modeling", ("models", "logprobs", "reference", "attention_plan")),
    ("training", ("training_data", "batching", "launching", "tracking", "checkpoint",
                  "modelcard", "train")),
    ("evaluation", ("evaluation.metrics", "evaluation.generation", "evaluation.scoring",
                    "evaluation.prompts", "evaluation.evaluate", "evaluation.outputs",
                    "evaluation", "reward_model")),
    ("study", ("study", "frontier", "sweep", "toy", "toy.world", "toy.sft", "toy.build",
               "toy.demo", "recipes", "recipes.hh")),
    ("cli", ("cli.parsers", "cli.handlers", "cli", "__main__")),
]
RANK = {module: (i, j) for i, (_, modules) in enumerate(LAYERS) for j, module in
        enumerate(modules)}
LAYER = {module: name for name, modules in LAYERS for module in modules}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "avgalign"


def _is_main_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare)
            and isinstance(test.left, ast.Name) and test.left.id == "__name__")


def imported_modules(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, avgalign module) for every import of the package in `path` (or in `source`, read
    as if it were that file), at any depth."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    if name == "avgalign":
        package = []
    found = []
    stack = list(ast.parse(path.read_text() if source is None else source).body)
    while stack:
        node = stack.pop()
        if _is_main_block(node):
            continue
        stack.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif (node.module or "").split(".")[0] == "avgalign":
                target = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:  # `from . import x` imports the module x when it is one
                candidate = ".".join([*target, alias.name])
                found.append((node.lineno, candidate if candidate in RANK else
                              ".".join(target) or "avgalign"))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "avgalign":
                    found.append((node.lineno, ".".join(alias.name.split(".")[1:]) or "avgalign"))
    return found


def violations(imports: dict[str, list[tuple[int, str]]]) -> list[str]:
    wrong = []
    for module, targets in imports.items():
        for line, target in targets:
            if target == module or target not in RANK:
                continue
            if RANK[target] > RANK[module]:
                wrong.append(f"{module}:{line} imports {target} ({LAYER[module]} -> "
                             f"{LAYER[target]}): against the declared order")
    return wrong


def package_imports() -> dict[str, list[tuple[int, str]]]:
    return {module_name(p): imported_modules(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_place_in_the_layers():
    modules = set(package_imports())
    assert modules - set(RANK) == set(), "place these modules in LAYERS"
    assert set(RANK) - modules == set(), "LAYERS lists modules that do not exist"


def test_imports_run_one_way_lazy_ones_included():
    imports = package_imports()
    assert sum(len(v) for v in imports.values()) > 100  # the scan sees the package's imports
    assert violations(imports) == []


@pytest.mark.parametrize(("source", "module"), [
    ("def f():\n    from .train import train\n", "config"),  # a lazy upward import
    ("from ..cli import main\n", "evaluation.scoring"),
    ("import avgalign.study\n", "losses"),
    ("from .demo import run_demo\n", "toy.world"),  # within a layer, to a later module
])
def test_a_planted_upward_import_is_caught(source, module):
    path = PACKAGE.joinpath(*module.split(".")).with_suffix(".py")
    planted = imported_modules(path, path.read_text() + "\n" + source)
    assert len(violations({module: planted})) == 1


def test_the_main_block_of_a_module_is_a_program_and_may_use_the_cli():
    assert _is_main_block(ast.parse('if __name__ == "__main__":\n    pass\n').body[0])
    hh = PACKAGE / "recipes" / "hh.py"
    assert "cli" not in {target for _, target in imported_modules(hh)}
    assert "from ..cli import main" in hh.read_text()
