"""The house rules that keep the code navigable: imports point one way, and msa/ stays pure science."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Lower layers never import higher ones; a module may import its own layer (within a package).
LAYERS = [
    ("msa",),
    ("pipelines.status", "pipelines.errors", "pipelines.cache", "pipelines.fast_exit"),
    ("pipelines.tracking", "pipelines.executor", "pipelines.cluster", "pipelines.claims", "pipelines.devices",
     "pipelines.store_check", "pipelines.spec", "pipelines.progress", "pipelines.cores"),
    ("pipelines.stages", "pipelines.comparison", "pipelines.parent", "pipelines.registry"),
    ("pipelines.suite",),
    ("pipelines.tuning", "pipelines.tune"),
    # the CLI, and the package itself (an empty __init__)
    ("pipelines.run", "pipelines.engine_options", "pipelines.arguments", "pipelines"),
]


def _layer(module: str) -> int | None:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def _modules() -> dict[str, Path]:
    found = {}
    for package in ("msa", "pipelines"):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    """Modules imported by `path` (every import, or only those run at import time), TYPE_CHECKING excluded."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= _from_import(node)
    if not top_level_only:  # drop what only a TYPE_CHECKING block imports
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
                out -= _imports_in(node.body)
    return out


def _imports_in(body) -> set[str]:
    return set().union(*(_from_import(n) for n in body if isinstance(n, ast.ImportFrom) and n.module))


def _from_import(node: ast.ImportFrom) -> set[str]:
    """`from a.b import c`: the module a.b.c when c is one, else a.b."""
    submodules = {f"{node.module}.{a.name}" for a in node.names} & set(MODULES)
    names_only = any(f"{node.module}.{a.name}" not in MODULES for a in node.names)
    return submodules | ({node.module} if names_only else set())


MODULES = _modules()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_one_way(module):
    mine = _layer(module)
    assert mine is not None, f"{module} is in no layer of LAYERS: add it where it belongs"
    for imported in _imports(MODULES[module], top_level_only=False):
        theirs = _layer(imported)
        if theirs is not None:
            assert theirs <= mine, f"{module} (layer {mine}) imports {imported} (layer {theirs}), which is above it"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("msa")))
def test_msa_needs_torch_alone(module):
    forbidden = ("pipelines", "mlflow", "optuna", "dask")
    bad = [i for i in _imports(MODULES[module], top_level_only=False) if i.split(".")[0] in forbidden]
    assert not bad, f"{module} imports {bad}: msa/ is science, usable with torch alone"


def test_no_import_cycles():
    graph = {m: {i for i in _imports(p, top_level_only=True) if i in MODULES} - {m} for m, p in MODULES.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_no_pipelines_module_grows_past_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "pipelines").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"split these: {long}"


def test_the_ablations_path_loads_neither_optuna_nor_dask():
    # Each costs a command start-up time (issue 12): Optuna only where a study journal exists, Dask only
    # where several workers run. A module-level import of either on this path would undo that.
    import subprocess
    import sys

    code = ("import sys; import pipelines.run, pipelines.suite, pipelines.stages.prepare, pipelines.stages.train, "
            "pipelines.stages.compare, pipelines.cluster; "
            "print(sorted(m for m in ('optuna', 'dask', 'distributed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
