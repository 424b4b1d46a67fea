"""The package's imports go one way: each part of ``ilora`` imports only parts of lower layers.

The graph is read from the source (every ``import``, at module level or inside a function), so
an import that would close a loop is caught even where it is deferred to run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ilora"

# Lowest first. A part (subpackage, or top-level module) may import parts of lower layers only,
# never one of its own layer: siblings stay independent of each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("__init__", "errors"),
    ("config", "fileio"),
    ("prompt_settings",),
    ("models",),  # load, encode, cache, score any VLM
    ("atari", "general", "merge"),  # games and their data; general data and benchmark; merging adapters
    ("base", "routing"),  # pretraining the tiny base; routing-tuned training, skill selection
    ("library", "rl"),
    ("experiment",),
    ("cli",),
    ("__main__",),
)


def package_parts(root: Path) -> set[str]:
    """The parts of the package at ``root``: its subpackages and its top-level modules."""
    return {p.stem if p.is_file() else p.name for p in root.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}


def part_of(module: str, parts: set[str]) -> str | None:
    """The part of ``ilora`` that absolute module name ``module`` belongs to (``None``: not ilora).

    ``ilora.merge.ops`` is ``merge``; ``ilora`` alone, or a name defined in ``ilora/__init__.py``
    (``ilora.__version__``), is ``__init__``.
    """
    names = module.split(".")
    if names[0] != "ilora":
        return None
    return names[1] if len(names) > 1 and names[1] in parts else "__init__"


def imported_modules(node: ast.AST, package: str) -> list[str]:
    """Absolute module names one import statement reads (``from ilora import merge`` reads
    ``ilora.merge``); relative imports resolved against ``package``."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        module = ".".join(base + ([node.module] if node.module else []))
    else:
        module = node.module or ""
    # `from ilora import merge` reads the subpackage, `from ilora import __version__` the package.
    return [f"{module}.{alias.name}" if module == "ilora" else module for alias in node.names]


def import_graph(root: Path) -> dict[str, set[str]]:
    """Part -> the other parts of the package it imports, from every ``.py`` file under ``root``.

    Args:
        root: the package folder (``src/ilora``).

    Returns:
        An edge for each import of another part, module-level or inside a function.
    """
    parts = package_parts(root)
    graph: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("").parts
        package = ".".join(("ilora", *rel[:-1]))  # a module's package; an __init__'s is itself
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for module in imported_modules(node, package):
                target = part_of(module, parts)
                if target is not None and target != rel[0]:
                    graph.setdefault(rel[0], set()).add(target)
    return graph


def layer_violations(graph: dict[str, set[str]], layers=LAYERS) -> list[str]:
    """The imports that do not go strictly down the declared layers, and the parts no layer declares."""
    rank = {part: i for i, layer in enumerate(layers) for part in layer}
    undeclared = sorted({part for source, targets in graph.items() for part in (source, *targets)} - set(rank))
    found = [f"{part}: in no layer (declare it in LAYERS)" for part in undeclared]
    for source, targets in sorted(graph.items()):
        for target in sorted(targets):
            if source in rank and target in rank and rank[target] >= rank[source]:
                found.append(f"{source} -> {target}: {target} is not in a lower layer than {source}")
    return found


def test_every_part_is_declared_in_a_layer():
    parts = package_parts(PACKAGE)
    declared = {part for layer in LAYERS for part in layer}
    assert parts == declared, f"undeclared: {sorted(parts - declared)}; gone: {sorted(declared - parts)}"


def test_package_imports_go_down_the_layers():
    graph = import_graph(PACKAGE)
    assert graph["experiment"] >= {"merge", "routing"}  # the graph is really read
    assert layer_violations(graph) == []


@pytest.mark.parametrize(
    "statement, edge",
    [
        ("from ilora.merge.export import apply_merged_state", "models -> merge"),
        ("import ilora.atari.prompts", "models -> atari"),
        ("from ilora import general", "models -> general"),
    ],
)
def test_an_upward_import_inside_a_function_is_caught(tmp_path, statement, edge):
    """The bottom layer importing up, deferred into a function, as the tokenizer corpus once did."""
    root = tmp_path / "ilora"
    for part in ("models", "merge", "atari", "general"):
        (root / part).mkdir(parents=True)
        (root / part / "__init__.py").write_text("")
    (root / "merge" / "export.py").write_text("from ilora.models.load import load_model\n")
    (root / "models" / "load.py").write_text(f"def load_model():\n    {statement}\n")
    graph = import_graph(root)
    assert graph["merge"] == {"models"}
    assert [v.split(":")[0] for v in layer_violations(graph)] == [edge]


def test_a_relative_import_counts_like_an_absolute_one(tmp_path):
    root = tmp_path / "ilora"
    for part in ("models", "merge"):
        (root / part).mkdir(parents=True)
        (root / part / "__init__.py").write_text("")
    (root / "models" / "load.py").write_text("from ..merge import export\n")
    assert import_graph(root) == {"models": {"merge"}}


def test_siblings_of_one_layer_may_not_import_each_other():
    assert layer_violations({"atari": {"general", "models"}}) == [
        "atari -> general: general is not in a lower layer than atari"
    ]


def readme_layout() -> dict[str, str]:
    """The README's Layout block: for ``""`` (the package's top level) and each subpackage, its text."""
    readme = (PACKAGE.parents[1] / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    sections: dict[str, str] = {}
    current = None
    for line in block.splitlines():
        stripped = line.strip()
        if stripped.startswith("src/ilora/"):
            current, line = "", stripped.removeprefix("src/ilora/")
        elif line.startswith("      ") and not line.startswith("        ") and stripped.split(" ")[0].endswith("/"):
            current, line = stripped.split(" ")[0].rstrip("/"), stripped.split(" ", 1)[1]
        elif line.startswith("      cli.py"):  # the top-level line after the subpackages
            current = ""
        elif not line.startswith("                  "):
            current = None
        if current is not None:
            sections[current] = sections.get(current, "") + " " + line
    return sections


def test_the_readme_layout_names_every_module_under_its_package():
    layout = readme_layout()
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if path.name == "__init__.py" or "assets" in relative.parts:
            continue
        package = "/".join(relative.parts[:-1])
        if f" {path.name}" not in layout.get(package, ""):
            missing.append(str(relative))
    assert not missing, f"README Layout does not name {missing}"
    assert set(layout) - {""} == {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file() and p.name != "assets"}
