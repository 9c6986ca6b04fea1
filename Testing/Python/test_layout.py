"""The Lib's layout stays layered: every import (top-level or lazy, inside a function) goes to the same or a
lower layer, and no modules import each other in a cycle. The Slicer module, the tests, the benchmarks and
the scripts import only paths that exist, and the Slicer side no private names."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIB = ROOT / "MSInstanceSaliencyLib"
PKG = "MSInstanceSaliencyLib"

# Lowest first. A subpackage is a layer of its own; the few top-level modules are listed by name, and so is a
# subpackage that shares its layer with them (cli/, the command line, among the apps).
LAYERS = [
    ("leaves", {"__init__", "errors", "progress", "dependencies"}),
    ("io", "io"),
    ("models", "models"),
    ("segmentation", "segmentation"),
    ("saliency", "saliency"),
    ("classifier", "classifier"),
    ("research", "research"),
    ("cohort", "cohort"),  # msis cohort, an app on top of the Lib: only the apps above may import it
    ("apps", {"cli", "worker", "worker_client", "__main__"}),
]
# The cohort package's modules, lowest first: each imports only modules before it (its __init__ last)
COHORT_ORDER = ["manifest", "store", "tasks", "progress", "cluster", "run", "experiments", "__init__"]


def _modules(lib: Path) -> dict:
    """Dotted name (MSInstanceSaliencyLib.models.base) -> file, for every module and package under lib."""
    out = {}
    for f in sorted(lib.rglob("*.py")):
        parts = list(f.relative_to(lib).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([lib.name, *parts])] = f
    return out


def _layer(name: str) -> int | None:
    parts = name.split(".")[1:] or ["__init__"]
    for i, (_, members) in enumerate(LAYERS):
        if isinstance(members, str) and parts[0] == members:
            return i
        if isinstance(members, set) and parts[0] in members:
            return i
    return None


def _imports(name: str, path: Path, modules: dict, inside: bool = True):
    """(line, imported module, imported names) for every import of the package in the file, at any depth;
    relative imports count only in a file inside the package (inside)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level and not inside:
                continue
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != name.split(".")[0]:
                continue
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            yield node.lineno, target, [n for n in names if f"{target}.{n}" not in modules]
            for sub in submodules:
                yield node.lineno, sub, []
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == name.split(".")[0]:
                    yield node.lineno, a.name, []


def _cycle(graph: dict) -> list | None:
    """One cycle of the directed graph {node: set(nodes)} as a list of nodes, or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def layout_problems(lib: Path) -> list:
    """What breaks the layering of the package at lib: modules in no layer, upward imports, cycles."""
    modules = _modules(lib)
    problems, graph, layer_graph = [], {}, {}
    for name, path in modules.items():
        src = _layer(name)
        if src is None:
            problems.append(f"{path.relative_to(lib.parent)} is in no layer: put it in a subpackage of test_layout.LAYERS")
        for line, target, _ in _imports(name, path, modules):
            if target not in modules:
                problems.append(f"{path.relative_to(lib.parent)}:{line} imports {target}, which does not exist")
                continue
            dst = _layer(target)
            if target != name:
                graph.setdefault(name, set()).add(target)
            if None not in (src, dst) and dst > src:
                problems.append(f"{path.relative_to(lib.parent)}:{line} imports {target} from a higher layer "
                                f"({LAYERS[src][0]} -> {LAYERS[dst][0]})")
            if None not in (src, dst) and dst != src:
                layer_graph.setdefault(LAYERS[src][0], set()).add(LAYERS[dst][0])
    for what, g in (("modules", graph), ("layers", layer_graph)):
        cycle = _cycle(g)
        if cycle:
            problems.append(f"import cycle between {what}: {' -> '.join(cycle)}")
    return problems


def order_problems(lib: Path, package: str, order: list) -> list:
    """Imports between the modules of the subpackage `package` that do not go to a module before them in
    `order` (which names them all)."""
    modules = _modules(lib)
    prefix = f"{lib.name}.{package}"
    rank = {prefix + ("" if m == "__init__" else f".{m}"): i for i, m in enumerate(order)}
    problems = [f"{name} is not in the order" for name in modules if (name == prefix or name.startswith(prefix + ".")) and name not in rank]
    for name, i in rank.items():
        if name not in modules:
            problems.append(f"{name} is in the order but does not exist")
            continue
        for line, target, _ in _imports(name, modules[name], modules):
            if target in rank and target != name and rank[target] >= i:
                problems.append(f"{modules[name].relative_to(lib.parent)}:{line} imports {target}, which is not before it")
    return problems


def _top_level_names(path: Path) -> set:
    names = set()
    for n in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(n.name)
        elif isinstance(n, ast.Assign):
            names |= {t.id for t in n.targets if isinstance(t, ast.Name)}
        elif isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name):
            names.add(n.target.id)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in n.names}
    return names


def user_import_problems(files, lib: Path, allow_private: bool) -> list:
    """Imports of the package from outside it (Slicer module, tests, ...) that name a module or a name the
    package does not have, or (unless allow_private) a private name."""
    modules = _modules(lib)
    problems = []
    for f in files:
        for line, target, names in _imports(lib.name, f, modules, inside=False):
            where = f"{f.relative_to(lib.parent)}:{line}"
            if target not in modules:
                problems.append(f"{where} imports {target}, which does not exist")
                continue
            missing = sorted(set(names) - _top_level_names(modules[target]))
            if missing:
                problems.append(f"{where} imports {', '.join(missing)} from {target}, which has no such name")
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and not allow_private:
                problems.append(f"{where} imports the private {', '.join(private)} from {target}")
    return problems


def test_the_lib_is_layered_without_cycles():
    assert layout_problems(LIB) == []


def test_the_cohort_modules_import_only_those_before_them():
    assert order_problems(LIB, "cohort", COHORT_ORDER) == []


def test_every_subpackage_is_a_layer():
    on_disk = {p.parent.name for p in LIB.glob("*/__init__.py")}
    layers = {m for _, m in LAYERS if isinstance(m, str)}
    named = set().union(*(m for _, m in LAYERS if isinstance(m, set)))
    assert layers <= on_disk and on_disk <= layers | named


def test_the_slicer_module_imports_public_paths_only():
    files = sorted((ROOT / "MSInstanceSaliency").rglob("*.py"))
    assert files and user_import_problems(files, LIB, allow_private=False) == []


def test_tests_benchmarks_and_scripts_import_existing_paths():
    files = [f for d in ("Testing", "benchmarks", "scripts", "docs") for f in sorted((ROOT / d).rglob("*.py"))]
    assert user_import_problems(files, LIB, allow_private=True) == []


def _package(tmp_path, files: dict) -> Path:
    lib = tmp_path / PKG
    for rel, text in {"__init__.py": "", "errors.py": "", **files}.items():
        (lib / rel).parent.mkdir(parents=True, exist_ok=True)
        (lib / rel).write_text(text)
    return lib


@pytest.mark.parametrize("files, expected", [
    # a lazy import of a higher layer, inside a function
    ({"io/__init__.py": "", "io/volumes.py": "def f():\n    from ..models.base import X\n",
      "models/__init__.py": "", "models/base.py": "X = 1\n"}, "from a higher layer (io -> models)"),
    # the same, written absolute
    ({"models/__init__.py": "", "models/base.py": "import MSInstanceSaliencyLib.cli\n", "cli.py": ""}, "(models -> apps)"),
    # a module of a package named in a layer's set (cli/ among the apps), imported from below
    ({"models/__init__.py": "", "models/base.py": "from ..cli.parser import build_parser\n", "cli/__init__.py": "",
      "cli/parser.py": "def build_parser():\n    pass\n"}, "(models -> apps)"),
    # two modules of one layer importing each other (one of them lazily)
    ({"models/__init__.py": "", "models/base.py": "from .loading import load\n",
      "models/loading.py": "def load():\n    from .base import X\n"}, "import cycle between modules"),
    # a module in no layer
    ({"stray.py": ""}, "is in no layer"),
    # a module that does not exist
    ({"io/__init__.py": "", "io/volumes.py": "from ..volumes import read_image\n"}, "which does not exist"),
])
def test_layout_problems_are_found(tmp_path, files, expected):
    problems = layout_problems(_package(tmp_path, files))
    assert any(expected in p for p in problems), problems


def test_order_problems_are_found(tmp_path):
    lib = _package(tmp_path, {"cohort/__init__.py": "from .run import run\n", "cohort/run.py": "from .manifest import read\n",
                              "cohort/manifest.py": "def read():\n    from .run import run\n", "cohort/stray.py": ""})
    problems = order_problems(lib, "cohort", ["manifest", "run", "__init__", "gone"])
    assert any("manifest.py:2 imports MSInstanceSaliencyLib.cohort.run, which is not before it" in p for p in problems), problems
    assert any("cohort.stray is not in the order" in p for p in problems), problems
    assert any("cohort.gone is in the order but does not exist" in p for p in problems), problems
    assert order_problems(lib, "cohort", ["run", "manifest", "__init__", "stray"]) == [
        f"{PKG}/cohort/run.py:1 imports {PKG}.cohort.manifest, which is not before it"]


def test_user_import_problems_are_found(tmp_path):
    lib = _package(tmp_path, {"io/__init__.py": "", "io/volumes.py": "def read_image():\n    pass\n_private = 1\n"})
    user = tmp_path / "user.py"
    user.write_text(f"from {PKG}.io.volumes import read_image, _private, write_image\nfrom {PKG}.volumes import read_image\n")
    problems = user_import_problems([user], lib, allow_private=False)
    assert any("private _private" in p for p in problems), problems
    assert any("write_image from" in p for p in problems), problems
    assert any(f"{PKG}.volumes, which does not exist" in p for p in problems), problems
    assert user_import_problems([user], lib, allow_private=True) != []
