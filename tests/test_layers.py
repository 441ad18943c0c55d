"""The import-layer contract: every ``ftrl`` import points down the stack, never up or sideways into a cycle.

Layers, top to bottom (a module may import its own layer's package-mates and anything below):

    bench | run | report | pipeline, stages, inputs | analysis | eval | train | builder | collect | reward | llm | envs
    | tracking, run_state, progress | artifacts, config | params, registry | types, errors

Imports inside functions count (lazy imports are still dependencies); imports under
``if TYPE_CHECKING:`` count too. Registry entries are ``"module:attr"`` strings, not imports, so the
registries at the bottom may name implementations anywhere.

    python -m pytest tests/test_layers.py -q
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ftrl"

# Top to bottom. Each entry is one layer: module names or package prefixes (``ftrl.envs`` covers
# ``ftrl.envs.*``). Modules of one layer may import each other only when they share a package
# (``ftrl.envs.io`` -> ``ftrl.envs.verify``), so same-layer siblings stay independent.
LAYERS: list[tuple[str, ...]] = [
    ("ftrl.bench",),
    ("ftrl.run",),
    ("ftrl.report",),
    ("ftrl.pipeline", "ftrl.stages", "ftrl.inputs"),
    ("ftrl.analysis",),
    ("ftrl.eval",),
    ("ftrl.train",),
    ("ftrl.builder",),
    ("ftrl.collect",),
    ("ftrl.reward",),
    ("ftrl.llm",),
    ("ftrl.envs",),
    ("ftrl.tracking", "ftrl.run_state", "ftrl.progress"),
    ("ftrl.artifacts", "ftrl.config"),
    ("ftrl.params", "ftrl.registry"),
    ("ftrl.types", "ftrl.errors"),
]
# Same-layer imports that are allowed although the modules are not in one package (the pipeline
# runs the stage functions).
SAME_LAYER_ALLOWED = {("ftrl.pipeline", "ftrl.stages"), ("ftrl.pipeline", "ftrl.inputs"), ("ftrl.stages", "ftrl.inputs"),
                      ("ftrl.run_state", "ftrl.artifacts"), ("ftrl.run_state", "ftrl.config")}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _all_modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, imported ftrl module) for every import in ``path``, resolved to a module of the package."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("ftrl")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("ftrl"):
            for alias in node.names:  # ``from ftrl import stages`` imports the module ftrl.stages
                submodule = f"{node.module}.{alias.name}"
                found.append((node.lineno, submodule if submodule in modules else node.module))
    return found


def _layer_of(module: str) -> int:
    for index, layer in enumerate(LAYERS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in layer):
            return index
    raise AssertionError(f"{module} is in no layer of tests/test_layers.py: add it to LAYERS")


def _package_of(module: str) -> str:
    for layer in LAYERS:
        for prefix in layer:
            if module == prefix or module.startswith(prefix + "."):
                return prefix
    return module


def test_every_module_has_a_layer() -> None:
    for module in _all_modules():
        if module != "ftrl":
            _layer_of(module)


def test_no_import_points_up_or_across() -> None:
    modules = _all_modules()
    violations: list[str] = []
    for module, path in modules.items():
        if module == "ftrl":
            continue
        for line, target in _imports(path, modules):
            if target == "ftrl":
                continue
            mine, theirs = _layer_of(module), _layer_of(target)
            same_package = _package_of(module) == _package_of(target)
            allowed_sibling = (_package_of(module), _package_of(target)) in SAME_LAYER_ALLOWED
            if theirs < mine or (theirs == mine and not same_package and not allowed_sibling):
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line} {module} imports {target}")
    assert not violations, "imports against the layer order:\n" + "\n".join(violations)


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The contract is live: an upward import in a bottom-layer module is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from ftrl.pipeline import run_pipeline\n", encoding="utf-8")
    imports = _imports(bad, _all_modules())
    assert imports == [(2, "ftrl.pipeline")]
    assert _layer_of("ftrl.pipeline") < _layer_of("ftrl.types")


@pytest.mark.parametrize("module", ["ftrl.config", "ftrl.registry", "ftrl.params", "ftrl.errors", "ftrl.types"])
def test_the_config_layer_loads_without_torch(module: str) -> None:
    """Config validation runs before any model work: the bottom layers must not pull in torch."""
    import subprocess
    import sys

    code = f"import sys, {module}; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
